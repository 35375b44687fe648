// flexquant_rt._core: the Python face of the C++ engine.
//
// Thin on purpose: argument conversion and the zero-copy numpy views live here, every check and
// computation lives in the engine (cpp/include/flexquant/*.h). Engine errors (flexquant::Error)
// arrive in Python as FlexquantError, a ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "flexquant/error.h"
#include "flexquant/model_file.h"
// Internal headers of the engine (cpp/src), reached relative to this file.
#include "../src/ops/dequantize.h"
#ifdef FLEXQUANT_HAVE_CUDA
#include "../src/cuda_backend.h"
#endif

namespace py = pybind11;
using flexquant::BitPlaneLinear;
using flexquant::DType;
using flexquant::LinearKind;
using flexquant::MetaType;
using flexquant::MetaValue;
using flexquant::ModelConfig;
using flexquant::ModelFile;
using flexquant::TensorView;

namespace {

using ModelPtr = std::shared_ptr<ModelFile>;

// str or os.PathLike -> std::string
std::string to_path(const py::object& path) {
    return py::str(py::module_::import("os").attr("fspath")(path)).cast<std::string>();
}

// A Python object that owns a reference to the model: the base of every numpy view into the
// mapping, so the mapping outlives the arrays even after the ModelFile object is dropped.
py::capsule model_owner(const ModelPtr& model) {
    return py::capsule(new ModelPtr(model), [](void* p) { delete static_cast<ModelPtr*>(p); });
}

py::dtype numpy_dtype(DType dtype) {
    switch (dtype) {
        case DType::DTYPE_F32: return py::dtype::of<float>();
        case DType::DTYPE_F16: return py::dtype("float16");
        case DType::DTYPE_I8: return py::dtype::of<uint8_t>();  // bit planes are raw bytes
    }
    throw flexquant::Error("unknown dtype");
}

// Zero-copy, read-only numpy view of a tensor (the mapping is read-only: a write would crash).
py::array tensor_array(const ModelPtr& model, const TensorView& t) {
    const py::dtype dt = numpy_dtype(t.dtype);
    std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.end());
    std::vector<py::ssize_t> strides(shape.size());
    py::ssize_t stride = py::ssize_t(flexquant::dtype_size(t.dtype));
    for (size_t i = shape.size(); i-- > 0;) {
        strides[i] = stride;
        stride *= shape[i];
    }
    py::array a(dt, shape, strides, t.data, model_owner(model));
    a.attr("setflags")(py::arg("write") = false);
    return a;
}

py::dict rope_scaling_dict(const flexquant::RopeScaling& rs) {
    py::dict d;
    switch (rs.type) {
        case flexquant::RopeScaling::Type::ROPE_SCALING_NONE: d["type"] = "none"; break;
        case flexquant::RopeScaling::Type::ROPE_SCALING_LINEAR: d["type"] = "linear"; break;
        case flexquant::RopeScaling::Type::ROPE_SCALING_LLAMA3: d["type"] = "llama3"; break;
    }
    d["factor"] = rs.factor;
    d["low_freq_factor"] = rs.low_freq_factor;
    d["high_freq_factor"] = rs.high_freq_factor;
    d["original_context_length"] = rs.original_context_length;
    return d;
}

py::dict config_dict(const ModelConfig& c) {
    py::dict d;
    d["name"] = c.name;
    d["architecture"] = c.architecture;
    d["format_version"] = c.format_version;
    d["max_bits"] = c.max_bits;
    d["group_size"] = c.group_size;
    d["plane_layout"] = c.plane_layout;
    d["context_length"] = c.context_length;
    d["hidden"] = c.hidden;
    d["n_layers"] = c.n_layers;
    d["ffn"] = c.ffn;
    d["n_heads"] = c.n_heads;
    d["n_kv_heads"] = c.n_kv_heads;
    d["head_dim"] = c.head_dim;
    d["vocab"] = c.vocab;
    d["rms_norm_eps"] = c.rms_norm_eps;
    d["rope_theta"] = c.rope_theta;
    d["rope_scaling"] = rope_scaling_dict(c.rope_scaling);
    d["tie_word_embeddings"] = c.tie_word_embeddings;
    d["bos_token_id"] = c.bos_token_id;
    d["eos_token_id"] = c.eos_token_id;
    return d;
}

