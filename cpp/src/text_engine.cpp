// TextEngine: the generation loop over text. It mirrors python/flexquant_rt/engine.py
// (Engine._loop and _scan_stop) statement for statement, so that C++ and Python produce the same
// text for the same prompt and seed; tests/test_text_engine.py holds them to it.
#include "flexquant/text_engine.h"

#include <utility>

#include "utf8.h"

namespace flexquant {

const char* stop_reason_name(StopReason r) {
    switch (r) {
        case StopReason::STOP_EOS: return "eos";
        case StopReason::STOP_STRING: return "stop";
        case StopReason::STOP_LENGTH: return "length";
        case StopReason::STOP_CONTEXT: return "context";
        case StopReason::STOP_CALLBACK: return "callback";
    }
    return "?";
}

struct TextEngine::Impl {
    std::unique_ptr<Engine> eng;
    std::unique_ptr<Tokenizer> tok;
    std::unique_ptr<ChatTemplate> tmpl;  // null when the model has none
};

TextEngine::TextEngine(std::unique_ptr<Engine> engine) : impl_(std::make_unique<Impl>()) {
    if (!engine) throw Error("TextEngine: engine is null");
    impl_->eng = std::move(engine);
    const ModelFile& m = *impl_->eng->model();
    impl_->tok = Tokenizer::from_model(m);
    if (const MetaValue* t = m.meta("tokenizer.chat_template"); t != nullptr && t->type == MetaType::META_STRING && !t->s.empty()) {
        try {
            impl_->tmpl = std::make_unique<ChatTemplate>(t->s);
        } catch (const Error& e) {
            throw Error(m.path() + ": tokenizer.chat_template: " + e.what());
        }
    }
}

TextEngine::~TextEngine() = default;

std::unique_ptr<TextEngine> TextEngine::open(const std::string& path, const EngineParams& params) {
    return std::make_unique<TextEngine>(Engine::open(path, params));
}

Engine& TextEngine::engine() { return *impl_->eng; }
const Tokenizer& TextEngine::tokenizer() const { return *impl_->tok; }
bool TextEngine::has_chat_template() const { return impl_->tmpl != nullptr; }

namespace {

// Splits `held` into text safe to emit and text held back because it could still grow into a
// stop string; returns whether a stop string occurs (then `ready` ends right before it).
bool scan_stop(std::string& held, const std::vector<std::string>& stops, std::string& ready) {
    if (stops.empty()) {
        ready = std::move(held);
        held.clear();
        return false;
    }
    size_t cut = std::string::npos;
    for (const std::string& s : stops) cut = std::min(cut, held.find(s));
    if (cut != std::string::npos) {
        ready = held.substr(0, cut);
        held.clear();
        return true;
    }
    size_t keep = 0;
    for (const std::string& s : stops) {
        for (size_t n = std::min(s.size() - 1, held.size()); n > 0; --n) {
            if (held.compare(held.size() - n, n, s, 0, n) == 0) {
                keep = std::max(keep, n);
                break;
            }
        }
    }
    ready = held.substr(0, held.size() - keep);
    held.erase(0, held.size() - keep);
    return false;
}

bool ends_with_replacement(const std::string& s) {
    return s.size() >= 3 && s.compare(s.size() - 3, 3, utf8::REPLACEMENT) == 0;
}

}  // namespace

GenerateResult TextEngine::generate(const std::string& prompt, const GenerateParams& params, const TextCallback& on_text) {
    Engine& eng = *impl_->eng;
    const Tokenizer& tok = *impl_->tok;
    if (params.max_new_tokens < 0) {
        throw Error("generate: max_new_tokens = " + std::to_string(params.max_new_tokens) + " is negative");
    }
    for (size_t k = 0; k < params.stop.size(); ++k) {
        if (params.stop[k].empty()) throw Error("generate: stop[" + std::to_string(k) + "] is an empty string");
    }
    std::vector<int32_t> ids = tok.encode(prompt, params.add_special_tokens);
    if (ids.empty()) throw Error("generate: the prompt is empty (no tokens): give at least one token of text");
    if (static_cast<int64_t>(ids.size()) >= eng.n_ctx()) {
        throw Error("generate: the prompt has " + std::to_string(ids.size()) + " tokens, the context holds " +
                    std::to_string(eng.n_ctx()) + " (the prompt plus at least one generated token must fit)");
    }
    TokenSampler sampler(params.sampling, params.seed);
    const int32_t eos = params.ignore_eos ? -1 : tok.eos_id();

    GenerateResult r;
    r.n_prompt_tokens = static_cast<int64_t>(ids.size());
    r.stop_reason = StopReason::STOP_LENGTH;
    std::vector<int32_t> history = ids;
    std::string held, ready;  // the text held back for the stop strings / now safe to emit
    // Incremental detokenization: r.tokens[0, read) is emitted text, ending on a whole character;
    // each new piece is the text of r.tokens[prefix, end) past that of r.tokens[prefix, read), both
    // decoded from the same first token (so what a decoder does to a sequence's first token, such as
    // SentencePiece dropping its leading space, cancels out); r.tokens[prefix, read) always has text
    // (or prefix is 0). As the Python engine's _Sequence: the whole output decoded every token cost
    // O(n) per token.
    size_t prefix = 0, read = 0;
    std::string before, text;
    const auto window = [&] {
        const int32_t* w = r.tokens.data() + prefix;
        before = tok.decode(w, static_cast<int64_t>(read - prefix));
        text = tok.decode(w, static_cast<int64_t>(r.tokens.size() - prefix));
    };
    const auto emit = [&](const std::string& piece) {
        r.text += piece;
        return !on_text || on_text(piece);
    };

    eng.reset();
    eng.eval(ids.data(), static_cast<int64_t>(ids.size()));
    for (int64_t i = 0; i < params.max_new_tokens; ++i) {
        const int32_t t = sampler.sample(eng, history.data(), static_cast<int64_t>(history.size()));
        if (t == eos) {
            r.stop_reason = StopReason::STOP_EOS;
            break;
        }
        r.tokens.push_back(t);
        history.push_back(t);
        window();
        if (!ends_with_replacement(text)) {  // else: an incomplete UTF-8 sequence, wait for more
            const size_t had = held.size();
            held += text.substr(std::min(before.size(), text.size()));
            // a segment that decoded to nothing (a skipped special token) must not start the window,
            // or the next token's leading space would be dropped as a sequence's first
            if (held.size() > had) prefix = read;
            read = r.tokens.size();
            const bool hit = scan_stop(held, params.stop, ready);
            if (!ready.empty() && !emit(ready)) {
                r.stop_reason = StopReason::STOP_CALLBACK;
                return r;
            }
            if (hit) {
                r.stop_reason = StopReason::STOP_STRING;
                return r;
            }
        }
        if (eng.n_past() >= eng.n_ctx()) {
            r.stop_reason = StopReason::STOP_CONTEXT;
            break;
        }
        if (i + 1 == params.max_new_tokens) break;  // the last token needs no forward pass
        if (params.before_step) params.before_step(eng, static_cast<int64_t>(r.tokens.size()));
        eng.eval(&t, 1);
    }
    // flush: a trailing incomplete UTF-8 sequence is emitted as it decodes (U+FFFD)
    if (!r.tokens.empty()) {
        window();
        held += text.substr(std::min(before.size(), text.size()));
    }
    const bool hit = scan_stop(held, params.stop, ready);
    if (hit) r.stop_reason = StopReason::STOP_STRING;
    if (!(ready + held).empty() && !emit(ready + held)) r.stop_reason = StopReason::STOP_CALLBACK;
    return r;
}

std::string TextEngine::apply_chat_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
    if (!impl_->tmpl) {
        throw Error(impl_->eng->model()->path() + ": this model file has no chat template; use generate() with a plain prompt");
    }
    if (messages.empty()) throw Error("chat: messages is empty");
    const Tokenizer& tok = *impl_->tok;
    const auto piece = [&](int32_t id) { return id >= 0 ? tok.token(id) : std::string(); };
    return impl_->tmpl->render(messages, add_generation_prompt, piece(tok.bos_id()), piece(tok.eos_id()));
}

GenerateResult TextEngine::chat(const std::vector<ChatMessage>& messages, const GenerateParams& params,
                                const TextCallback& on_text) {
    GenerateParams p = params;
    p.add_special_tokens = false;  // the template writes the special tokens itself
    return generate(apply_chat_template(messages, true), p, on_text);
}

}  // namespace flexquant
