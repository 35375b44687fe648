// fq_inspect MODEL.fq: open a model through the public header and print what the engine sees:
// the config, the tensor count and the bytes one decode step reads at 8, 6 and 4 bits.
#include <cstdio>
#include <exception>

#include "flexquant/model_file.h"

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s MODEL.fq\n", argv[0]);
        return 2;
    }
    try {
        const auto model = flexquant::ModelFile::open(argv[1]);
        const flexquant::ModelConfig& c = model->config();
        static const char* const rope_types[] = {"none", "linear", "llama3"};

        std::printf("%s: %llu bytes, flexquant format %d\n", model->path().c_str(),
                    (unsigned long long)model->file_size(), c.format_version);
        std::printf("  name            %s\n", c.name.c_str());
        std::printf("  architecture    %s\n", c.architecture.c_str());
        std::printf("  bit planes      max_bits %d, group_size %d, layout %s\n", c.max_bits, c.group_size,
                    c.plane_layout.c_str());
        std::printf("  layers          %lld\n", (long long)c.n_layers);
        std::printf("  hidden / ffn    %lld / %lld\n", (long long)c.hidden, (long long)c.ffn);
        std::printf("  heads           %lld query, %lld kv, head_dim %lld\n", (long long)c.n_heads,
                    (long long)c.n_kv_heads, (long long)c.head_dim);
        std::printf("  vocab           %lld (bos %lld, eos %lld)\n", (long long)c.vocab, (long long)c.bos_token_id,
                    (long long)c.eos_token_id);
        std::printf("  context         %lld\n", (long long)c.context_length);
        std::printf("  rms_norm_eps    %g\n", double(c.rms_norm_eps));
        std::printf("  rope            theta %g, scaling %s (factor %g)\n", double(c.rope_theta),
                    rope_types[int(c.rope_scaling.type)], double(c.rope_scaling.factor));
        std::printf("  tied embeddings %s\n", c.tie_word_embeddings ? "yes" : "no");
        std::printf("tensors: %zu\n", model->tensor_names().size());
        std::printf("bytes per token:\n");
        for (int bits : {8, 6, 4}) {
            if (bits > c.max_bits) continue;
            const double bytes = double(model->bytes_per_token(bits));
            std::printf("  %d-bit  %14.0f  (%.2f MiB)\n", bits, bytes, bytes / (1024.0 * 1024.0));
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "fq_inspect: %s\n", e.what());
        return 1;
    }
    return 0;
}
