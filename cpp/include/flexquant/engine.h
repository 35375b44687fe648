// flexquant::Engine: the Llama forward pass on the bit-plane store, with a KV cache and a
// per-layer bit mask that may change before every step.
//
//   auto eng = flexquant::Engine::open("model.fq");              // mmap + validate, or throw
//   std::vector<int32_t> prompt = {1, 15043, 29892};               // token ids
//   eng->eval(prompt.data(), prompt.size());                       // prefill: one batched pass
//   flexquant::Sampling sp;                                        // temperature 0 = greedy
//   flexquant::TokenSampler sampler(sp, /*seed=*/42);
//   for (int i = 0; i < 32; ++i) {
//       int32_t next = sampler.sample(*eng);                      // from the last step's logits
//       if (next == eng->config().eos_token_id) break;
//       eng->set_layer_bits(mask.data(), mask.size());            // optional, per token
//       eng->eval(&next, 1);                                       // one decode step
//   }
//
// Precision: every linear runs at the bit-width the mask gives it, reading only the first k bit
// planes of its weight (docs/format.md). The mask is (n_layers, 7) or (n_layers,) integers in
// BITS_MIN..max_bits(), q k v o gate up down in that order; the LM head has its own setting.
// A new mask applies from the next eval() on and costs no copy or allocation.
//
// Several sequences: with EngineParams::n_seq > 1 the engine holds that many sequences, each with
// its own KV cache, and decode_batch() runs one step of several of them as one batched pass (every
// weight is read once for the whole batch: where decode is bound by weight bytes, B sequences cost
// little more than one; on a 2-core CPU, where the kernels are compute-bound, 4 cost 2.2x one).
// eval(), n_past() and reset() without a sequence number act on sequence 0.
//
//   EngineParams p; p.n_seq = 4;
//   auto eng = flexquant::Engine::open("model.fq", p);
//   for (int s = 0; s < 4; ++s) eng->eval_seq(s, prompt[s].data(), prompt[s].size());  // prefill
//   int32_t seqs[4] = {0, 1, 2, 3}, next[4] = {...};
//   std::vector<float> logits(4 * vocab);
//   eng->decode_batch(seqs, next, 4, logits.data());             // one step of all four
//
// Threads: one Engine is not thread-safe; use one per thread (they may share a ModelFile).
// Errors: every failure throws flexquant::Error naming the offending value; after an error in
// eval() the sequence is unchanged (the KV cache keeps the tokens before the call).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "flexquant/error.h"
#include "flexquant/model_file.h"

