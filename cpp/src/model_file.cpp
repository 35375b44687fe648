// ModelFile: memory-map a .fq file and validate it (docs/format.md) before anything reads it.
//
// The file is untrusted input: every read goes through Reader, which checks it against the file
// length, and every size is computed with overflow checks, so a malformed file ends in a
// flexquant::Error, never in an out-of-bounds read. Once open() returns, the pointers in
// TensorView / BitPlaneLinear are known to be in bounds and the engine reads them unchecked.
#include "flexquant/model_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <system_error>
#include <type_traits>
#include <unordered_map>
#include <utility>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "flexquant reads little-endian GGUF files in place and needs a little-endian host"
#endif

namespace flexquant {

namespace {

constexpr uint32_t GGUF_VERSION = 3;
constexpr uint64_t GGUF_DEFAULT_ALIGNMENT = 32;
constexpr uint32_t GGUF_MAX_DIMS = 4;
// Nested metadata arrays recurse; a hostile file must not be able to exhaust the stack.
constexpr int META_MAX_DEPTH = 8;
// Sanity limits on config values: far above any real model, far below overflow.
constexpr int64_t LIMIT_DIM = int64_t(1) << 20;
constexpr int64_t LIMIT_VOCAB = int64_t(1) << 24;
constexpr int64_t LIMIT_CONTEXT = int64_t(1) << 28;

// GGML tensor type codes this format uses (ggml.h: GGML_TYPE_F32, _F16, _I8).
constexpr uint32_t GGML_TYPE_F32 = 0;
constexpr uint32_t GGML_TYPE_F16 = 1;
constexpr uint32_t GGML_TYPE_I8 = 24;

// File-order stems of the per-layer linears, indexed by LinearKind.
const char* const LINEAR_STEMS[LINEARS_PER_LAYER] = {
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};

// Numbers for messages. Not through an ostream: its output follows the global C++ locale (digit
// grouping), and the message must read the same in every host program.
template <class T>
std::string str(T v) {
    if constexpr (std::is_floating_point_v<T>) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%g", double(v));
        return buf;
    } else {
        return std::to_string(v);
    }
}

std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + str(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
}

// Bytes as a readable quoted string (magic numbers, names from a hostile file).
std::string printable(const uint8_t* p, size_t n) {
    std::string s;
    for (size_t i = 0; i < n; ++i) {
        if (p[i] >= 0x20 && p[i] < 0x7f) {
            s += char(p[i]);
        } else {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", p[i]);
            s += buf;
        }
    }
    return s;
}

// A name or value taken from the file, quoted for a message: non-printable bytes escaped (a
// message must stay valid text: Python decodes it as UTF-8) and very long strings cut.
std::string quoted(const std::string& s) {
    constexpr size_t max_len = 160;
    const size_t n = std::min(s.size(), max_len);
    return "'" + printable(reinterpret_cast<const uint8_t*>(s.data()), n) + (s.size() > n ? "...'" : "'");
}

// Strict UTF-8 (as Python decodes it: no overlong forms, no surrogates, at most U+10FFFF). Keys
// and tensor names must pass: the API hands them out as text.
bool valid_utf8(const std::string& s) {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    const size_t n = s.size();
    for (size_t i = 0; i < n;) {
        const unsigned c = p[i];
        if (c < 0x80) {
            ++i;
            continue;
        }
        size_t len;
        uint32_t cp, min_cp;
        if ((c & 0xe0) == 0xc0) {
            len = 2, cp = c & 0x1f, min_cp = 0x80;
        } else if ((c & 0xf0) == 0xe0) {
            len = 3, cp = c & 0x0f, min_cp = 0x800;
        } else if ((c & 0xf8) == 0xf0) {
            len = 4, cp = c & 0x07, min_cp = 0x10000;
        } else {
            return false;
        }
        if (n - i < len) return false;
        for (size_t k = 1; k < len; ++k) {
            if ((p[i + k] & 0xc0) != 0x80) return false;
            cp = cp << 6 | (p[i + k] & 0x3f);
        }
        if (cp < min_cp || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
        i += len;
    }
    return true;
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
    if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return true;
    *out = a * b;
    return false;
}

// Bytes of one fixed-size GGUF value, 0 for string and array.
uint64_t meta_scalar_size(MetaType t) {
    switch (t) {
        case MetaType::META_U8: case MetaType::META_I8: case MetaType::META_BOOL: return 1;
        case MetaType::META_U16: case MetaType::META_I16: return 2;
        case MetaType::META_U32: case MetaType::META_I32: case MetaType::META_F32: return 4;
        case MetaType::META_U64: case MetaType::META_I64: case MetaType::META_F64: return 8;
        case MetaType::META_STRING: case MetaType::META_ARRAY: return 0;
    }
    return 0;
}

bool meta_type_known(uint32_t code) { return code <= uint32_t(MetaType::META_F64); }

// Decode one fixed-size scalar from (possibly unaligned) little-endian bytes.
MetaValue decode_scalar(MetaType t, const uint8_t* p) {
    MetaValue v;
    v.type = t;
    auto load = [p](auto x) { std::memcpy(&x, p, sizeof x); return x; };
    switch (t) {
        case MetaType::META_U8: v.u = load(uint8_t()); break;
        case MetaType::META_I8: v.i = load(int8_t()); break;
        case MetaType::META_U16: v.u = load(uint16_t()); break;
        case MetaType::META_I16: v.i = load(int16_t()); break;
        case MetaType::META_U32: v.u = load(uint32_t()); break;
        case MetaType::META_I32: v.i = load(int32_t()); break;
        case MetaType::META_U64: v.u = load(uint64_t()); break;
        case MetaType::META_I64: v.i = load(int64_t()); break;
        case MetaType::META_F32: v.f = load(float()); break;
        case MetaType::META_F64: v.f = load(double()); break;
        case MetaType::META_BOOL: v.b = load(uint8_t()) != 0; break;
        case MetaType::META_STRING: case MetaType::META_ARRAY: break;
    }
    return v;
}

// Read-only memory mapping of a whole file; unmapped on destruction.
class Mapping {
public:
    Mapping() = default;
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;
    ~Mapping() {
        if (addr_ != nullptr) munmap(addr_, size_);
    }

    void map(const std::string& path) {
        auto fail = [&](const std::string& what) {
            throw Error(path + ": " + what + ": " + std::system_category().message(errno));
        };
        int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) fail("cannot open");
        struct stat st;
        if (fstat(fd, &st) != 0) {
            int e = errno;
            ::close(fd);
            errno = e;
            fail("cannot stat");
        }
        if (!S_ISREG(st.st_mode)) {
            ::close(fd);
            throw Error(path + ": not a regular file");
        }
        if (st.st_size == 0) {
            ::close(fd);
            throw Error(path + ": the file is empty, not a GGUF file");
        }
        size_ = size_t(st.st_size);
        void* addr = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        int e = errno;
        ::close(fd);  // the mapping keeps the file referenced
        if (addr == MAP_FAILED) {
            errno = e;
            fail("cannot mmap " + str(size_) + " bytes");
        }
        addr_ = addr;
    }

    const uint8_t* data() const { return static_cast<const uint8_t*>(addr_); }
    uint64_t size() const { return size_; }

private:
    void* addr_ = nullptr;
    size_t size_ = 0;
};

// Bounds-checked sequential reader over the mapping.
class Reader {
public:
    Reader(const uint8_t* base, uint64_t size, const std::string& path)
        : base_(base), size_(size), path_(path) {}