py::dict linear_dict(const BitPlaneLinear& l) {
    py::dict d;
    d["name"] = l.name;
    d["n"] = l.n;
    d["k"] = l.k;
    d["n_pad"] = l.n_pad;
    d["k_pad"] = l.k_pad;
    d["n_groups"] = l.n_groups;
    d["max_bits"] = l.max_bits;
    d["group_size"] = l.group_size;
    d["plane_bytes"] = l.plane_bytes;
    py::dict bytes_at;
    for (int bits = flexquant::BITS_MIN; bits <= l.max_bits; ++bits) bytes_at[py::int_(bits)] = l.bytes_at(bits);
    d["bytes_at"] = bytes_at;
    return d;
}

py::str decode_utf8(const std::string& s) {
    // GGUF strings should be UTF-8 but come from an untrusted file; surrogateescape keeps any byte
    // sequence round-trippable (s.encode("utf-8", "surrogateescape")) instead of failing.
    PyObject* o = PyUnicode_DecodeUTF8(s.data(), py::ssize_t(s.size()), "surrogateescape");
    if (o == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(o);
}

// Numbers and bools -> int/float/bool; strings -> str; arrays of numbers -> numpy array (a copy);
// other arrays -> list.
py::object meta_to_python(const MetaValue& v) {
    switch (v.type) {
        case MetaType::META_U8: case MetaType::META_U16: case MetaType::META_U32: case MetaType::META_U64:
            return py::int_(v.u);
        case MetaType::META_I8: case MetaType::META_I16: case MetaType::META_I32: case MetaType::META_I64:
            return py::int_(v.i);
        case MetaType::META_F32: case MetaType::META_F64: return py::float_(v.f);
        case MetaType::META_BOOL: return py::bool_(v.b);
        case MetaType::META_STRING: return decode_utf8(v.s);
        case MetaType::META_ARRAY: break;
    }
    if (v.raw == nullptr) {
        py::list items;
        for (const MetaValue& item : v.items) items.append(meta_to_python(item));
        return std::move(items);
    }
    const char* dtype = "u1";
    switch (v.elem_type) {
        case MetaType::META_U8: dtype = "<u1"; break;
        case MetaType::META_I8: dtype = "<i1"; break;
        case MetaType::META_U16: dtype = "<u2"; break;
        case MetaType::META_I16: dtype = "<i2"; break;
        case MetaType::META_U32: dtype = "<u4"; break;
        case MetaType::META_I32: dtype = "<i4"; break;
        case MetaType::META_U64: dtype = "<u8"; break;
        case MetaType::META_I64: dtype = "<i8"; break;
        case MetaType::META_F32: dtype = "<f4"; break;
        case MetaType::META_F64: dtype = "<f8"; break;
        case MetaType::META_BOOL: dtype = "?"; break;
        case MetaType::META_STRING: case MetaType::META_ARRAY: break;
    }
    py::array a(py::dtype(dtype), std::vector<py::ssize_t>{py::ssize_t(v.count)});
    std::memcpy(a.mutable_data(), v.raw, size_t(a.nbytes()));
    return std::move(a);
}

// The dense k-bit view of one linear through `op` (the CPU or the CUDA dequantize).
template <class Op>
py::array_t<float> dequantize_with(const BitPlaneLinear& w, int bits, Op op) {
    w.check_bits(bits);  // before allocating (n, k) floats
    py::array_t<float> out({py::ssize_t(w.n), py::ssize_t(w.k)});
    float* data = out.mutable_data();
    {
        py::gil_scoped_release release;
        op(w, bits, data);
    }
    return out;
}

}  // namespace

void bind_engine(py::module_& m);  // bind_engine.cpp
void bind_text(py::module_& m);    // bind_text.cpp
void bind_ops(py::module_&);