namespace flexquant {

// The KV cache's element type. KV_AUTO: fp16 on the CPU, fp32 on CUDA. On the CPU the fp16 cache
// holds half the bytes, decodes faster at long contexts and changes the next-token distribution by a
// KL of about 6e-7 (SmolLM2 on held-out text; tools/numerics_quality.py, docs/kernels.md). On CUDA
// fp32 stays the default until the fp16 cache has been timed on a GPU.
// KV_Q8 (CPU only; the CUDA backend refuses it): int8 codes and one fp32 scale per 32 values (max
// |x| / 127, as llama.cpp's q8_0), 36 bytes per 32 values: 0.56 of the fp16 cache's memory and
// reads, for long contexts. What it costs in accuracy: docs/kernels.md (stop 26).
enum class KvDType { KV_AUTO, KV_F32, KV_F16, KV_Q8 };

// CPU backend: what the bit-plane matmuls multiply the weights with (ACT_I16, ACT_F32: for the
// linears whose activation bits are 0, their default; ACT_I8: activation bits 8 on every decoder
// linear; set_activation_bits below). ACT_I16: each linear's input
// rounded per row and weight group to int16 (a step of 1/32767 of the group's largest value), so
// that the kernels multiply integers: the decode kernel on AVX-512 VNNI CPUs, the GEMM of prompts and
// batches on those and on AVX2 ones. On a 2-core AVX-512 test machine decode ran 1.3x (SmolLM2) to
// 1.9x (a Llama-2-7B shape) faster than on fp32 activations and prompts 2.7x to 3.6x (AVX2 alone:
// prompts 1.6-1.7x), for a next-token KL of about 4e-8 on SmolLM2 (tools/numerics_quality.py,
// docs/kernels.md). Other paths compute the same numbers with the fp32 kernels on the rounded input
// (the numbers do not depend on the CPU). ACT_F32: the input as given (the accuracy reference).
// ACT_I8: every decoder linear starts at activation bits 8 (set_activation_bits below), the LM head at
// int16 (0): its input rounded to int8 instead (a step of 1/127 of the group's largest value), which
// AVX-512 VNNI and AVX-VNNI CPUs multiply with vpdpbusd, twice the products per instruction of the
// int16 kernels (on the 2-core test machine: prompts 1.35-1.55x, SmolLM2 decode 1.04-1.09x, batches
// of 2-4 1.15-1.2x, Llama-2-7B-shaped prompt GEMMs 1.5-1.9x), for a next-token KL of about 1.8e-3 on
// SmolLM2 at 8 bits (1-4% on top of the weights' own error at 5 bits and below: docs/kernels.md). A
// linear set to activation bits 0 runs int16. The CUDA backend ignores it.
enum class CpuActivations { ACT_I16, ACT_F32, ACT_I8 };

// Where the forward pass runs. BACKEND_AUTO: CUDA when the build has it and a GPU is present,
// else the CPU. BACKEND_CUDA asked for explicitly on a build or machine without CUDA falls back to
// the CPU; backend() then says CPU and backend_note() says why.
enum class Backend { BACKEND_AUTO, BACKEND_CPU, BACKEND_CUDA };

struct EngineParams {
    // KV-cache length in tokens. 0: the model's context length, capped so that the cache fits
    // in kv_budget_bytes. A prompt plus generation longer than n_ctx is an error (no sliding
    // window).
    int64_t n_ctx = 0;
    uint64_t kv_budget_bytes = 4ull << 30;
    int n_threads = 0;  // CPU threads; 0 = all cores
    KvDType kv_dtype = KvDType::KV_AUTO;
    CpuActivations cpu_activations = CpuActivations::ACT_I16;
    Backend backend = Backend::BACKEND_CPU;
    // The highest bit-width this engine may run (BITS_MIN..the file's max_bits; 0 = the file's).
    // The CUDA backend uploads only that many planes of each linear: max_bits = 6 of an 8-bit file
    // holds 6/8 of the code bytes on the GPU. Masks above it are refused.
    int max_bits = 0;
    // CUDA only: fp32 activations in the bit-plane GEMV (the accuracy reference, ~2x slower)
    // instead of int8 activations on the binary tensor cores; and whether the one-token step is
    // replayed from a CUDA graph.
    bool cuda_fp32_matmul = false;
    bool cuda_graph = true;
    // CUDA only: a prompt is prefilled in passes of up to 256 tokens, and a pass of at least this
    // many tokens runs its linears on the tensor-core GEMM (W{k}A8: the GEMV's int8 activations, so
    // the same logits up to fp32 rounding); shorter passes and decode steps use the GEMV. 0: the
    // GEMV only, in passes of 8 tokens. Ignored with cuda_fp32_matmul.
    int64_t cuda_gemm_min_rows = 64;
    // CUDA only: GEMV launches (decode steps, batched steps, 8-row prompt passes) of at least this
    // many activation rows (1..16) run on the s8 tensor cores with the weight codes decoded in
    // registers (the same int8 activations and integer sums as the default binary-tensor-core
    // kernel, whose cost grows with the rows; this one's hardly does, and one launch takes 16 rows
    // where the default takes 8). Group sizes 128, 256, 512; other linears keep the default.
    // 0: never (the default until it is measured on a GPU).
    int cuda_mma_min_rows = 0;
    // Sequences the engine holds (1..4096), each with its own KV cache of n_ctx tokens; with
    // n_ctx = 0 the budget above is shared by all of them. On the CUDA backend the caches live on
    // the GPU and decode_batch runs there too.
    int n_seq = 1;
};

// Which kernel runs a linear of shape (n outputs, k inputs) at `bits` for m activation rows.
// CPU: the bit-serial decode kernels for m <= decode_max_m, dequantize-then-GEMM above. CUDA: the
// bit-plane GEMV for m <= decode_max_m, the tensor-core GEMM above (layer linears; the LM head stays
// on the GEMV), and which GEMV and GEMM kernels those are (the fields below; the CPU ignores them).
struct KernelChoice {
    int64_t n = 0, k = 0;
    int bits = 0;
    int64_t decode_max_m = 4;
    // CUDA: the linears the entry is for, by activation precision: 8 (int8), 16 (fp16), 0 (any).
    // The kernel fields below need 8 or 16 (they name kernels of one activation family).
    int act_bits = 0;
    // CUDA, act_bits 8: GEMV launches of at least this many rows (1..16) run on the s8 tensor cores
    // (MMA kernel), fewer on the binary tensor cores (TC); 0: never; -1: as
    // EngineParams::cuda_mma_min_rows. Chosen per linear, so every entry of one (n, k, act_bits)
    // must give the same value (the captured decode step holds it while the bit-width changes).
    int mma_min_rows = -1;
    // CUDA: the GEMM above decode_max_m rows: "a8" (mma.sync) or "a8_wg" (wgmma, Hopper) for
    // act_bits 8, "a16" for 16; "": the default ("a8", or "a8_wg" with FLEXQUANT_CUDA_WGMMA=1).
    std::string gemm;
    // What tune_kernels() left out for this entry because its results disagreed with the reference
    // kernel's on this GPU ("" = nothing), e.g. "a8_wg: row error 0.31 > 0.0001 at 4 bits". Kept
    // with the table for the record; never read back.
    std::string rejected;
};

// Cheap signals of the last step's next-token distribution, for a precision controller.
struct StepSignals {
    float entropy = 0.0f;    // nats
    float top1_prob = 0.0f;  // probability of the most likely token
};

class Engine {
public:
    static std::unique_ptr<Engine> open(const std::string& path, const EngineParams& params = {});
    Engine(std::shared_ptr<const ModelFile> model, const EngineParams& params);
    ~Engine();
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    const ModelConfig& config() const;
    const std::shared_ptr<const ModelFile>& model() const;
    int64_t n_ctx() const;   // KV-cache capacity in tokens
    int64_t n_past() const;  // tokens in the KV cache
    int n_threads() const;
    void set_threads(int n_threads);  // 0 = all cores
    Backend backend() const;            // BACKEND_CPU or BACKEND_CUDA: where eval() runs
    const std::string& backend_note() const;  // why an asked-for CUDA backend is not used ("" if it is)
    int max_bits() const;               // the bit-width cap (EngineParams::max_bits resolved)
    KvDType kv_dtype() const;           // KV_F32, KV_F16 or KV_Q8 (EngineParams::kv_dtype resolved)
    CpuActivations cpu_activations() const;  // EngineParams::cpu_activations
    uint64_t device_bytes() const;      // GPU memory held by the CUDA backend (0 on the CPU)