    [[noreturn]] void fail(const std::string& msg) const { throw Error(path_ + ": " + msg); }

    uint64_t pos() const { return pos_; }
    uint64_t remaining() const { return size_ - pos_; }

    // The next n bytes, for `what` (+ " (detail)"); the message says where the file ran out. The
    // message is only built on failure: a tokenizer's vocabulary is hundreds of thousands of reads.
    const uint8_t* take(uint64_t n, const std::string& what, const char* detail = nullptr) {
        if (n > remaining())
            fail("truncated file: " + what + (detail ? std::string(" (") + detail + ")" : std::string()) +
                 " needs " + str(n) + " bytes at offset " + str(pos_) + ", the file has " + str(size_) + " bytes");
        const uint8_t* p = base_ + pos_;
        pos_ += n;
        return p;
    }

    template <class T>
    T read(const std::string& what, const char* detail = nullptr) {
        T v;
        std::memcpy(&v, take(sizeof v, what, detail), sizeof v);
        return v;
    }

    std::string read_string(const std::string& what) {
        const uint64_t len = read<uint64_t>(what, "string length");
        const uint8_t* p = take(len, what, "string");
        return std::string(reinterpret_cast<const char*>(p), size_t(len));
    }

private:
    const uint8_t* base_;
    uint64_t size_;
    uint64_t pos_ = 0;
    const std::string& path_;
};

MetaValue read_meta_value(Reader& r, MetaType type, const std::string& what, int depth) {
    if (type == MetaType::META_STRING) {
        MetaValue v;
        v.type = type;
        v.s = r.read_string(what);
        return v;
    }
    if (type != MetaType::META_ARRAY) {
        const uint8_t* p = r.take(meta_scalar_size(type), what);
        if (type == MetaType::META_BOOL && *p > 1)
            r.fail(what + " is a bool of value " + str(int(*p)) + " (must be 0 or 1)");
        return decode_scalar(type, p);
    }
    if (depth >= META_MAX_DEPTH)
        r.fail(what + " nests arrays deeper than " + str(META_MAX_DEPTH) + " levels");
    MetaValue v;
    v.type = MetaType::META_ARRAY;
    const uint32_t code = r.read<uint32_t>(what, "array element type");
    if (!meta_type_known(code)) r.fail(what + " is an array of unknown value type " + str(code));
    v.elem_type = MetaType(code);
    v.count = r.read<uint64_t>(what, "array length");
    const uint64_t esize = meta_scalar_size(v.elem_type);
    if (esize != 0) {
        // Numbers stay in the mapping; only the length is checked (overflow-safe).
        if (v.count > r.remaining() / esize)
            r.fail("truncated file: " + what + " is an array of " + str(v.count) + " " +
                   meta_type_name(v.elem_type) + " at offset " + str(r.pos()) +
                   ", more than the " + str(r.remaining()) + " bytes left in the file");
        v.raw = r.take(v.count * esize, what);
        if (v.elem_type == MetaType::META_BOOL) {
            for (uint64_t i = 0; i < v.count; ++i)
                if (v.raw[i] > 1)
                    r.fail(what + " element " + str(i) + " is a bool of value " + str(int(v.raw[i])) +
                           " (must be 0 or 1)");
        }
        return v;
    }
    // Strings take at least their 8-byte length, arrays their 4-byte type + 8-byte length: a
    // count the file cannot possibly hold is refused before anything is allocated for it.
    const uint64_t min_size = v.elem_type == MetaType::META_STRING ? 8 : 12;
    if (v.count > r.remaining() / min_size)
        r.fail("truncated file: " + what + " claims " + str(v.count) + " " +
               meta_type_name(v.elem_type) + " elements at offset " + str(r.pos()) + ", more than the " +
               str(r.remaining()) + " bytes left in the file can hold");
    v.items.reserve(size_t(v.count));
    for (uint64_t i = 0; i < v.count; ++i)
        v.items.push_back(read_meta_value(r, v.elem_type, what, depth + 1));
    return v;
}

}  // namespace

