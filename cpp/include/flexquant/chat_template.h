// flexquant::ChatTemplate: renders a model's chat template (tokenizer.chat_template) in C++.
//
//   flexquant::ChatTemplate tmpl(model->meta_string("tokenizer.chat_template"));  // parse, or throw
//   std::string prompt = tmpl.render({{"system", "Be brief."}, {"user", "Hi"}},
//                                    /*add_generation_prompt=*/true, "<s>", "</s>");
//
// Chat templates are Jinja programs. This is a small interpreter for the subset the supported
// models' templates use (SmolLM2/ChatML, Llama-2, Llama-3), rendering as transformers does
// (jinja2 with trim_blocks and lstrip_blocks); tests/test_text_engine.py compares it with jinja2
// on those templates. Supported:
//   {{ expr }}  {% if / elif / else / endif %}  {% for x in expr %} ... {% endfor %} (loop.index,
//   loop.index0, loop.first, loop.last, loop.length)  {% set name = expr %}  {# comments #}
//   whitespace control {%- -%} {{- -}};
//   expressions: string/int/bool/none literals, names, a.b, a[i], a[i:j], + - * / % ~, == != < >
//   <= >=, in, not in, and, or, not, `x if c else y`, `is [not] defined/none/string/...`;
//   filters trim, length, upper, lower, string; methods strip, lstrip, rstrip, upper, lower,
//   startswith, endswith; raise_exception(msg).
// Anything else is a flexquant::Error at construction (naming the line and the construct), never a
// silent misrender. The interpreter has no access to anything but the values passed in, so an
// untrusted template cannot reach the host (what jinja2's sandbox gives the Python side).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "flexquant/error.h"

namespace flexquant {

struct ChatMessage {
    std::string role;     // "system", "user", "assistant", ...
    std::string content;
};

class ChatTemplate {
public:
    explicit ChatTemplate(const std::string& source);  // throws flexquant::Error on a syntax error
    ~ChatTemplate();
    ChatTemplate(ChatTemplate&&) noexcept;
    ChatTemplate& operator=(ChatTemplate&&) noexcept;

    // The prompt text for `messages`; bos_token/eos_token are the model's special tokens' text.
    // Throws flexquant::Error for raise_exception() in the template or a runtime type error.
    std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                       const std::string& bos_token, const std::string& eos_token) const;

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

}  // namespace flexquant
