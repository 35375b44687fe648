// flexquant model file (.fq) loader: the engine's only way to read a model.
//
//   auto model = flexquant::ModelFile::open("model.fq");      // mmap + validate, or throw
//   const flexquant::ModelConfig& cfg = model->config();
//   const flexquant::BitPlaneLinear& wq = model->linear(0, flexquant::LinearKind::LINEAR_Q);
//   // wq.planes: the first k * wq.plane_bytes bytes are the k-bit view of the weight
//   flexquant::TensorView embd = model->tensor("token_embd.weight");  // (vocab, hidden)
//
// The file format is docs/format.md (GGUF v3 container, bit-plane linears in the `tc8x512`
// layout). open() memory-maps the file read-only and checks everything before returning: the GGUF
// structure (every length and offset against the file size, known tensor types only, alignment),
// the flexquant metadata (format version, config values) and that every tensor the model needs is
// present with the type and shape the config implies. After open() succeeds, every pointer handed
// out stays valid and in bounds for the lifetime of the ModelFile; nothing else is checked later.
// Any failure throws flexquant::Error whose message starts with the file path.
//
// Tensor data is never copied: TensorView::data and BitPlaneLinear::planes/qparams point into the
// read-only mapping (do not write through them). A ModelFile is immutable after open(), so all its
// const methods may be called from several threads at once. Host byte order must be little-endian
// (the file's byte order).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "flexquant/error.h"

namespace flexquant {

// The only flexquant.format_version this reader understands.
constexpr int FORMAT_VERSION = 1;
// Valid bit-widths: a file stores max_bits in BITS_MIN..BITS_MAX planes per linear, and a k-bit
// view exists for every k in BITS_MIN..max_bits.
constexpr int BITS_MIN = 2;
constexpr int BITS_MAX = 8;

// ---- config ---------------------------------------------------------------------------------

struct RopeScaling {
    enum class Type { ROPE_SCALING_NONE, ROPE_SCALING_LINEAR, ROPE_SCALING_LLAMA3 };
    Type type = Type::ROPE_SCALING_NONE;  // flexquant.rope_scaling.type; absent key = none
    // The fields below are read only for the types that use them (docs/format.md); otherwise
    // they keep these neutral defaults.
    float factor = 1.0f;                  // linear, llama3: > 0
    float low_freq_factor = 1.0f;         // llama3: > 0
    float high_freq_factor = 1.0f;        // llama3: > low_freq_factor
    int64_t original_context_length = 0;  // llama3: > 0
};

// Everything the engine needs from the metadata, validated. Key names in docs/format.md.
struct ModelConfig {
    std::string name;          // general.name ("" if absent)
    std::string architecture;  // general.architecture, always "llama"
    int format_version = 0;    // flexquant.format_version, always FORMAT_VERSION
    int max_bits = 0;          // flexquant.max_bits: planes stored per linear, BITS_MIN..BITS_MAX
    int group_size = 0;        // flexquant.group_size: K columns per (scale, min), multiple of 32
    std::string plane_layout;  // flexquant.plane_layout, always "tc8x512"

    int64_t context_length = 0;  // llama.context_length
    int64_t hidden = 0;          // llama.embedding_length (D)
    int64_t n_layers = 0;        // llama.block_count
    int64_t ffn = 0;             // llama.feed_forward_length (F)
    int64_t n_heads = 0;         // llama.attention.head_count (H)
    int64_t n_kv_heads = 0;      // llama.attention.head_count_kv (Hkv, divides H)
    int64_t head_dim = 0;        // llama.attention.key_length (d)
    int64_t vocab = 0;           // llama.vocab_size (V)
    float rms_norm_eps = 0.0f;   // llama.attention.layer_norm_rms_epsilon, > 0
    float rope_theta = 0.0f;     // llama.rope.freq_base, > 0
    RopeScaling rope_scaling;
    bool tie_word_embeddings = false;  // flexquant.tie_word_embeddings (absent = false); the
                                       // file still stores the LM head as its own linear
    int64_t bos_token_id = -1;  // tokenizer.ggml.bos_token_id, -1 if the model has none
    int64_t eos_token_id = -1;  // tokenizer.ggml.eos_token_id, -1 if the model has none
};

// ---- tensors --------------------------------------------------------------------------------

enum class DType { DTYPE_F32, DTYPE_F16, DTYPE_I8 };

// Bytes of one element of `dtype`.
int dtype_size(DType dtype);
// "F32", "F16", "I8".
const char* dtype_name(DType dtype);

// One tensor of the file, viewed in place in the mapping.
struct TensorView {
    std::string name;
    DType dtype = DType::DTYPE_F32;
    std::vector<int64_t> shape;  // outermost first, as in docs/format.md (GGUF stores the reverse)
    const void* data = nullptr;  // contiguous, row-major, aligned to its element size
    uint64_t nbytes = 0;         // product(shape) * dtype_size(dtype)
};

// The 7 linears of a transformer block, in file order. The LM head ("output") is the 8th linear
// of the file but belongs to no layer: ModelFile::lm_head().
enum class LinearKind {
    LINEAR_Q,     // blk.{i}.attn_q       (H*d, D)
    LINEAR_K,     // blk.{i}.attn_k       (Hkv*d, D)
    LINEAR_V,     // blk.{i}.attn_v       (Hkv*d, D)
    LINEAR_O,     // blk.{i}.attn_output  (D, H*d)
    LINEAR_GATE,  // blk.{i}.ffn_gate     (F, D)
    LINEAR_UP,    // blk.{i}.ffn_up       (F, D)
    LINEAR_DOWN,  // blk.{i}.ffn_down     (D, F)
};
constexpr int LINEARS_PER_LAYER = 7;

// "attn_q", "attn_k", ... "ffn_down": the tensor-name stem of a kind.
const char* linear_kind_name(LinearKind kind);

// One bit-plane linear weight W (n outputs x k inputs), in the tc8x512 layout of docs/format.md.
// Its k-bit view is W_k = s_k * (c >> (max_bits - k)) + m_k per row and group; see
// docs/format.md for s_k, m_k and the plane layout.
struct BitPlaneLinear {
    std::string name;  // tensor prefix: "blk.3.attn_q", "output"
    int64_t n = 0, k = 0;       // outputs, inputs
    int64_t n_pad = 0;          // ceil(n / 8) * 8
    int64_t k_pad = 0;          // ceil(k / 128) * 128
    int64_t n_groups = 0;       // ceil(k / group_size)
    int max_bits = 0, group_size = 0;
    const uint8_t* planes = nullptr;    // (max_bits, plane_bytes), plane 0 = most significant bit
    uint64_t plane_bytes = 0;           // n_pad * k_pad / 8
    const uint16_t* qparams = nullptr;  // (n, n_groups, 2) fp16 bits of (scale s, min m)