// ---- small public helpers -----------------------------------------------------------------------

int dtype_size(DType dtype) {
    switch (dtype) {
        case DType::DTYPE_F32: return 4;
        case DType::DTYPE_F16: return 2;
        case DType::DTYPE_I8: return 1;
    }
    return 0;
}

const char* dtype_name(DType dtype) {
    switch (dtype) {
        case DType::DTYPE_F32: return "F32";
        case DType::DTYPE_F16: return "F16";
        case DType::DTYPE_I8: return "I8";
    }
    return "?";
}

const char* linear_kind_name(LinearKind kind) {
    const int i = int(kind);
    return i >= 0 && i < LINEARS_PER_LAYER ? LINEAR_STEMS[i] : "?";
}

const char* meta_type_name(MetaType type) {
    static const char* const names[] = {"u8",  "i8",  "u16",    "i16",   "u32", "i32", "f32",
                                        "bool", "string", "array", "u64", "i64", "f64"};
    const uint32_t i = uint32_t(type);
    return i < sizeof names / sizeof names[0] ? names[i] : "?";
}

void BitPlaneLinear::check_bits(int bits) const {
    if (bits < BITS_MIN || bits > max_bits)
        throw Error(name + ": bit-width " + str(bits) + " is outside " + str(BITS_MIN) + ".." +
                    str(max_bits));
}

uint64_t BitPlaneLinear::bytes_at(int bits) const {
    check_bits(bits);
    return uint64_t(bits) * plane_bytes + uint64_t(n) * uint64_t(n_groups) * 4;
}