    // ---- precision ----
    // mask: count = n_layers * 7 (row-major (n_layers, 7)) or n_layers (a layer's 7 linears
    // alike); each value in BITS_MIN..max_bits. Throws, naming the layer, linear and value.
    void set_layer_bits(const int32_t* mask, int64_t count);
    void set_lm_head_bits(int bits);
    std::vector<int32_t> layer_bits() const;  // (n_layers, 7)
    int lm_head_bits() const;
    // Weight bytes one decode step reads under the current mask (linears' first k planes and
    // group params, one embedding row, the norms).
    uint64_t bytes_per_token() const;

    // ---- activation precision ----
    // bits: count = n_layers * 7 + 1 (every linear in LinearKind order, then the LM head) or 1
    // (all alike). CPU backend: each 0 (int16 on ACT_I16 and ACT_I8 engines, fp32 on ACT_F32 ones:
    // EngineParams::cpu_activations), 2..8 (that linear's input is first quantized per weight group to
    // symmetric integers of that width, as the CUDA tensor-core GEMV does with 8; 8 runs the int8
    // kernels, ACT_I8's default and the fastest on VNNI CPUs, the other widths the fp32 kernels on the
    // rounded input) or 16 (rounded to fp16 and back, as the CUDA f16 GEMV does), so the CPU can run
    // the model the GPU runs and calibration can measure what low-precision activations cost per
    // layer. A NaN or inf in an input shows in that linear's output at 8 (as with int16); the widths
    // run on the fp32 kernels round it to a finite code. CUDA backend: each 8 (int8, the tensor-core
    // GEMV: the default where the group size allows it), 16 (fp16 on the f16 tensor cores, near fp32
    // accuracy at about the int8 kernel's cost; group sizes 128, 256, 512; prompts run those linears
    // on the f16 GEMM) or 0 (fp32 activations, the fp32 GEMV). Throws naming the entry and value; a
    // bad call changes nothing.
    void set_activation_bits(const int32_t* bits, int64_t count);
    std::vector<int32_t> activation_bits() const;  // (n_layers * 7 + 1)

