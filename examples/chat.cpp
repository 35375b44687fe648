// fq_chat: text in, text out through the public headers (flexquant/text_engine.h).
//
//   fq_chat MODEL.fq [--raw] [--max-new N] [--bits B] [--stop TEXT] [--temperature T] [--seed S] PROMPT...
//
// Without --raw the prompt is the user's message in the model's chat template; with --raw it is
// continued as plain text. The answer streams to stdout between <answer> and </answer>; the token
// count, the stop reason and the speed go to stderr. Exit status 1 on any flexquant::Error.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "flexquant/text_engine.h"

int main(int argc, char** argv) {
    bool raw = false;
    int bits = 0;
    flexquant::GenerateParams gp;
    std::string prompt;
    const char* path = nullptr;
    for (int i = 1; i < argc; ++i) {
        const auto value = [&](const char* flag) {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "%s needs a value\n", flag);
                std::exit(2);
            }
            return argv[++i];
        };
        if (!std::strcmp(argv[i], "--raw")) raw = true;
        else if (!std::strcmp(argv[i], "--max-new")) gp.max_new_tokens = std::strtol(value("--max-new"), nullptr, 10);
        else if (!std::strcmp(argv[i], "--bits")) bits = static_cast<int>(std::strtol(value("--bits"), nullptr, 10));
        else if (!std::strcmp(argv[i], "--stop")) gp.stop.push_back(value("--stop"));
        else if (!std::strcmp(argv[i], "--temperature")) gp.sampling.temperature = std::strtof(value("--temperature"), nullptr);
        else if (!std::strcmp(argv[i], "--seed")) gp.seed = std::strtoull(value("--seed"), nullptr, 10);
        else if (!path) path = argv[i];
        else prompt += (prompt.empty() ? "" : " ") + std::string(argv[i]);
    }
    if (!path || prompt.empty()) {
        std::fprintf(stderr, "usage: %s MODEL.fq [--raw] [--max-new N] [--bits B] [--stop TEXT] "
                             "[--temperature T] [--seed S] PROMPT...\n", argv[0]);
        return 2;
    }
    try {
        auto llm = flexquant::TextEngine::open(path);
        if (bits != 0) {  // every linear and the LM head at `bits`
            flexquant::Engine& eng = llm->engine();
            std::vector<int32_t> mask(eng.config().n_layers, bits);
            eng.set_layer_bits(mask.data(), static_cast<int64_t>(mask.size()));
            eng.set_lm_head_bits(bits);
        }
        const auto stream = [](const std::string& piece) {
            std::fwrite(piece.data(), 1, piece.size(), stdout);
            std::fflush(stdout);
            return true;
        };
        std::printf("<answer>");
        const auto t0 = std::chrono::steady_clock::now();
        const flexquant::GenerateResult r = raw ? llm->generate(prompt, gp, stream)
                                                : llm->chat({{"user", prompt}}, gp, stream);
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::printf("</answer>\n");
        std::fprintf(stderr, "%lld prompt tokens, %zu generated, stop: %s, %.3f s (%.1f tokens/s)\n",
                     static_cast<long long>(r.n_prompt_tokens), r.tokens.size(),
                     flexquant::stop_reason_name(r.stop_reason), s, r.tokens.size() / (s > 0 ? s : 1));
    } catch (const flexquant::Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