bool MetaValue::is_integer() const {
    switch (type) {
        case MetaType::META_U8: case MetaType::META_I8: case MetaType::META_U16:
        case MetaType::META_I16: case MetaType::META_U32: case MetaType::META_I32:
        case MetaType::META_U64: case MetaType::META_I64: return true;
        default: return false;
    }
}

bool MetaValue::is_float() const { return type == MetaType::META_F32 || type == MetaType::META_F64; }

MetaValue MetaValue::at(uint64_t index) const {
    if (type != MetaType::META_ARRAY) throw Error(std::string("MetaValue::at on a ") + meta_type_name(type));
    if (index >= count)
        throw Error("MetaValue::at: index " + str(index) + " out of range for an array of " + str(count));
    if (raw == nullptr) return items[size_t(index)];
    return decode_scalar(elem_type, raw + index * meta_scalar_size(elem_type));
}

// ---- ModelFile ----------------------------------------------------------------------------------

struct ModelFile::Impl {
    std::string path;
    Mapping mapping;
    std::vector<std::pair<std::string, MetaValue>> meta;
    std::unordered_map<std::string, size_t> meta_index;
    std::vector<TensorView> tensors;
    std::unordered_map<std::string, size_t> tensor_index;
    ModelConfig config;
    std::vector<BitPlaneLinear> linears;  // 7 per layer, then the LM head
    std::unordered_map<std::string, size_t> linear_index;

    [[noreturn]] void fail(const std::string& msg) const { throw Error(path + ": " + msg); }

    void parse_gguf();
    void parse_config();
    void check_tensors();

    // -- metadata access for validation: each failure names the key and the value --
    const MetaValue* find(const std::string& key) const {
        auto it = meta_index.find(key);
        return it == meta_index.end() ? nullptr : &meta[it->second].second;
    }
    const MetaValue& require(const std::string& key) const {
        const MetaValue* v = find(key);
        if (v == nullptr) fail("missing metadata key " + quoted(key));
        return *v;
    }
    int64_t int_of(const std::string& key, const MetaValue& v) const {
        if (!v.is_integer())
            fail("metadata key " + quoted(key) + " has type " + meta_type_name(v.type) + ", expected an integer");
        const bool is_unsigned = v.type == MetaType::META_U8 || v.type == MetaType::META_U16 ||
                                 v.type == MetaType::META_U32 || v.type == MetaType::META_U64;
        if (!is_unsigned) return v.i;
        if (v.u > uint64_t(std::numeric_limits<int64_t>::max()))
            fail("metadata key " + quoted(key) + " value " + str(v.u) + " is out of range");
        return int64_t(v.u);
    }
    int64_t get_int(const std::string& key, int64_t lo, int64_t hi) const {
        const int64_t x = int_of(key, require(key));
        if (x < lo || x > hi)
            fail("metadata key " + quoted(key) + " is " + str(x) + ", expected " + str(lo) + ".." + str(hi));
        return x;
    }
    float get_positive_float(const std::string& key) const {
        const MetaValue& v = require(key);
        if (!v.is_float())
            fail("metadata key " + quoted(key) + " has type " + meta_type_name(v.type) + ", expected f32");
        const float x = float(v.f);
        if (!(std::isfinite(x) && x > 0.0f))
            fail("metadata key " + quoted(key) + " is " + str(v.f) + ", expected a finite value > 0");
        return x;
    }
    const std::string& get_string(const std::string& key) const {
        const MetaValue& v = require(key);
        if (v.type != MetaType::META_STRING)
            fail("metadata key " + quoted(key) + " has type " + meta_type_name(v.type) + ", expected string");
        return v.s;
    }

    const TensorView& expect_tensor(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                                    bool or_f32 = false) const;
};

ModelFile::ModelFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ModelFile::~ModelFile() = default;

std::shared_ptr<ModelFile> ModelFile::open(const std::string& path) {
    auto impl = std::make_unique<Impl>();
    impl->path = path;
    impl->mapping.map(path);
    impl->parse_gguf();
    impl->parse_config();
    impl->check_tensors();
    return std::shared_ptr<ModelFile>(new ModelFile(std::move(impl)));
}