    // ---- in-step precision rules ----
    // With rules set, each linear picks its bit-width inside the step from its own input h (the
    // normed hidden state, the attention output or the SwiGLU output), with no host round trip:
    //   k* = argmin_{k in bits_min..bits_max}  Σ_i cost[k - bits_min][i] · h_i²  +  λ · n · K · k
    // cost: one table per linear (n_layers * 7 in LinearKind order, then the LM head), each
    // (bits_max - bits_min + 1, K) floats: the predicted loss per unit input energy of running
    // that linear at k (e.g. calibrated KL sensitivity × the column error energy of the k-bit
    // view). n · K: the linear's weight count, so λ prices one bit of one weight. For a batch
    // (prefill), the largest k any row picks is used. The mask is ignored while rules are set.
    // CPU backend only (the CUDA backend throws).
    void set_precision_rules(int bits_min, int bits_max, const std::vector<std::vector<float>>& cost, double lambda);
    void set_rule_lambda(double lambda);  // change λ only (cheap; e.g. every token)
    void clear_precision_rules();
    bool has_precision_rules() const;
    // Bits each linear ran at in the last eval (n_layers * 7, then the LM head).
    std::vector<int32_t> last_bits() const;
    // Weight bytes the last eval read per token at those bits.
    uint64_t last_bytes_per_token() const;

    // ---- calibration statistics ----
    // While enabled, every eval accumulates Σ_t h_i² of each linear's input (same order and K as
    // the rule tables) and the rows seen per linear (the LM head sees only the rows whose logits
    // are asked for); read with input_energy(), cleared by enabling again. CPU backend only.
    void collect_input_energy(bool enable);
    const std::vector<std::vector<double>>& input_energy() const;
    const std::vector<int64_t>& input_energy_rows() const;

    // ---- running ----
    // Appends n >= 1 tokens to the sequence: one batched pass over all of them (prefill), then
    // the next-token logits of the last one are in logits() and its signals in signals().
    // all_logits (n, vocab), optional: every position's logits (teacher forcing, tests).
    // Throws if a token id is outside 0..vocab-1 or n_past + n > n_ctx.
    void eval(const int32_t* tokens, int64_t n, float* all_logits = nullptr);
    const std::vector<float>& logits() const;  // (vocab); empty before the first eval
    StepSignals signals() const;
    // Forget the sequence (the mask stays).
    void reset();

    // ---- several sequences (EngineParams::n_seq) ----
    int n_seq() const;
    int64_t n_past_seq(int seq) const;  // tokens in sequence seq's KV cache
    void reset_seq(int seq);
    // eval() on sequence seq (0..n_seq-1): appends n tokens to it; logits() and signals() are then
    // its next-token ones. Throws as eval() does, and for a seq out of range.
    void eval_seq(int seq, const int32_t* tokens, int64_t n, float* all_logits = nullptr);
    // One decode step of `count` distinct sequences at once: tokens[i] is appended to sequence
    // seqs[i]. logits (count, vocab) receives row i's next-token logits; signals (count), optional,
    // their entropy and top-1 probability. Every linear runs once on the (count, K) batch at the
    // current mask (with in-step rules, at the largest k any row picks). logits() and signals()
    // are left as they were. Throws naming the offending entry (a seq out of range or repeated, a
    // token outside the vocabulary, a full sequence); after an error no sequence has changed.
    // CPU backend only.
    void decode_batch(const int32_t* seqs, const int32_t* tokens, int64_t count, float* logits,
                      StepSignals* signals = nullptr);

