// fq_generate: load a model file and greedily generate from token ids, through the public headers.
//
//   fq_generate MODEL.fq [N_NEW] [BITS] ID ID ID ...
//
// Prints the generated ids on one line ("ids: 12 873 ..."), then the bytes read per token and
// the decode speed. BITS (2..max_bits) sets every layer and the LM head; 0 keeps max_bits.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "flexquant/engine.h"

int main(int argc, char** argv) {
    if (argc < 5) {
        std::fprintf(stderr, "usage: %s MODEL.fq N_NEW BITS ID [ID ...]\n", argv[0]);
        return 2;
    }
    try {
        auto eng = flexquant::Engine::open(argv[1]);
        const long n_new = std::strtol(argv[2], nullptr, 10);
        const int bits = static_cast<int>(std::strtol(argv[3], nullptr, 10));
        if (bits != 0) {
            std::vector<int32_t> mask(eng->config().n_layers, bits);
            eng->set_layer_bits(mask.data(), static_cast<int64_t>(mask.size()));
            eng->set_lm_head_bits(bits);
        }
        std::vector<int32_t> prompt;
        for (int i = 4; i < argc; ++i) prompt.push_back(static_cast<int32_t>(std::strtol(argv[i], nullptr, 10)));

        flexquant::Sampling greedy;  // temperature 0
        const auto t0 = std::chrono::steady_clock::now();
        std::vector<int32_t> out = flexquant::generate(*eng, prompt, n_new, greedy, /*seed=*/0);
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

        std::printf("ids:");
        for (int32_t t : out) std::printf(" %d", t);
        std::printf("\nbytes/token: %llu\n", static_cast<unsigned long long>(eng->bytes_per_token()));
        std::printf("%zu tokens in %.3f s (prefill included)\n", out.size(), s);
    } catch (const flexquant::Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