void ModelFile::Impl::parse_gguf() {
    Reader r(mapping.data(), mapping.size(), path);
    const uint64_t file_size = mapping.size();

    // header: magic, version, tensor count, kv count
    if (file_size < 4 || std::memcmp(mapping.data(), "GGUF", 4) != 0)
        fail("not a GGUF file (magic '" + printable(mapping.data(), size_t(std::min<uint64_t>(file_size, 4))) +
             "', expected 'GGUF')");
    r.take(4, "the GGUF magic");
    const uint32_t version = r.read<uint32_t>("the GGUF header", "version");
    if (version != GGUF_VERSION)
        fail("unsupported GGUF version " + str(version) + " (only version " + str(GGUF_VERSION) + " is supported)");
    const uint64_t n_tensors = r.read<uint64_t>("the GGUF header", "tensor count");
    const uint64_t n_kv = r.read<uint64_t>("the GGUF header", "metadata count");

    // metadata: each entry is at least key length (8) + value type (4) bytes
    if (n_kv > r.remaining() / 12)
        fail("truncated file: the header declares " + str(n_kv) + " metadata entries, more than the " +
             str(r.remaining()) + " bytes left can hold");
    meta.reserve(size_t(n_kv));
    for (uint64_t i = 0; i < n_kv; ++i) {
        std::string key = r.read_string("metadata entry #" + str(i) + " key");
        const std::string what = "metadata key " + quoted(key);
        if (!valid_utf8(key)) fail(what + " is not valid UTF-8");
        const uint32_t code = r.read<uint32_t>(what, "value type");
        if (!meta_type_known(code)) fail(what + " has unknown value type " + str(code));
        MetaValue value = read_meta_value(r, MetaType(code), what, 0);
        if (!meta_index.emplace(key, meta.size()).second) fail("duplicate metadata key " + quoted(key));
        meta.emplace_back(std::move(key), std::move(value));
    }

    uint64_t alignment = GGUF_DEFAULT_ALIGNMENT;
    if (const MetaValue* a = find("general.alignment")) {
        const int64_t x = int_of("general.alignment", *a);
        if (x <= 0 || (x & (x - 1)) != 0)
            fail("general.alignment " + str(x) + " is not a power of two");
        alignment = uint64_t(x);
    }

    // tensor infos: each is at least name length (8) + n_dims (4) + one dim (8) + type (4) +
    // offset (8) bytes
    if (n_tensors > r.remaining() / 32)
        fail("truncated file: the header declares " + str(n_tensors) + " tensors, more than the " +
             str(r.remaining()) + " bytes left can hold");
    std::vector<uint64_t> offsets;
    tensors.reserve(size_t(n_tensors));
    offsets.reserve(size_t(n_tensors));
    for (uint64_t i = 0; i < n_tensors; ++i) {
        TensorView t;
        t.name = r.read_string("tensor info #" + str(i) + " name");
        const std::string what = "tensor " + quoted(t.name);
        if (t.name.empty()) fail("tensor info #" + str(i) + " has an empty name");
        if (!valid_utf8(t.name)) fail(what + " name is not valid UTF-8");
        const uint32_t n_dims = r.read<uint32_t>(what, "dimension count");
        if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
            fail(what + " has " + str(n_dims) + " dimensions (1.." + str(GGUF_MAX_DIMS) + " allowed)");
        uint64_t n_elements = 1;
        t.shape.assign(n_dims, 0);
        for (uint32_t d = 0; d < n_dims; ++d) {
            const uint64_t dim = r.read<uint64_t>(what, "dimensions");
            if (dim == 0) fail(what + " has a zero dimension");
            if (dim > uint64_t(std::numeric_limits<int64_t>::max()) || mul_overflows(n_elements, dim, &n_elements))
                fail(what + " dimension " + str(d) + " is " + str(dim) + ": the element count overflows");
            t.shape[n_dims - 1 - d] = int64_t(dim);  // GGUF lists the innermost dimension first
        }
        const uint32_t type = r.read<uint32_t>(what, "type");
        switch (type) {
            case GGML_TYPE_F32: t.dtype = DType::DTYPE_F32; break;
            case GGML_TYPE_F16: t.dtype = DType::DTYPE_F16; break;
            case GGML_TYPE_I8: t.dtype = DType::DTYPE_I8; break;
            default:
                fail(what + " has unsupported type " + str(type) + " (only F32=0, F16=1, I8=24)");
        }
        if (mul_overflows(n_elements, uint64_t(dtype_size(t.dtype)), &t.nbytes))
            fail(what + " of shape " + shape_str(t.shape) + ": the byte size overflows");
        offsets.push_back(r.read<uint64_t>(what, "offset"));
        if (!tensor_index.emplace(t.name, tensors.size()).second) fail("duplicate tensor name " + quoted(t.name));
        tensors.push_back(std::move(t));
    }

    // data section: starts at the next multiple of the alignment
    const uint64_t pad = (alignment - r.pos() % alignment) % alignment;
    if (n_tensors == 0) return;
    if (pad > r.remaining())
        fail("truncated file: the tensor data section would start at offset " + str(r.pos() + pad) +
             ", past the end of the file (" + str(file_size) + " bytes)");
    const uint64_t data_start = r.pos() + pad;
    const uint64_t data_size = file_size - data_start;
    for (size_t i = 0; i < tensors.size(); ++i) {
        TensorView& t = tensors[i];
        const uint64_t off = offsets[i];
        const std::string what = "tensor " + quoted(t.name);
        if (off % alignment != 0)
            fail(what + " offset " + str(off) + " is not a multiple of the alignment " + str(alignment));
        if (off > data_size || t.nbytes > data_size - off)
            fail(what + " offset " + str(off) + " (in the data section at " + str(data_start) + ") + size " +
                 str(t.nbytes) + " exceeds the file (" + str(file_size) + " bytes)");
        // With a tiny general.alignment a tensor could land on an odd address; the engine reads
        // F16/F32 through typed pointers.
        if ((data_start + off) % uint64_t(dtype_size(t.dtype)) != 0)
            fail(what + " at file offset " + str(data_start + off) + " is not aligned to its " +
                 str(dtype_size(t.dtype)) + "-byte elements");
        t.data = mapping.data() + data_start + off;
    }
}

