// Python binding of flexquant::Engine and TokenSampler (called from bindings.cpp).
// Checks dtype/shape of every array argument; all errors surface as FlexquantError (ValueError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "flexquant/engine.h"
#include "../src/kernel_dispatch.h"

namespace py = pybind11;

namespace {

// An Engine that can be closed: every call on a closed engine raises instead of crashing.
struct PyEngine {
    std::unique_ptr<flexquant::Engine> eng;
    std::shared_ptr<const flexquant::ModelFile> model;

    flexquant::Engine& get() {
        if (!eng) throw flexquant::Error("the engine is closed");
        return *eng;
    }
};

const int32_t* int32_vector(const py::array_t<int32_t, py::array::c_style>& a, const char* name, int64_t* n) {
    if (a.ndim() != 1) throw flexquant::Error(std::string(name) + " must be 1-D, got " + std::to_string(a.ndim()) + "-D");
    *n = a.shape(0);
    return a.data();
}

py::list kernel_table_to_py(const std::vector<flexquant::KernelChoice>& t) {
    py::list out;
    for (const auto& c : t) {
        py::dict d;
        d["n"] = c.n;
        d["k"] = c.k;
        d["bits"] = c.bits;
        d["decode_max_m"] = c.decode_max_m;
        // the CUDA kernel fields only where set (a CPU table stays {n, k, bits, decode_max_m})
        if (c.act_bits != 0 || c.mma_min_rows != -1 || !c.gemm.empty() || !c.rejected.empty()) {
            d["act_bits"] = c.act_bits;
            d["mma_min_rows"] = c.mma_min_rows;
            d["gemm"] = c.gemm;
            d["rejected"] = c.rejected;
        }
        out.append(d);
    }
    return out;
}

// d[key] into out when present; a value of the wrong type (a hand-edited or damaged table file)
// is a flexquant::Error naming the entry and the field, not pybind11's bare cast error.
template <class T>
void table_field(const py::dict& d, const char* key, size_t i, T& out) {
    if (!d.contains(key)) return;
    const py::object v = d[key];
    // (integers: any object with __index__, numpy's included, but not bool)
    const bool ok = std::is_same_v<T, std::string> ? py::isinstance<py::str>(v)
                                                   : PyIndex_Check(v.ptr()) && !py::isinstance<py::bool_>(v);
    if (!ok)
        throw flexquant::Error("kernel table entry " + std::to_string(i) + ": '" + key + "' must be " +
                               (std::is_same_v<T, std::string> ? "a str" : "an int") + ", got " +
                               py::repr(v).cast<std::string>());
    try {
        if constexpr (std::is_same_v<T, std::string>)
            out = v.cast<T>();
        else
            out = py::reinterpret_steal<py::int_>(PyNumber_Index(v.ptr())).template cast<T>();
    } catch (const py::cast_error&) {  // an int beyond T's range
        throw flexquant::Error("kernel table entry " + std::to_string(i) + ": '" + key + "' = " +
                               py::repr(v).cast<std::string>() + " is out of range");
    }
}

std::vector<flexquant::KernelChoice> kernel_table_from_py(const std::vector<py::dict>& table) {
    std::vector<flexquant::KernelChoice> t;
    for (size_t i = 0; i < table.size(); ++i) {
        const py::dict& d = table[i];
        for (const char* key : {"n", "k", "bits", "decode_max_m"})
            if (!d.contains(key))
                throw flexquant::Error("kernel table entry " + std::to_string(i) + " has no '" + key + "'");
        flexquant::KernelChoice c;
        table_field(d, "n", i, c.n);
        table_field(d, "k", i, c.k);
        table_field(d, "bits", i, c.bits);
        table_field(d, "decode_max_m", i, c.decode_max_m);
        // the CUDA kernel fields are optional (tables saved before them, CPU tables)
        table_field(d, "act_bits", i, c.act_bits);
        table_field(d, "mma_min_rows", i, c.mma_min_rows);
        table_field(d, "gemm", i, c.gemm);
        table_field(d, "rejected", i, c.rejected);
        t.push_back(c);
    }
    return t;
}

// The CUDA dispatcher's decisions (cpp/src/kernel_dispatch.h) with made-up measurements, for the
// tests: they hold without a GPU.
std::vector<flexquant::dispatch::LinearSlot> slots_from_py(const std::vector<py::dict>& slots) {
    std::vector<flexquant::dispatch::LinearSlot> out;
    for (const py::dict& d : slots) {
        flexquant::dispatch::LinearSlot s;
        s.n = d["n"].cast<int64_t>();
        s.k = d["k"].cast<int64_t>();
        s.act_bits = d["act_bits"].cast<int>();
        s.wgmma_ok = d["wgmma_ok"].cast<bool>();
        s.layer = d["layer"].cast<bool>();
        out.push_back(s);
    }
    return out;
}

void bind_dispatch(py::module_& m) {
    namespace dp = flexquant::dispatch;
    m.attr("DISPATCH_MAX_ROW_ERROR") = dp::MAX_ROW_ERROR;
    m.def(
        "_dispatch_choose",
        [](const std::vector<py::dict>& groups, const std::function<double(size_t, const std::string&, int, int64_t)>& error,
           const std::function<double(const std::vector<size_t>&, const std::string&, int, int64_t)>& time) {
            std::vector<dp::TuneGroup> specs;
            for (const py::dict& g : groups) {
                dp::TuneGroup spec;
                spec.n = g["n"].cast<int64_t>();
                spec.k = g["k"].cast<int64_t>();
                spec.int8 = g["int8"].cast<bool>();
                spec.mma_ok = g["mma_ok"].cast<bool>();
                spec.wgmma_ok = g["wgmma_ok"].cast<bool>();
                spec.bits_min = g["bits_min"].cast<int>();
                spec.bits_max = g["bits_max"].cast<int>();
                spec.max_m = g["max_m"].cast<int64_t>();
                spec.odd_rows = g["odd_rows"].cast<int64_t>();
                spec.all_rows = g["all_rows"].cast<int64_t>();
                specs.push_back(spec);
            }
            // Python exceptions reach choose() as the GPU's do, with the message alone (what() of
            // error_already_set also holds the traceback): FlexquantError from error() as a refusal
            // (the kernel cannot run), anything else as a failure of the measurement.
            const py::object refusal = py::module_::import("flexquant_rt._core").attr("FlexquantError");
            dp::Probe probe;
            probe.error = [&](size_t gi, const std::string& kernel, int bits, int64_t m) {
                try {
                    return error(gi, kernel, bits, m);
                } catch (py::error_already_set& ex) {
                    const std::string msg = py::str(ex.value()).cast<std::string>();
                    if (ex.matches(refusal)) throw dp::Refused(msg);
                    throw flexquant::Error(msg);
                }
            };
            probe.time = [&](const std::vector<size_t>& gs, const std::string& kernel, int bits, int64_t m) {
                try {
                    return time(gs, kernel, bits, m);
                } catch (py::error_already_set& ex) {
                    throw flexquant::Error(py::str(ex.value()).cast<std::string>());
                }
            };
            return kernel_table_to_py(dp::choose(specs, probe));
        },
        py::arg("groups"), py::arg("error"), py::arg("time"),
        "Tests: dispatch::choose (the entries tune() makes) with error(group, kernel, bits, m) and\n"
        "time(groups, kernel, bits, m) -> float given (FlexquantError from error: the kernel cannot run).\n"
        "groups: [{n, k, int8, mma_ok, wgmma_ok, bits_min, bits_max, max_m, odd_rows, all_rows}].");
    m.def(
        "_dispatch_apply",
        [](const std::vector<py::dict>& table, const std::vector<py::dict>& slots, int64_t gemm_min_rows,
           bool wgmma_default, int mma_min_rows) {
            py::list out;
            for (const dp::LinearKernels& l : dp::apply(kernel_table_from_py(table), slots_from_py(slots), gemm_min_rows,
                                                        wgmma_default, mma_min_rows)) {
                py::dict d;
                d["gemv_max"] = std::vector<int64_t>(l.gemv_max.begin(), l.gemv_max.end());
                d["gemm_wg"] = std::vector<bool>(l.gemm_wg.begin(), l.gemm_wg.end());
                d["mma_from"] = l.mma_from;
                out.append(d);
            }
            return out;
        },
        py::arg("table"), py::arg("slots"), py::arg("gemm_min_rows"), py::arg("wgmma_default"), py::arg("mma_min_rows"),
        "Tests: dispatch::apply: per linear slot {n, k, act_bits, wgmma_ok, layer} -> {gemv_max (9,), gemm_wg (9,),\n"
        "mma_from}.");
    m.def(
        "_dispatch_refusal",
        [](const std::vector<py::dict>& table, const std::vector<py::dict>& slots, const std::vector<int>& group_sizes) {
            return dp::refusal(kernel_table_from_py(table), slots_from_py(slots),
                               [&](size_t j) { return group_sizes.at(j); });
        },
        py::arg("table"), py::arg("slots"), py::arg("group_sizes"),
        "Tests: dispatch::refusal ('' when the table can run on these linears, else why not).");
}

}  // namespace