PYBIND11_MODULE(_core, m) {
    m.doc() = "C++ core of flexquant_rt: the .fq model loader and the engine's ops.";

    py::register_exception<flexquant::Error>(m, "FlexquantError", PyExc_ValueError);

    py::enum_<LinearKind>(m, "LinearKind", "The 7 linears of a transformer block, in file order.")
        .value("LINEAR_Q", LinearKind::LINEAR_Q, "blk.{i}.attn_q, (n_heads*head_dim, hidden)")
        .value("LINEAR_K", LinearKind::LINEAR_K, "blk.{i}.attn_k, (n_kv_heads*head_dim, hidden)")
        .value("LINEAR_V", LinearKind::LINEAR_V, "blk.{i}.attn_v, (n_kv_heads*head_dim, hidden)")
        .value("LINEAR_O", LinearKind::LINEAR_O, "blk.{i}.attn_output, (hidden, n_heads*head_dim)")
        .value("LINEAR_GATE", LinearKind::LINEAR_GATE, "blk.{i}.ffn_gate, (ffn, hidden)")
        .value("LINEAR_UP", LinearKind::LINEAR_UP, "blk.{i}.ffn_up, (ffn, hidden)")
        .value("LINEAR_DOWN", LinearKind::LINEAR_DOWN, "blk.{i}.ffn_down, (hidden, ffn)");

    py::class_<ModelFile, ModelPtr>(m, "ModelFile", R"doc(
A validated, memory-mapped flexquant model file (.fq, docs/format.md).

Opening checks the whole file (GGUF structure, flexquant metadata, every required tensor's type
and shape) and raises FlexquantError naming the file and the first problem. Tensors returned by
tensor() are read-only numpy views of the mapping: no copy, and they keep the file mapped.)doc")
        .def(py::init([](const py::object& path) {
                 const std::string p = to_path(path);
                 py::gil_scoped_release release;
                 return ModelFile::open(p);
             }),
             py::arg("path"), "Map and validate the model file at `path` (str or os.PathLike).")
        .def_static(
            "open",
            [](const py::object& path) {
                const std::string p = to_path(path);
                py::gil_scoped_release release;
                return ModelFile::open(p);
            },
            py::arg("path"), "Same as ModelFile(path).")
        .def_property_readonly(
            "config", [](const ModelFile& f) { return config_dict(f.config()); },
            "Validated model config as a new dict: name, architecture, format_version, max_bits, group_size, "
            "plane_layout, context_length, hidden, n_layers, ffn, n_heads, n_kv_heads, head_dim, vocab, "
            "rms_norm_eps, rope_theta, rope_scaling (dict: type 'none'|'linear'|'llama3', factor, "
            "low_freq_factor, high_freq_factor, original_context_length), tie_word_embeddings, "
            "bos_token_id and eos_token_id (-1 when the model has none).")
        .def_property_readonly("path", &ModelFile::path, "The path the file was opened with.")
        .def_property_readonly("file_size", &ModelFile::file_size, "Size of the file in bytes.")
        .def("tensor_names", &ModelFile::tensor_names, "Names of all tensors, in file order.")
        .def("has_tensor", &ModelFile::has_tensor, py::arg("name"), "Whether the file holds tensor `name`.")
        .def(
            "tensor", [](const ModelPtr& f, const std::string& name) { return tensor_array(f, f->tensor(name)); },
            py::arg("name"),
            "Read-only numpy view (no copy) of tensor `name`, shape outermost-first as in docs/format.md. "
            "dtype: float32 (F32), float16 (F16) or uint8 (I8: bit planes are raw bytes). Raises "
            "FlexquantError if there is no such tensor.")
        .def("meta_keys", &ModelFile::meta_keys, "All metadata keys, in file order.")
        .def(
            "meta",
            [](const ModelFile& f, const std::string& key) -> py::object {
                const MetaValue* v = f.meta(key);
                return v == nullptr ? py::none() : meta_to_python(*v);
            },
            py::arg("key"),
            "Metadata value of `key`, or None if absent: int, float, bool, str (undecodable bytes are "
            "kept as surrogate escapes), a numpy array (a copy) for arrays of numbers or bools, a list "
            "for arrays of strings or of arrays.")
        .def(
            "linear_info", [](const ModelFile& f, int64_t layer, LinearKind kind) { return linear_dict(f.linear(layer, kind)); },
            py::arg("layer"), py::arg("kind"),
            "Geometry of a layer's linear as a dict: name, n, k, n_pad, k_pad, n_groups, max_bits, "
            "group_size, plane_bytes, bytes_at ({bits: bytes a matrix-vector product reads}).")
        .def(
            "linear_info", [](const ModelFile& f, const std::string& name) { return linear_dict(f.linear(name)); },
            py::arg("name"), "Same, by tensor prefix: 'blk.3.ffn_up', 'output' (the LM head).")
        .def(
            "lm_head_info", [](const ModelFile& f) { return linear_dict(f.lm_head()); },
            "Geometry of the LM head ('output', (vocab, hidden)), as linear_info.")
        .def(
            "dequantize",
            [](const ModelFile& f, int64_t layer, LinearKind kind, int bits) {
                return dequantize_with(f.linear(layer, kind), bits, flexquant::dequantize_linear);
            },
            py::arg("layer"), py::arg("kind"), py::arg("bits"),
            "The k-bit view W_k of a layer's linear as a new float32 array (n, k), computed by the C++ op "
            "from the first `bits` planes; bit-exact with bitplane.dequantize_planes. bits: 2..max_bits.")
        .def(
            "dequantize",
            [](const ModelFile& f, const std::string& name, int bits) {
                return dequantize_with(f.linear(name), bits, flexquant::dequantize_linear);
            },
            py::arg("name"), py::arg("bits"), "Same, by tensor prefix: 'blk.0.attn_q', 'output'.")
        .def("bytes_per_token", &ModelFile::bytes_per_token, py::arg("bits"),
             "Bytes one decode step reads with every linear at `bits`: all linears' planes and group params, "
             "one embedding row, all norm weights.")
        .def("__repr__", [](const ModelFile& f) {
            const ModelConfig& c = f.config();
            return "<flexquant_rt._core.ModelFile '" + f.path() + "': " + std::to_string(c.n_layers) + " layers, hidden " +
                   std::to_string(c.hidden) + ", vocab " + std::to_string(c.vocab) + ", max_bits " +
                   std::to_string(c.max_bits) + ">";
        });

#ifdef FLEXQUANT_HAVE_CUDA
    void bind_cuda_ops(py::module_&);  // bind_cuda_ops.cpp: the CUDA ops (bitplane_matmul_cuda, ...)
    bind_cuda_ops(m);
    m.def("built_with_cuda", [] { return true; }, "Whether this build includes the CUDA backend.");
    m.def("cuda_available", [] { return flexquant::cuda_device_count() > 0; },
          "Whether the CUDA backend is built and a CUDA device is usable (False without a driver or GPU).");
    m.def(
        "dequantize_cuda",
        [](const ModelFile& f, int64_t layer, LinearKind kind, int bits) {
            return dequantize_with(f.linear(layer, kind), bits, flexquant::dequantize_linear_cuda);
        },
        py::arg("model"), py::arg("layer"), py::arg("kind"), py::arg("bits"),
        "ModelFile.dequantize on the current CUDA device (bit-exact with it). Raises FlexquantError on any CUDA "
        "error, e.g. when no GPU is present.");
    m.def(
        "dequantize_cuda",
        [](const ModelFile& f, const std::string& name, int bits) {
            return dequantize_with(f.linear(name), bits, flexquant::dequantize_linear_cuda);
        },
        py::arg("model"), py::arg("name"), py::arg("bits"), "Same, by tensor prefix: 'blk.0.attn_q', 'output'.");
#else
    m.def("built_with_cuda", [] { return false; }, "Whether this build includes the CUDA backend.");
    m.def("cuda_available", [] { return false; },
          "Whether the CUDA backend is built and a CUDA device is usable (always False: built without CUDA).");
#endif

    // ---- the rest of the module: other parts of the engine ----------------------------------
    // Each part registers its bindings through one function defined in its own file and called
    // here; the declarations go above PYBIND11_MODULE:
    //   void bind_ops(py::module_& m);     // the engine's ops (kernels)
    //   void bind_engine(py::module_& m);  // the decode engine
    //   void bind_text(py::module_& m);    // the native tokenizer and the text layer
    bind_ops(m);
    bind_engine(m);
    bind_text(m);
}