void ModelFile::Impl::parse_config() {
    ModelConfig& c = config;

    // The version comes first: a future version may change every other key.
    const MetaValue* version = find("flexquant.format_version");
    if (version == nullptr) fail("not a flexquant model file: missing metadata key 'flexquant.format_version'");
    const int64_t v = int_of("flexquant.format_version", *version);
    if (v != FORMAT_VERSION)
        fail("unsupported flexquant.format_version " + str(v) + " (this reader knows version " +
             str(FORMAT_VERSION) + ")");
    c.format_version = int(v);

    c.architecture = get_string("general.architecture");
    if (c.architecture != "llama")
        fail("general.architecture is " + quoted(c.architecture) + ", expected 'llama'");
    if (find("general.name")) c.name = get_string("general.name");

    c.max_bits = int(get_int("flexquant.max_bits", BITS_MIN, BITS_MAX));
    c.group_size = int(get_int("flexquant.group_size", 32, LIMIT_DIM));
    if (c.group_size % 32 != 0)
        fail("flexquant.group_size " + str(c.group_size) + " is not a multiple of 32");
    c.plane_layout = get_string("flexquant.plane_layout");
    if (c.plane_layout != "tc8x512")
        fail("unknown flexquant.plane_layout " + quoted(c.plane_layout) + " (expected 'tc8x512')");

    c.context_length = get_int("llama.context_length", 1, LIMIT_CONTEXT);
    c.hidden = get_int("llama.embedding_length", 1, LIMIT_DIM);
    c.n_layers = get_int("llama.block_count", 1, LIMIT_DIM);
    c.ffn = get_int("llama.feed_forward_length", 1, LIMIT_DIM);
    c.n_heads = get_int("llama.attention.head_count", 1, LIMIT_DIM);
    c.n_kv_heads = get_int("llama.attention.head_count_kv", 1, LIMIT_DIM);
    c.head_dim = get_int("llama.attention.key_length", 1, LIMIT_DIM);
    c.vocab = get_int("llama.vocab_size", 1, LIMIT_VOCAB);
    if (c.n_heads % c.n_kv_heads != 0)
        fail("llama.attention.head_count " + str(c.n_heads) + " is not a multiple of head_count_kv " +
             str(c.n_kv_heads));
    c.rms_norm_eps = get_positive_float("llama.attention.layer_norm_rms_epsilon");
    c.rope_theta = get_positive_float("llama.rope.freq_base");

    RopeScaling& rs = c.rope_scaling;
    const std::string rope_type =
        find("flexquant.rope_scaling.type") ? get_string("flexquant.rope_scaling.type") : "none";
    if (rope_type == "none") {
        rs.type = RopeScaling::Type::ROPE_SCALING_NONE;
    } else if (rope_type == "linear") {
        rs.type = RopeScaling::Type::ROPE_SCALING_LINEAR;
        rs.factor = get_positive_float("flexquant.rope_scaling.factor");
    } else if (rope_type == "llama3") {
        rs.type = RopeScaling::Type::ROPE_SCALING_LLAMA3;
        rs.factor = get_positive_float("flexquant.rope_scaling.factor");
        rs.low_freq_factor = get_positive_float("flexquant.rope_scaling.low_freq_factor");
        rs.high_freq_factor = get_positive_float("flexquant.rope_scaling.high_freq_factor");
        rs.original_context_length = get_int("flexquant.rope_scaling.original_context_length", 1, LIMIT_CONTEXT);
        // llama3 scaling divides by (high - low) to blend the two frequency bands.
        if (!(rs.high_freq_factor > rs.low_freq_factor))
            fail("flexquant.rope_scaling.high_freq_factor " + str(rs.high_freq_factor) +
                 " must exceed low_freq_factor " + str(rs.low_freq_factor));
    } else {
        fail("unknown flexquant.rope_scaling.type " + quoted(rope_type) + " (expected none, linear or llama3)");
    }

    if (const MetaValue* tie = find("flexquant.tie_word_embeddings")) {
        if (tie->type != MetaType::META_BOOL)
            fail(std::string("metadata key 'flexquant.tie_word_embeddings' has type ") + meta_type_name(tie->type) +
                 ", expected bool");
        c.tie_word_embeddings = tie->b;
    }
    if (find("tokenizer.ggml.bos_token_id")) c.bos_token_id = get_int("tokenizer.ggml.bos_token_id", 0, c.vocab - 1);
    if (find("tokenizer.ggml.eos_token_id")) c.eos_token_id = get_int("tokenizer.ggml.eos_token_id", 0, c.vocab - 1);
}

