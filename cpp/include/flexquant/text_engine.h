// flexquant::TextEngine: text in, text out, for C++ applications.
//
//   #include "flexquant/text_engine.h"
//   auto llm = flexquant::TextEngine::open("smollm2.fq");                 // or throw flexquant::Error
//   flexquant::GenerateParams gp;                                          // greedy, 128 tokens
//   gp.stop = {"\n\n"};
//   auto r = llm->chat({{"user", "What is the capital of France?"}}, gp,
//                      [](const std::string& piece) {                      // streaming, optional
//                          std::fputs(piece.c_str(), stdout);
//                          return true;                                     // false = stop now
//                      });
//   // r.text: the whole answer; r.stop_reason: why it ended
//
// A TextEngine is an Engine (engine.h) plus the model's native Tokenizer (tokenizer.h) and chat
// template (chat_template.h), all read from the one model file. Its generation loop is the Python
// package's Engine.generate step for step (same sampler, same stop rules, same streaming of
// whole UTF-8 characters), so the same prompt and seed give the same text in both.
//
// Precision control: engine() is the token-level Engine; set_layer_bits() on it before
// generate() holds for the whole generation, and GenerateParams::before_step lets a controller
// read the last step's signals() and set a new mask before every decode step.
//
// Threads: not thread-safe (one TextEngine per thread). Errors: flexquant::Error naming the bad
// value (an empty prompt, a prompt longer than the context, a bad sampling setting, a template
// that calls raise_exception, a model whose tokenizer cannot run natively).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "flexquant/chat_template.h"
#include "flexquant/engine.h"
#include "flexquant/tokenizer.h"

namespace flexquant {

struct GenerateParams {
    int64_t max_new_tokens = 128;
    Sampling sampling;              // temperature 0 = greedy (engine.h)
    uint64_t seed = 0;              // same seed, same tokens
    std::vector<std::string> stop;  // stop strings; the text ends before the first one (not included)
    bool add_special_tokens = true; // generate(): prepend BOS when the model does (chat() never adds)
    bool ignore_eos = false;        // keep going past the eos token (benchmarks)
    // Called before every decode step after the first token: read eng.signals(), call
    // eng.set_layer_bits(...). n_generated: tokens generated so far.
    std::function<void(Engine& eng, int64_t n_generated)> before_step;
};

enum class StopReason {
    STOP_EOS,       // the model produced its eos token
    STOP_STRING,    // a stop string appeared
    STOP_LENGTH,    // max_new_tokens reached
    STOP_CONTEXT,   // the KV cache is full
    STOP_CALLBACK,  // on_text returned false
};
const char* stop_reason_name(StopReason r);  // "eos", "stop", "length", "context", "callback"

struct GenerateResult {
    std::string text;               // the generated text (stop string excluded)
    std::vector<int32_t> tokens;    // the generated ids (eos excluded)
    int64_t n_prompt_tokens = 0;
    StopReason stop_reason = StopReason::STOP_LENGTH;
};

// Streaming callback: receives each new piece of text (whole UTF-8 characters; text that might be
// the start of a stop string is held back until it is known not to be). Return false to stop.
using TextCallback = std::function<bool(const std::string& piece)>;

class TextEngine {
public:
    static std::unique_ptr<TextEngine> open(const std::string& path, const EngineParams& params = {});
    explicit TextEngine(std::unique_ptr<Engine> engine);  // throws if the tokenizer cannot load
    ~TextEngine();
    TextEngine(const TextEngine&) = delete;
    TextEngine& operator=(const TextEngine&) = delete;

    Engine& engine();
    const Tokenizer& tokenizer() const;
    bool has_chat_template() const;

    // Continue `prompt`. The engine's sequence is reset first.
    GenerateResult generate(const std::string& prompt, const GenerateParams& params = {},
                            const TextCallback& on_text = nullptr);
    // generate() on the model's chat template applied to `messages` with the generation prompt.
    // Throws if the model has no chat template.
    GenerateResult chat(const std::vector<ChatMessage>& messages, const GenerateParams& params = {},
                        const TextCallback& on_text = nullptr);
    // The prompt chat() would run.
    std::string apply_chat_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt = true) const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace flexquant
