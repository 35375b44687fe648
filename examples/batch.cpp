// fq_batch: greedy generation for several prompts at once, through the public headers: one engine
// with a sequence per prompt, each prefilled on its own, then decode_batch steps of all the
// sequences still running (every weight is read once per step for all of them).
//
//   fq_batch MODEL.fq N_NEW ID,ID,... ID,ID,... ...
//
// Each argument after N_NEW is one prompt, its token ids separated by commas. Prints one line per
// prompt ("ids 0: 12 873 ..."; generation stops at eos or after N_NEW tokens), then the tokens/s.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "flexquant/engine.h"

namespace {

std::vector<int32_t> parse_ids(const std::string& s) {
    std::vector<int32_t> ids;
    size_t i = 0;
    while (i < s.size()) {
        size_t j = s.find(',', i);
        if (j == std::string::npos) j = s.size();
        ids.push_back(static_cast<int32_t>(std::strtol(s.substr(i, j - i).c_str(), nullptr, 10)));
        i = j + 1;
    }
    return ids;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s MODEL.fq N_NEW ID,ID,... [ID,ID,... ...]\n", argv[0]);
        return 2;
    }
    try {
        const long n_new = std::strtol(argv[2], nullptr, 10);
        std::vector<std::vector<int32_t>> prompts;
        for (int i = 3; i < argc; ++i) prompts.push_back(parse_ids(argv[i]));
        const int n = static_cast<int>(prompts.size());

        flexquant::EngineParams params;
        params.n_seq = n;  // one KV cache per prompt
        auto eng = flexquant::Engine::open(argv[1], params);
        const int64_t vocab = eng->config().vocab;
        const int32_t eos = eng->config().eos_token_id;
        flexquant::Sampling greedy;  // temperature 0
        flexquant::TokenSampler sampler(greedy, /*seed=*/0);

        const auto t0 = std::chrono::steady_clock::now();
        std::vector<std::vector<int32_t>> out(n);
        std::vector<int32_t> live, next;  // the sequences still generating and their pending tokens
        for (int s = 0; s < n; ++s) {
            eng->eval_seq(s, prompts[s].data(), static_cast<int64_t>(prompts[s].size()));
            const int32_t tok = sampler.sample(*eng);
            if (n_new > 0 && tok != eos) {
                out[s].push_back(tok);
                if (n_new > 1) live.push_back(s), next.push_back(tok);
            }
        }
        std::vector<float> logits;
        while (!live.empty()) {
            const int64_t m = static_cast<int64_t>(live.size());
            logits.resize(static_cast<size_t>(m * vocab));
            eng->decode_batch(live.data(), next.data(), m, logits.data());
            std::vector<int32_t> still, still_next;
            for (int64_t i = 0; i < m; ++i) {
                const int32_t tok = sampler.sample_logits(logits.data() + i * vocab, vocab);
                const int s = live[i];
                if (tok == eos) continue;
                out[s].push_back(tok);
                if (static_cast<long>(out[s].size()) < n_new && eng->n_past_seq(s) < eng->n_ctx())
                    still.push_back(s), still_next.push_back(tok);
            }
            live.swap(still);
            next.swap(still_next);
        }
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

        size_t total = 0;
        for (int s = 0; s < n; ++s) {
            std::printf("ids %d:", s);
            for (int32_t t : out[s]) std::printf(" %d", t);
            std::printf("\n");
            total += out[s].size();
        }
        std::printf("%zu tokens for %d prompts in %.3f s (prefill included)\n", total, n, secs);
    } catch (const flexquant::Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