    // Throws flexquant::Error naming the linear and the value unless BITS_MIN <= bits <= max_bits.
    // Every op taking a bit-width calls it first.
    void check_bits(int bits) const;
    // Bytes a matrix-vector product reads at the k-bit view: bits * plane_bytes (the first `bits`
    // planes) + the fp16 group parameters. Throws like check_bits.
    uint64_t bytes_at(int bits) const;
};

// ---- metadata -------------------------------------------------------------------------------

// GGUF value types, with their on-disk codes.
enum class MetaType : uint32_t {
    META_U8 = 0, META_I8 = 1, META_U16 = 2, META_I16 = 3, META_U32 = 4, META_I32 = 5,
    META_F32 = 6, META_BOOL = 7, META_STRING = 8, META_ARRAY = 9,
    META_U64 = 10, META_I64 = 11, META_F64 = 12,
};
// "u8", "i32", "string", "array", ...
const char* meta_type_name(MetaType type);

// One metadata value. Which members are set depends on `type`:
//   signed integers (i8..i64)     -> i         unsigned integers (u8..u64) -> u
//   f32, f64                      -> f         bool -> b         string -> s (raw bytes)
//   array                         -> elem_type, count, and either
//       items: the elements, for arrays of strings and of arrays (nested), or
//       raw:   `count` packed little-endian elements in the mapping, for arrays of numbers and
//              bools (a tokenizer's scores or a SentencePiece model would be far too big as one
//              MetaValue per element); at(i) decodes one.
struct MetaValue {
    MetaType type = MetaType::META_U8;
    int64_t i = 0;
    uint64_t u = 0;
    double f = 0.0;
    bool b = false;
    std::string s;

    MetaType elem_type = MetaType::META_U8;
    uint64_t count = 0;
    std::vector<MetaValue> items;
    const uint8_t* raw = nullptr;

    bool is_integer() const;  // any of u8..u64, i8..i64
    bool is_float() const;    // f32 or f64
    // Element `index` of an array (throws if not an array or out of range).
    MetaValue at(uint64_t index) const;
};

// A read-only byte range inside the mapping.
struct ByteSpan {
    const uint8_t* data = nullptr;
    uint64_t size = 0;
};

// ---- the file -------------------------------------------------------------------------------

class ModelFile {
public:
    // Map and validate `path`. Throws flexquant::Error (message starts with `path`) if the file
    // cannot be read, is not GGUF v3, is malformed anywhere, has an unknown
    // flexquant.format_version, or lacks a tensor the config requires.
    static std::shared_ptr<ModelFile> open(const std::string& path);
    ~ModelFile();
    ModelFile(const ModelFile&) = delete;
    ModelFile& operator=(const ModelFile&) = delete;

    const ModelConfig& config() const;
    const std::string& path() const;
    uint64_t file_size() const;

    // Tensors, by GGUF name ("token_embd.weight", "blk.0.attn_q.planes", ...). Files may hold
    // tensors beyond the required ones (e.g. calib.*); they are checked the same way.
    bool has_tensor(const std::string& name) const;
    const TensorView& tensor(const std::string& name) const;  // throws if absent
    std::vector<std::string> tensor_names() const;            // in file order

    // Bit-plane linears. layer in 0..n_layers-1; throws on a bad layer or unknown name.
    const BitPlaneLinear& linear(int64_t layer, LinearKind kind) const;
    const BitPlaneLinear& lm_head() const;                      // "output", (vocab, hidden)
    const BitPlaneLinear& linear(const std::string& name) const;  // "blk.3.ffn_up", "output"
    // All linears: 7 per layer in LinearKind order, then the LM head.
    const std::vector<BitPlaneLinear>& linears() const;

    // Metadata: nullptr if the key is absent.
    const MetaValue* meta(const std::string& key) const;
    std::vector<std::string> meta_keys() const;  // in file order
    // The string value of `key`; throws if absent or not a string.
    const std::string& meta_string(const std::string& key) const;
    // The bytes of a u8 (or i8) array, e.g. flexquant.tokenizer.sp_model; throws if absent or
    // of another type.
    ByteSpan meta_u8_array(const std::string& key) const;

    // Bytes a decode step reads when every linear runs at `bits`: all linears' bytes_at(bits) +
    // one embedding row + all RMSNorm weights. Throws if bits is outside BITS_MIN..max_bits.
    uint64_t bytes_per_token(int bits) const;

private:
    struct Impl;
    explicit ModelFile(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
};

}  // namespace flexquant