void bind_engine(py::module_& m) {
    bind_dispatch(m);
    py::class_<PyEngine>(m, "Engine",
                         "The C++ engine: forward pass, KV cache and bit mask. Use flexquant_rt.Engine, "
                         "which adds tokenization, chat and the generation loop.")
        .def(py::init([](const std::string& path, int64_t n_ctx, int threads, const std::string& kv_dtype, const std::string& backend,
                         int max_bits, bool cuda_fp32_matmul, bool cuda_graph, int n_seq, int64_t cuda_gemm_min_rows,
                         int cuda_mma_min_rows, const std::string& cpu_activations) {
                 flexquant::EngineParams p;
                 if (cpu_activations == "i16") p.cpu_activations = flexquant::CpuActivations::ACT_I16;
                 else if (cpu_activations == "f32") p.cpu_activations = flexquant::CpuActivations::ACT_F32;
                 else if (cpu_activations == "i8") p.cpu_activations = flexquant::CpuActivations::ACT_I8;
                 else throw flexquant::Error("cpu_activations = '" + cpu_activations + "': expected 'i16', 'f32' or 'i8'");
                 p.n_ctx = n_ctx;
                 p.n_threads = threads;
                 if (kv_dtype == "auto") p.kv_dtype = flexquant::KvDType::KV_AUTO;
                 else if (kv_dtype == "f32") p.kv_dtype = flexquant::KvDType::KV_F32;
                 else if (kv_dtype == "f16") p.kv_dtype = flexquant::KvDType::KV_F16;
                 else if (kv_dtype == "q8") p.kv_dtype = flexquant::KvDType::KV_Q8;
                 else throw flexquant::Error("kv_dtype = '" + kv_dtype + "': expected 'auto', 'f32', 'f16' or 'q8'");
                 if (backend == "auto") p.backend = flexquant::Backend::BACKEND_AUTO;
                 else if (backend == "cpu") p.backend = flexquant::Backend::BACKEND_CPU;
                 else if (backend == "cuda") p.backend = flexquant::Backend::BACKEND_CUDA;
                 else throw flexquant::Error("backend = '" + backend + "': expected 'auto', 'cpu' or 'cuda'");
                 p.max_bits = max_bits;
                 p.cuda_fp32_matmul = cuda_fp32_matmul;
                 p.cuda_graph = cuda_graph;
                 p.n_seq = n_seq;
                 p.cuda_gemm_min_rows = cuda_gemm_min_rows;
                 p.cuda_mma_min_rows = cuda_mma_min_rows;
                 auto* e = new PyEngine;
                 {
                     py::gil_scoped_release nogil;  // the CUDA backend uploads the weights here
                     e->eng = flexquant::Engine::open(path, p);
                 }
                 e->model = e->eng->model();
                 return e;
             }),
             py::arg("path"), py::arg("n_ctx") = 0, py::arg("threads") = 0, py::arg("kv_dtype") = "auto",
             py::arg("backend") = "cpu", py::arg("max_bits") = 0, py::arg("cuda_fp32_matmul") = false,
             py::arg("cuda_graph") = true, py::arg("n_seq") = 1, py::arg("cuda_gemm_min_rows") = 64,
             py::arg("cuda_mma_min_rows") = 0, py::arg("cpu_activations") = "i16",
             "Open a model file. n_ctx=0: the model's context capped by a 4 GiB KV budget (shared by the n_seq\n"
             "sequences); threads=0: all cores; n_seq: sequences held, each with its own KV cache (decode_batch).\n"
             "kv_dtype: the KV cache, 'f32', 'f16', 'q8' (CPU: int8 codes, a scale per 32) or 'auto' (fp16 on\n"
             "the CPU, fp32 on CUDA).\n"
             "backend: 'cpu', 'cuda' or 'auto'; max_bits: the highest bit-width allowed (0 = the file's); the\n"
             "CUDA backend uploads only that many planes. cuda_fp32_matmul: fp32 activations in the CUDA GEMV\n"
             "(accuracy reference) instead of int8 on the binary tensor cores; cuda_graph: replay decode steps;\n"
             "cuda_gemm_min_rows: prompt passes (up to 256 tokens) of at least this many tokens run on the\n"
             "tensor-core GEMM (same int8 activations), 0 = the GEMV only, in passes of 8. cuda_mma_min_rows:\n"
             "GEMV launches of at least this many rows (1..16) run on the s8 tensor cores with the codes decoded\n"
             "in registers, 16 rows per launch (group sizes 128/256/512), 0 = never. cpu_activations (CPU):\n"
             "'i16' rounds each linear's input per group to int16 (the SIMD kernels multiply integers), 'i8'\n"
             "to int8 on every decoder linear (activation bits 8: vpdpbusd on VNNI CPUs), 'f32' multiplies it as\n"
             "given (the accuracy reference).")
        .def_property_readonly("backend", [](PyEngine& e) {
            return e.get().backend() == flexquant::Backend::BACKEND_CUDA ? "cuda" : "cpu";
        }, "Where the forward pass runs: 'cpu' or 'cuda'.")
        .def_property_readonly("backend_note", [](PyEngine& e) { return e.get().backend_note(); },
                               "Why an asked-for CUDA backend is not used ('' when it is, or was not asked for).")
        .def_property_readonly("max_bits", [](PyEngine& e) { return e.get().max_bits(); },
                               "The highest bit-width this engine runs (its max_bits, or the file's).")
        .def_property_readonly("kv_dtype", [](PyEngine& e) {
            const flexquant::KvDType t = e.get().kv_dtype();
            return t == flexquant::KvDType::KV_F16 ? "f16" : t == flexquant::KvDType::KV_Q8 ? "q8" : "f32";
        }, "The KV cache's element type: 'f16', 'f32' or 'q8' (kv_dtype 'auto' resolved).")
        .def_property_readonly("cpu_activations", [](PyEngine& e) {
            const flexquant::CpuActivations a = e.get().cpu_activations();
            return a == flexquant::CpuActivations::ACT_I16 ? "i16" : a == flexquant::CpuActivations::ACT_I8 ? "i8" : "f32";
        }, "What the CPU's bit-plane matmuls multiply: 'i16', 'i8' or 'f32' activations.")
        .def_property_readonly("device_bytes", [](PyEngine& e) { return e.get().device_bytes(); },
                               "GPU memory held by the CUDA backend (0 on the CPU).")
        .def("close", [](PyEngine& e) { e.eng.reset(); }, "Free the KV cache and the model mapping.")
        .def_property_readonly("closed", [](const PyEngine& e) { return !e.eng; })
        .def_property_readonly("model", [](PyEngine& e) {
            e.get();
            return std::const_pointer_cast<flexquant::ModelFile>(e.model);
        }, "The ModelFile the engine runs.")
        .def_property_readonly("n_ctx", [](PyEngine& e) { return e.get().n_ctx(); })
        .def_property_readonly("n_past", [](PyEngine& e) { return e.get().n_past(); })
        .def_property_readonly("n_seq", [](PyEngine& e) { return e.get().n_seq(); })
        .def("n_past_seq", [](PyEngine& e, int seq) { return e.get().n_past_seq(seq); }, py::arg("seq"),
             "Tokens in sequence seq's KV cache.")
        .def("reset_seq", [](PyEngine& e, int seq) { e.get().reset_seq(seq); }, py::arg("seq"),
             "Empty sequence seq's KV cache.")
        .def("eval_seq",
             [](PyEngine& e, int seq, const py::array_t<int32_t, py::array::c_style>& tokens) {
                 auto& eng = e.get();
                 int64_t n;
                 const int32_t* p = int32_vector(tokens, "tokens", &n);
                 py::gil_scoped_release nogil;
                 eng.eval_seq(seq, p, n);
             },
             py::arg("seq"), py::arg("tokens"),
             "Append tokens (int32, 1-D) to sequence seq; logits() and signals() are then its next-token ones.")
        .def("decode_batch",
             [](PyEngine& e, const py::array_t<int32_t, py::array::c_style>& seqs,
                const py::array_t<int32_t, py::array::c_style>& tokens) {
                 auto& eng = e.get();
                 int64_t n, nt;
                 const int32_t* ps = int32_vector(seqs, "seqs", &n);
                 const int32_t* pt = int32_vector(tokens, "tokens", &nt);
                 if (n != nt)
                     throw flexquant::Error("decode_batch: " + std::to_string(n) + " sequences but " + std::to_string(nt) +
                                            " tokens");
                 const int64_t V = eng.config().vocab;
                 py::array_t<float> logits({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(V)});
                 py::array_t<float> entropy(static_cast<py::ssize_t>(n)), top1(static_cast<py::ssize_t>(n));
                 std::vector<flexquant::StepSignals> sig(static_cast<size_t>(std::max<int64_t>(n, 0)));
                 float* dst = logits.mutable_data();
                 {
                     py::gil_scoped_release nogil;
                     eng.decode_batch(ps, pt, n, dst, sig.data());
                 }
                 for (int64_t i = 0; i < n; ++i) {
                     entropy.mutable_data()[i] = sig[i].entropy;
                     top1.mutable_data()[i] = sig[i].top1_prob;
                 }
                 return py::make_tuple(logits, entropy, top1);
             },
             py::arg("seqs"), py::arg("tokens"),
             "One decode step of several sequences: tokens[i] (int32) appended to sequence seqs[i] (distinct),\n"
             "as one batched pass. Returns (logits (n, vocab), entropy (n,), top1_prob (n,)).")
        .def("tune_kernels",
             [](PyEngine& e, int64_t max_m, int repeats) {
                 auto& eng = e.get();
                 std::vector<flexquant::KernelChoice> t;
                 {
                     py::gil_scoped_release nogil;
                     t = eng.tune_kernels(max_m, repeats);
                 }
                 return kernel_table_to_py(t);
             },
             py::arg("max_m") = 16, py::arg("repeats") = 3,
             "Time the kernel families per linear shape, bit-width and m rows (CPU: decode against GEMM, m = 1..max_m;\n"
             "CUDA: the GEMV against the tensor-core GEMM, m = 16, 32, .. max(max_m, 16), and which GEMV and GEMM\n"
             "kernels, among those that agree with the reference on this GPU); apply and return the table:\n"
             "[{'n', 'k', 'bits', 'decode_max_m'}] (decode kernels / GEMV up to decode_max_m rows, GEMM above; on CUDA\n"
             "also 'act_bits', 'mma_min_rows', 'gemm', 'rejected').")
        .def("set_kernel_table",
             [](PyEngine& e, const std::vector<py::dict>& table) {
                 const std::vector<flexquant::KernelChoice> t = kernel_table_from_py(table);
                 e.get().set_kernel_table(t);
             },
             py::arg("table"), "Apply a kernel table (as tune_kernels returns).")
        .def("kernel_table", [](PyEngine& e) { return kernel_table_to_py(e.get().kernel_table()); },
             "The kernel table in effect ([] = the default: on the CPU decode kernels up to 6 rows on int16 or int8\n"
             "activations with AVX-512 or AVX2 + GFNI, up to 4 otherwise; on CUDA the GEMM from cuda_gemm_min_rows rows).")
        .def("bytes_per_token_at",
             [](PyEngine& e, const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& bits) {
                 if (bits.ndim() != 1) throw flexquant::Error("bits must be 1-D (n_layers * 7 + 1,)");
                 return e.get().bytes_per_token_at(bits.data(), bits.size());
             },
             py::arg("bits"), "Weight bytes a decode step reads at these bits (n_layers * 7 + 1,), the LM head last.")
        .def_property("threads", [](PyEngine& e) { return e.get().n_threads(); },
                      [](PyEngine& e, int n) { e.get().set_threads(n); })
        .def("set_activation_bits",
             [](PyEngine& e, const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& bits) {
                 if (bits.ndim() != 1) throw flexquant::Error("activation bits must be 1-D (n_layers * 7 + 1,) or (1,)");
                 e.get().set_activation_bits(bits.data(), bits.size());
             },
             py::arg("bits"),
             "Activation bit-width per linear, (n_layers * 7 + 1,) or (1,): 0 = int16 on the CPU ('i16' and 'i8'\n"
             "engines; fp32 on 'f32' ones), 2..8 = symmetric integers per weight group (8: the int8 kernels, the\n"
             "CUDA tensor-core GEMV's int8), 16 = fp16. The CUDA backend takes 8 (int8, its default), 16 (fp16,\n"
             "the f16 GEMV; group sizes 128/256/512) or 0 (the fp32 GEMV) per linear.")
        .def_property_readonly("activation_bits", [](PyEngine& e) { return e.get().activation_bits(); })
        .def("set_layer_bits",
             [](PyEngine& e, const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& mask) {
                 auto& eng = e.get();
                 const int64_t L = eng.config().n_layers;
                 const bool ok = (mask.ndim() == 1 && mask.shape(0) == L) ||
                                 (mask.ndim() == 2 && mask.shape(0) == L && mask.shape(1) == 7);
                 if (!ok) {
                     std::string shape = "(";
                     for (py::ssize_t i = 0; i < mask.ndim(); ++i) shape += (i ? ", " : "") + std::to_string(mask.shape(i));
                     shape += mask.ndim() == 1 ? ",)" : ")";
                     throw flexquant::Error("mask has shape " + shape + "; expected (" + std::to_string(L) + ",) or (" +
                                            std::to_string(L) + ", 7) (q, k, v, o, gate, up, down)");
                 }
                 eng.set_layer_bits(mask.data(), mask.size());
             },
             py::arg("mask"), "Per-layer bit-widths, (n_layers,) or (n_layers, 7), values in 2..max_bits.")
        .def("set_lm_head_bits", [](PyEngine& e, int b) { e.get().set_lm_head_bits(b); }, py::arg("bits"))
        .def("layer_bits", [](PyEngine& e) {
            auto& eng = e.get();
            auto v = eng.layer_bits();
            py::array_t<int32_t> out({static_cast<py::ssize_t>(eng.config().n_layers), py::ssize_t(7)});
            std::copy(v.begin(), v.end(), out.mutable_data());
            return out;
        }, "The current mask, (n_layers, 7).")
        .def_property_readonly("lm_head_bits", [](PyEngine& e) { return e.get().lm_head_bits(); })
        .def("bytes_per_token", [](PyEngine& e) { return e.get().bytes_per_token(); },
             "Weight bytes a decode step reads under the current mask.")
        .def("eval",
             [](PyEngine& e, const py::array_t<int32_t, py::array::c_style>& tokens) {
                 auto& eng = e.get();
                 int64_t n;
                 const int32_t* p = int32_vector(tokens, "tokens", &n);
                 py::gil_scoped_release nogil;
                 eng.eval(p, n);
             },
             py::arg("tokens"), "Append tokens (int32, 1-D) to the sequence; keeps only the last logits.")
        .def("forward",
             [](PyEngine& e, const py::array_t<int32_t, py::array::c_style>& tokens, bool all_logits) {
                 auto& eng = e.get();
                 int64_t n;
                 const int32_t* p = int32_vector(tokens, "tokens", &n);
                 const int64_t V = eng.config().vocab;
                 py::array_t<float> out({static_cast<py::ssize_t>(all_logits ? n : 1), static_cast<py::ssize_t>(V)});
                 float* dst = out.mutable_data();
                 {
                     py::gil_scoped_release nogil;
                     eng.eval(p, n, all_logits ? dst : nullptr);
                     if (!all_logits) std::copy(eng.logits().begin(), eng.logits().end(), dst);
                 }
                 return out;
             },
             py::arg("tokens"), py::arg("all_logits") = true,
             "Append tokens and return logits: (T, vocab) for every position, or (1, vocab) for the last.")
        .def("logits", [](PyEngine& e) {
            const auto& v = e.get().logits();
            py::array_t<float> out(static_cast<py::ssize_t>(v.size()));
            std::copy(v.begin(), v.end(), out.mutable_data());
            return out;
        }, "Next-token logits (vocab,) after the last eval.")
        .def("signals", [](PyEngine& e) {
            auto s = e.get().signals();
            return py::make_tuple(s.entropy, s.top1_prob);
        }, "(entropy in nats, top-1 probability) of the last step's next-token distribution.")
        .def("reset", [](PyEngine& e) { e.get().reset(); }, "Empty the KV cache.")
        .def("set_precision_rules",
             [](PyEngine& e, int bits_min, int bits_max,
                const std::vector<py::array_t<float, py::array::c_style | py::array::forcecast>>& cost, double lambda) {
                 auto& eng = e.get();
                 std::vector<std::vector<float>> tables;
                 tables.reserve(cost.size());
                 for (size_t j = 0; j < cost.size(); ++j) {
                     if (cost[j].ndim() != 2)
                         throw flexquant::Error("cost[" + std::to_string(j) + "] must be 2-D (levels, K), got " +
                                                std::to_string(cost[j].ndim()) + "-D");
                     tables.emplace_back(cost[j].data(), cost[j].data() + cost[j].size());
                 }
                 eng.set_precision_rules(bits_min, bits_max, tables, lambda);
             },
             py::arg("bits_min"), py::arg("bits_max"), py::arg("cost"), py::arg("lambda_"),
             "In-step rules: each linear runs at argmin_k Σ_i cost[j][k - bits_min, i] h_i² + λ n k. cost: one "
             "float32 (levels, K) array per linear (n_layers * 7 in q k v o gate up down order, then the LM head).")
        .def("set_rule_lambda", [](PyEngine& e, double l) { e.get().set_rule_lambda(l); }, py::arg("lambda_"))
        .def("clear_precision_rules", [](PyEngine& e) { e.get().clear_precision_rules(); })
        .def_property_readonly("has_precision_rules", [](PyEngine& e) { return e.get().has_precision_rules(); })
        .def("last_bits", [](PyEngine& e) {
            auto v = e.get().last_bits();
            py::array_t<int32_t> out(static_cast<py::ssize_t>(v.size()));
            std::copy(v.begin(), v.end(), out.mutable_data());
            return out;
        }, "Bits each linear ran at in the last eval: (n_layers * 7 + 1,), the LM head last.")
        .def("last_bytes_per_token", [](PyEngine& e) { return e.get().last_bytes_per_token(); })
        .def("collect_input_energy", [](PyEngine& e, bool on) { e.get().collect_input_energy(on); }, py::arg("enable"),
             "Start (and clear) or stop accumulating Σ_t h_i² of every linear's input.")
        .def("input_energy", [](PyEngine& e) {
            auto& eng = e.get();
            py::list out;
            const auto& en = eng.input_energy();
            const auto& rows = eng.input_energy_rows();
            for (size_t j = 0; j < en.size(); ++j) {
                py::array_t<double> a(static_cast<py::ssize_t>(en[j].size()));
                std::copy(en[j].begin(), en[j].end(), a.mutable_data());
                out.append(py::make_tuple(a, rows[j]));
            }
            return out;
        }, "Per linear: (Σ_t h_i² as float64 (K,), rows accumulated).");

    py::class_<flexquant::TokenSampler>(m, "Sampler", "Seeded sampler over an Engine's last logits.")
        .def(py::init([](float temperature, int64_t top_k, float top_p, float min_p, float repetition_penalty,
                         uint64_t seed) {
                 flexquant::Sampling s;
                 s.temperature = temperature;
                 s.top_k = top_k;
                 s.top_p = top_p;
                 s.min_p = min_p;
                 s.repetition_penalty = repetition_penalty;
                 return new flexquant::TokenSampler(s, seed);
             }),
             py::arg("temperature") = 0.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f, py::arg("min_p") = 0.0f,
             py::arg("repetition_penalty") = 1.0f, py::arg("seed") = 0)
        .def("sample",
             [](flexquant::TokenSampler& s, PyEngine& e, const py::array_t<int32_t, py::array::c_style>& history) {
                 auto& eng = e.get();
                 int64_t n;
                 const int32_t* p = int32_vector(history, "history", &n);
                 return s.sample(eng, p, n);
             },
             py::arg("engine"), py::arg("history"), "Draw the next token id from the engine's last logits.")
        .def("sample_logits",
             [](flexquant::TokenSampler& s, const py::array_t<float, py::array::c_style>& logits,
                const py::array_t<int32_t, py::array::c_style>& history) {
                 if (logits.ndim() != 1)
                     throw flexquant::Error("logits must be 1-D (vocab,), got " + std::to_string(logits.ndim()) + "-D");
                 int64_t n;
                 const int32_t* p = int32_vector(history, "history", &n);
                 return s.sample_logits(logits.data(), logits.shape(0), p, n);
             },
             py::arg("logits"), py::arg("history"), "Draw the next token id from a logits row (vocab,) float32.");
}