const TensorView& ModelFile::Impl::expect_tensor(const std::string& name, DType dtype,
                                                 const std::vector<int64_t>& shape, bool or_f32) const {
    auto it = tensor_index.find(name);
    if (it == tensor_index.end()) fail("missing tensor " + quoted(name));
    const TensorView& t = tensors[it->second];
    if (t.dtype != dtype && !(or_f32 && t.dtype == DType::DTYPE_F32))
        fail("tensor " + quoted(name) + " has type " + dtype_name(t.dtype) + ", expected " + dtype_name(dtype) +
             (or_f32 ? " or F32" : ""));
    if (t.shape != shape)
        fail("tensor " + quoted(name) + " has shape " + shape_str(t.shape) + ", expected " + shape_str(shape));
    return t;
}

void ModelFile::Impl::check_tensors() {
    const ModelConfig& c = config;
    const int64_t D = c.hidden, F = c.ffn, V = c.vocab;
    const int64_t q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;  // < 2^40

    expect_tensor("token_embd.weight", DType::DTYPE_F16, {V, D}, /*or_f32=*/true);
    expect_tensor("output_norm.weight", DType::DTYPE_F32, {D});

    auto add_linear = [&](const std::string& prefix, int64_t n, int64_t k) {
        BitPlaneLinear l;
        l.name = prefix;
        l.n = n;
        l.k = k;
        l.n_pad = (n + 7) / 8 * 8;
        l.k_pad = (k + 127) / 128 * 128;
        l.n_groups = (k + c.group_size - 1) / c.group_size;
        l.max_bits = c.max_bits;
        l.group_size = c.group_size;
        // n_pad * k_pad < 2^64 for any config that passed the limits, but a shape check must not
        // be fooled by a wrapped product.
        uint64_t bits = 0;
        if (mul_overflows(uint64_t(l.n_pad), uint64_t(l.k_pad), &bits) || bits / 8 > uint64_t(std::numeric_limits<int64_t>::max()))
            fail("linear " + quoted(prefix) + " of " + str(n) + " x " + str(k) + " is too large");
        l.plane_bytes = bits / 8;
        const TensorView& planes =
            expect_tensor(prefix + ".planes", DType::DTYPE_I8, {int64_t(c.max_bits), int64_t(l.plane_bytes)});
        const TensorView& qparams = expect_tensor(prefix + ".qparams", DType::DTYPE_F16, {n, l.n_groups, 2});
        l.planes = static_cast<const uint8_t*>(planes.data);
        l.qparams = static_cast<const uint16_t*>(qparams.data);
        linear_index.emplace(prefix, linears.size());
        linears.push_back(std::move(l));
    };

    linears.reserve(size_t(c.n_layers * LINEARS_PER_LAYER + 1));
    for (int64_t i = 0; i < c.n_layers; ++i) {
        const std::string blk = "blk." + str(i) + ".";
        expect_tensor(blk + "attn_norm.weight", DType::DTYPE_F32, {D});
        expect_tensor(blk + "ffn_norm.weight", DType::DTYPE_F32, {D});
        // (N, K) per LinearKind, docs/format.md
        const int64_t nk[LINEARS_PER_LAYER][2] = {
            {q_dim, D}, {kv_dim, D}, {kv_dim, D}, {D, q_dim}, {F, D}, {F, D}, {D, F}};
        for (int kind = 0; kind < LINEARS_PER_LAYER; ++kind)
            add_linear(blk + LINEAR_STEMS[kind], nk[kind][0], nk[kind][1]);
    }
    add_linear("output", V, D);
}