    // ---- kernel dispatch ----
    // Times both kernel families on this machine for every distinct linear shape of the model at
    // every bit-width 2..max_bits and m = 1, 2, ... rows (each shape timed inside passes over all
    // the model's linears, as a forward pass streams them; the fastest of `repeats`), then runs each
    // product on the faster one from now on: decode up to the crossover, GEMM beyond (past max_m:
    // GEMM). Returns the table, one entry per (shape, bits). Cost: about 2 * repeats passes over the
    // weights per bit-width and m, m stopping two past the last crossover. Without a table: decode
    // for m <= 6 on int16 or int8 activations with AVX-512 or AVX2 + GFNI, m <= 4 otherwise. On the
    // CUDA backend: the GEMV against the GEMM per layer-linear shape and bit-width
    // at m = 16, 32, ... up to max(max_m, 16) (<= 256), each shape's linears of every layer timed
    // back to back with CUDA events; without a table the GEMM runs from cuda_gemm_min_rows rows.
    // There it also picks the GEMV kernel (TC or MMA, by rows) and the GEMM kernel (a8 or a8_wg) per
    // shape and activation family, among the kernels whose results agree with the reference's
    // (the TC or MMA_A16 GEMV) on random input on this GPU: a kernel that disagrees is never chosen
    // and is named in the entries' `rejected`.
    std::vector<KernelChoice> tune_kernels(int64_t max_m = 16, int repeats = 3);
    // Applies a table (one tune_kernels() returned earlier on this machine): entries for shapes the
    // model lacks are kept but unused; linears without one keep the built-in rule (CPU: decode up to
    // 6 rows on int16 or int8 activations with AVX-512 or AVX2 + GFNI, up to 4 otherwise, decided per
    // call by the kernels and activations in use; CUDA: cuda_gemm_min_rows). Throws naming a bad
    // entry (bits outside 2..8, decode_max_m < 0, a non-positive shape, act_bits not 0/8/16,
    // mma_min_rows outside -1..16, an unknown gemm or one of the other activation family, entries
    // of one shape that disagree on mma_min_rows; on CUDA also gemm 'a8_wg' where this GPU or a
    // linear of the entry's shape cannot run it); a bad table changes nothing. (mma_min_rows on a
    // linear whose group size the MMA kernel lacks is ignored for that linear, as
    // cuda_mma_min_rows is.) On CUDA the captured one-token step follows the table too: a mask
    // under which it puts a linear on another kernel than at capture re-captures it (tune()'s
    // tables keep one row on the GEMV at every bit-width, so they never do).
    void set_kernel_table(const std::vector<KernelChoice>& table);
    std::vector<KernelChoice> kernel_table() const;

    // Weight bytes one decode step reads at `bits` (n_layers * 7 linears in LinearKind order, then
    // the LM head; each in BITS_MIN..max_bits): what a sequence would read alone at its own mask.
    uint64_t bytes_per_token_at(const int32_t* bits, int64_t count) const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// Sampling settings. temperature <= 0 is greedy; the filters follow transformers' order:
// repetition penalty, temperature, top-k, top-p, min-p.
struct Sampling {
    float temperature = 0.0f;
    int64_t top_k = 0;                // 0 = off
    float top_p = 1.0f;               // 1 = off
    float min_p = 0.0f;               // 0 = off
    float repetition_penalty = 1.0f;  // 1 = off; applied to every token in the history
};

// A seeded sampler: the same seed, model and prompt give the same tokens.
class TokenSampler {
public:
    TokenSampler(const Sampling& sampling, uint64_t seed);
    ~TokenSampler();
    // Draws the next token from eng.logits(); history: tokens seen so far (for the penalty).
    int32_t sample(const Engine& eng, const int32_t* history = nullptr, int64_t n_history = 0);
    // The same from a logits row (vocab), e.g. one row of Engine::decode_batch's output.
    int32_t sample_logits(const float* logits, int64_t vocab, const int32_t* history = nullptr,
                          int64_t n_history = 0);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// Convenience loop for C++ callers: prefill `prompt`, then sample up to max_new_tokens tokens,
// stopping at the model's eos or when on_token returns false. Returns the generated ids (eos
// excluded). The engine is reset first.
std::vector<int32_t> generate(Engine& eng, const std::vector<int32_t>& prompt, int64_t max_new_tokens,
                              const Sampling& sampling, uint64_t seed,
                              const std::function<bool(int32_t)>& on_token = nullptr);

}  // namespace flexquant