// ---- accessors ----------------------------------------------------------------------------------

const ModelConfig& ModelFile::config() const { return impl_->config; }
const std::string& ModelFile::path() const { return impl_->path; }
uint64_t ModelFile::file_size() const { return impl_->mapping.size(); }

bool ModelFile::has_tensor(const std::string& name) const { return impl_->tensor_index.count(name) != 0; }

const TensorView& ModelFile::tensor(const std::string& name) const {
    auto it = impl_->tensor_index.find(name);
    if (it == impl_->tensor_index.end()) impl_->fail("no tensor named " + quoted(name));
    return impl_->tensors[it->second];
}

std::vector<std::string> ModelFile::tensor_names() const {
    std::vector<std::string> names;
    names.reserve(impl_->tensors.size());
    for (const TensorView& t : impl_->tensors) names.push_back(t.name);
    return names;
}

const BitPlaneLinear& ModelFile::linear(int64_t layer, LinearKind kind) const {
    const int k = int(kind);
    if (layer < 0 || layer >= impl_->config.n_layers)
        impl_->fail("layer " + str(layer) + " is outside 0.." + str(impl_->config.n_layers - 1));
    if (k < 0 || k >= LINEARS_PER_LAYER) impl_->fail("unknown linear kind " + str(k));
    return impl_->linears[size_t(layer * LINEARS_PER_LAYER + k)];
}

const BitPlaneLinear& ModelFile::lm_head() const { return impl_->linears.back(); }

const BitPlaneLinear& ModelFile::linear(const std::string& name) const {
    auto it = impl_->linear_index.find(name);
    if (it == impl_->linear_index.end())
        impl_->fail("no linear named " + quoted(name) + " (expected 'blk.{i}.attn_q' ... 'blk.{i}.ffn_down' or 'output')");
    return impl_->linears[it->second];
}

const std::vector<BitPlaneLinear>& ModelFile::linears() const { return impl_->linears; }

const MetaValue* ModelFile::meta(const std::string& key) const { return impl_->find(key); }

std::vector<std::string> ModelFile::meta_keys() const {
    std::vector<std::string> keys;
    keys.reserve(impl_->meta.size());
    for (const auto& kv : impl_->meta) keys.push_back(kv.first);
    return keys;
}

const std::string& ModelFile::meta_string(const std::string& key) const { return impl_->get_string(key); }

ByteSpan ModelFile::meta_u8_array(const std::string& key) const {
    const MetaValue& v = impl_->require(key);
    if (v.type != MetaType::META_ARRAY ||
        (v.elem_type != MetaType::META_U8 && v.elem_type != MetaType::META_I8))
        impl_->fail("metadata key " + quoted(key) + " has type " + meta_type_name(v.type) +
                    (v.type == MetaType::META_ARRAY ? std::string(" of ") + meta_type_name(v.elem_type) : "") +
                    ", expected an array of u8");
    return ByteSpan{v.raw, v.count};
}

uint64_t ModelFile::bytes_per_token(int bits) const {
    const ModelConfig& c = impl_->config;
    if (bits < BITS_MIN || bits > c.max_bits)
        impl_->fail("bit-width " + str(bits) + " is outside " + str(BITS_MIN) + ".." + str(c.max_bits));
    uint64_t total = 0;
    for (const BitPlaneLinear& l : impl_->linears) total += l.bytes_at(bits);
    total += uint64_t(c.hidden) * uint64_t(dtype_size(tensor("token_embd.weight").dtype));  // one row
    total += uint64_t(2 * c.n_layers + 1) * uint64_t(c.hidden) * 4;                         // RMSNorm weights
    return total;
}

}  // namespace flexquant
