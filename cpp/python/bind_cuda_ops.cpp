// Python bindings of the CUDA ops (cuda/*.cu) on numpy arrays, for tests and benchmarks.
// Compiled only when CMake built the CUDA backend; bindings.cpp calls bind_cuda_ops(m) inside its
// FLEXQUANT_HAVE_CUDA block, so these names exist on _core exactly when _core.built_with_cuda().
//
// Arguments follow _core.ops.bitplane_matmul (the CPU op): every array must already have the
// stated dtype and be C-contiguous (nothing is cast or copied silently); shapes are checked and the
// error names the argument. The GIL is released while the GPU works. Errors from the op (bad
// sizes, CUDA errors, no GPU) raise FlexquantError (a ValueError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../../cuda/bitplane_matmul.cuh"
#include "array_checks.h"
#include "cuda_backend.h"
#include "flexquant/error.h"

namespace py = pybind11;
using flexquant::BitplaneCudaPath;
using flexquant::BitplaneLinear;
using flexquant_py::expect_dim;
using flexquant_py::require;
using flexquant_py::shape_str;
using F32 = py::array_t<float, py::array::c_style>;

namespace {

BitplaneCudaPath parse_path(const std::string& s) {
    if (s == "auto") return flexquant::BITPLANE_CUDA_AUTO;
    if (s == "tc") return flexquant::BITPLANE_CUDA_TC;
    if (s == "fp32") return flexquant::BITPLANE_CUDA_FP32;
    if (s == "mma") return flexquant::BITPLANE_CUDA_MMA;
    if (s == "mma_a16") return flexquant::BITPLANE_CUDA_MMA_A16;
    throw py::value_error("path: expected 'auto', 'tc', 'mma', 'mma_a16' or 'fp32', got '" + s + "'");
}

const char* path_name(BitplaneCudaPath p) {
    switch (p) {
        case flexquant::BITPLANE_CUDA_TC: return "tc";
        case flexquant::BITPLANE_CUDA_MMA: return "mma";
        case flexquant::BITPLANE_CUDA_MMA_A16: return "mma_a16";
        default: return "fp32";
    }
}

// The linear (host pointers into the numpy arrays) after checking planes and qparams.
BitplaneLinear linear_view(const py::array& planes, const py::array& qparams, int64_t n, int64_t k, int max_bits,
                           int group_size, int bits) {
    if (!planes.dtype().is(py::dtype::of<uint8_t>()))
        throw py::type_error("planes: expected dtype uint8, got " + std::string(py::str(planes.dtype())));
    if (!(planes.flags() & py::array::c_style)) throw py::value_error("planes: must be C-contiguous");
    if (planes.ndim() != 2) throw py::value_error("planes: expected shape (>= bits, plane_bytes), got " + shape_str(planes));
    if (planes.shape(0) < bits)
        throw py::value_error("planes: holds " + std::to_string(planes.shape(0)) + " planes, bits=" + std::to_string(bits) +
                              " needs that many");
    if (qparams.itemsize() != 2 || (qparams.dtype().kind() != 'f' && qparams.dtype().kind() != 'u'))
        throw py::type_error("qparams: expected dtype float16 (or its uint16 bits), got " +
                             std::string(py::str(qparams.dtype())));
    if (!(qparams.flags() & py::array::c_style)) throw py::value_error("qparams: must be C-contiguous");
    if (group_size <= 0) throw py::value_error("group_size: must be positive, got " + std::to_string(group_size));
    BitplaneLinear w;
    w.n = n;
    w.k = k;
    w.max_bits = max_bits;
    w.group_size = group_size;
    const std::string qshape = "(" + std::to_string(n) + ", " + std::to_string(w.n_groups()) + ", 2)";
    if (qparams.ndim() != 3 || qparams.shape(0) != n || qparams.shape(1) != w.n_groups() || qparams.shape(2) != 2)
        throw py::value_error("qparams: expected shape " + qshape + ", got " + shape_str(qparams));
    w.planes = static_cast<const uint8_t*>(planes.data());
    w.plane_bytes = uint64_t(planes.shape(1));
    w.qparams = static_cast<const uint16_t*>(qparams.data());
    return w;
}

// x as float32 (m, k) or (k,); returns m.
int64_t activation_rows(const py::array& x, int64_t k) {
    if (!x.dtype().is(py::dtype::of<float>()))
        throw py::type_error("x: expected dtype float32, got " + std::string(py::str(x.dtype())));
    if (!(x.flags() & py::array::c_style)) throw py::value_error("x: must be C-contiguous");
    if (!(x.ndim() == 1 || x.ndim() == 2) || x.shape(x.ndim() - 1) != k)
        throw py::value_error("x: expected shape (m, " + std::to_string(k) + ") or (" + std::to_string(k) + ",), got " +
                              shape_str(x));
    return x.ndim() == 1 ? 1 : x.shape(0);
}

// y0 (None, or float32 of x's row shape with n columns): the start of an accumulating product.
const float* start_rows(const py::object& y0, const py::array& x, int64_t m, int64_t n) {
    if (y0.is_none()) return nullptr;
    const py::array a = py::cast<py::array>(y0);
    if (!a.dtype().is(py::dtype::of<float>()))
        throw py::type_error("y0: expected dtype float32, got " + std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style)) throw py::value_error("y0: must be C-contiguous");
    const bool ok = x.ndim() == 1 ? (a.ndim() == 1 && a.shape(0) == n)
                                  : (a.ndim() == 2 && a.shape(0) == m && a.shape(1) == n);
    if (!ok)
        throw py::value_error("y0: expected shape " + (x.ndim() == 1 ? "(" + std::to_string(n) + ",)"
                                                                     : "(" + std::to_string(m) + ", " + std::to_string(n) + ")") +
                              ", got " + shape_str(a));
    return static_cast<const float*>(a.data());
}

py::array_t<float> py_bitplane_matmul_cuda(const py::array& planes, const py::array& qparams, int64_t n, int64_t k,
                                           int max_bits, int group_size, int bits, const py::array& x,
                                           const std::string& path, int warps, const py::object& y0, int prefetch) {
    const BitplaneLinear w = linear_view(planes, qparams, n, k, max_bits, group_size, bits);
    const int64_t m = activation_rows(x, k);
    const BitplaneCudaPath p = parse_path(path);
    const float* y0p = start_rows(y0, x, m, n);
    py::array_t<float> y = x.ndim() == 1 ? py::array_t<float>({n}) : py::array_t<float>({m, n});
    const float* xp = static_cast<const float*>(x.data());
    float* yp = y.mutable_data();
    flexquant::BitplaneCudaTuning tuning;
    tuning.warps_per_block = warps;
    tuning.prefetch = prefetch;
    {
        py::gil_scoped_release nogil;
        flexquant::bitplane_matmul_cuda(w, bits, xp, m, yp, p, tuning, y0p);
    }
    return y;
}

py::tuple py_bitplane_matmul_fused_cuda(const py::array& planes, const py::array& qparams, int64_t n, int64_t k,
                                        int max_bits, int group_size, int bits, const py::array& x,
                                        const std::string& op, const py::array& aux, float eps,
                                        const std::string& path) {
    const BitplaneLinear w = linear_view(planes, qparams, n, k, max_bits, group_size, bits);
    const BitplaneCudaPath p = parse_path(path);
    if (x.ndim() != 2) throw py::value_error("x: expected shape (m, " + std::to_string(k) + "), got " + shape_str(x));
    const int64_t m = activation_rows(x, k);
    flexquant::BitplanePrepareFusion fo;
    if (op == "rms_norm")
        fo = flexquant::BITPLANE_FUSE_RMS_NORM;
    else if (op == "swiglu")
        fo = flexquant::BITPLANE_FUSE_SWIGLU;
    else
        throw py::value_error("op: expected 'rms_norm' or 'swiglu', got '" + op + "'");
    const std::string ashape = fo == flexquant::BITPLANE_FUSE_RMS_NORM
                                   ? "(" + std::to_string(k) + ",)"
                                   : "(" + std::to_string(m) + ", " + std::to_string(k) + ")";
    F32 aa = require<float>(aux, "aux", fo == flexquant::BITPLANE_FUSE_RMS_NORM ? 1 : 2, ashape.c_str());
    if (fo == flexquant::BITPLANE_FUSE_RMS_NORM) {
        expect_dim(aa, 0, k, "aux", ashape);
    } else {
        expect_dim(aa, 0, m, "aux", ashape);
        expect_dim(aa, 1, k, "aux", ashape);
    }
    F32 y({m, n}), out({m, k});
    const float* xp = static_cast<const float*>(x.data());
    float* yp = y.mutable_data();
    float* op_out = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        flexquant::bitplane_matmul_fused_cuda(w, bits, fo, xp, aa.data(), eps, m, yp, op_out, p);
    }
    return py::make_tuple(y, out);
}

py::list py_bitplane_matmul_multi_cuda(const py::list& planes, const py::list& qparams, const py::list& ns_list,
                                       int64_t k, int max_bits, int group_size, const py::list& bits_list,
                                       const py::array& x, const std::string& path, int warps, int prefetch) {
    std::vector<int64_t> ns;
    std::vector<int> bits;
    for (const auto& v : ns_list) ns.push_back(v.cast<int64_t>());
    for (const auto& v : bits_list) bits.push_back(v.cast<int>());
    const size_t count = ns.size();
    if (planes.size() != count || qparams.size() != count || bits.size() != count)
        throw py::value_error("planes, qparams, ns and bits: expected one entry per linear, got " +
                              std::to_string(planes.size()) + ", " + std::to_string(qparams.size()) + ", " +
                              std::to_string(count) + ", " + std::to_string(bits.size()));
    if (x.ndim() != 2) throw py::value_error("x: expected shape (m, " + std::to_string(k) + "), got " + shape_str(x));
    const int64_t m = activation_rows(x, k);
    std::vector<BitplaneLinear> ws;
    std::vector<py::array> keep;  // the views point into these arrays
    std::vector<py::array_t<float>> ys;
    std::vector<float*> yp;
    for (size_t i = 0; i < count; ++i) {
        if (!py::isinstance<py::array>(planes[i]) || !py::isinstance<py::array>(qparams[i]))
            throw py::type_error("planes[" + std::to_string(i) + "], qparams[" + std::to_string(i) +
                                 "]: expected numpy arrays");
        keep.push_back(py::reinterpret_borrow<py::array>(planes[i]));
        keep.push_back(py::reinterpret_borrow<py::array>(qparams[i]));
        ws.push_back(linear_view(keep[2 * i], keep[2 * i + 1], ns[i], k, max_bits, group_size, bits[i]));
        ys.push_back(py::array_t<float>({m, ns[i]}));
        yp.push_back(ys.back().mutable_data());
    }
    const BitplaneCudaPath p = parse_path(path);
    const float* xp = static_cast<const float*>(x.data());
    {
        py::gil_scoped_release nogil;
        flexquant::BitplaneCudaTuning tuning;
        tuning.warps_per_block = warps;
        tuning.prefetch = prefetch;
        flexquant::bitplane_matmul_multi_cuda(ws.data(), bits.data(), int(count), xp, m, yp.data(), p, tuning);
    }
    py::list out;
    for (auto& y : ys) out.append(y);
    return out;
}

py::dict py_bitplane_matmul_cuda_bench(const py::array& planes, const py::array& qparams, int64_t n, int64_t k,
                                       int max_bits, int group_size, int bits, const py::array& x,
                                       const std::string& path, int copies, int reps, int warps, int prefetch) {
    const BitplaneLinear w = linear_view(planes, qparams, n, k, max_bits, group_size, bits);
    const int64_t m = activation_rows(x, k);
    const BitplaneCudaPath p = flexquant::bitplane_cuda_resolve_path(w, parse_path(path));
    const float* xp = static_cast<const float*>(x.data());
    flexquant::BitplaneCudaTiming t;
    {
        py::gil_scoped_release nogil;
        flexquant::BitplaneCudaTuning tuning;
        tuning.warps_per_block = warps;
        tuning.prefetch = prefetch;
        t = flexquant::bitplane_matmul_cuda_bench(w, bits, xp, m, p, copies, reps, tuning);
    }
    py::dict d;
    d["path"] = path_name(p);
    d["matmul_us"] = t.matmul_us;
    d["matmul_min_us"] = t.matmul_min_us;
    d["prepare_us"] = t.prepare_us;
    d["total_us"] = t.total_us;
    d["copies"] = t.copies;
    d["launches"] = t.launches;
    d["warps_per_block"] = t.warps_per_block;
    d["prefetch"] = t.prefetch;
    d["bytes"] = uint64_t(bits) * w.plane_bytes + uint64_t(n) * uint64_t(w.n_groups()) * 4;
    return d;
}

flexquant::BitplaneGemmKind parse_kind(const std::string& s) {
    if (s == "a8") return flexquant::BITPLANE_GEMM_A8;
    if (s == "a16") return flexquant::BITPLANE_GEMM_A16;
    if (s == "b1") return flexquant::BITPLANE_GEMM_B1;
    if (s == "a8_wg") return flexquant::BITPLANE_GEMM_A8_WG;
    throw py::value_error("kind: expected 'a8', 'a16', 'b1' or 'a8_wg', got '" + s + "'");
}

py::array_t<float> py_bitplane_gemm_cuda(const py::array& planes, const py::array& qparams, int64_t n, int64_t k,
                                         int max_bits, int group_size, int bits, const py::array& x,
                                         const std::string& kind, int act_bits, const py::object& y0) {
    const BitplaneLinear w = linear_view(planes, qparams, n, k, max_bits, group_size, bits);
    const int64_t m = activation_rows(x, k);
    const flexquant::BitplaneGemmKind kd = parse_kind(kind);
    const float* y0p = start_rows(y0, x, m, n);
    py::array_t<float> y = x.ndim() == 1 ? py::array_t<float>({n}) : py::array_t<float>({m, n});
    const float* xp = static_cast<const float*>(x.data());
    float* yp = y.mutable_data();
    {
        py::gil_scoped_release nogil;
        flexquant::bitplane_gemm_cuda(w, bits, xp, m, yp, kd, act_bits, y0p);
    }
    return y;
}

py::array_t<int8_t> py_bitplane_unpack_codes_cuda(const py::array& planes, const py::array& qparams, int64_t n,
                                                  int64_t k, int max_bits, int group_size, int bits) {
    const BitplaneLinear w = linear_view(planes, qparams, n, k, max_bits, group_size, bits);
    const int64_t k_pad = (k + 127) / 128 * 128;
    py::array_t<int8_t> codes({n, k_pad});
    int8_t* cp = codes.mutable_data();
    {
        py::gil_scoped_release nogil;
        flexquant::bitplane_unpack_codes_cuda(w, bits, cp);
    }
    return codes;
}

py::dict py_bitplane_gemm_cuda_bench(const py::array& planes, const py::array& qparams, int64_t n, int64_t k,
                                     int max_bits, int group_size, int bits, const py::array& x,
                                     const std::string& kind, int reps, int act_bits) {
    const BitplaneLinear w = linear_view(planes, qparams, n, k, max_bits, group_size, bits);
    const int64_t m = activation_rows(x, k);
    const flexquant::BitplaneGemmKind kd = parse_kind(kind);
    const float* xp = static_cast<const float*>(x.data());
    flexquant::BitplaneGemmTiming t;
    {
        py::gil_scoped_release nogil;
        t = flexquant::bitplane_gemm_cuda_bench(w, bits, xp, m, kd, reps, act_bits);
    }
    py::dict d;
    d["kind"] = kind;
    d["act_bits"] = act_bits;
    d["unpack_us"] = t.unpack_us;
    d["prepare_us"] = t.prepare_us;
    d["gemm_us"] = t.gemm_us;
    d["total_us"] = t.total_us;
    d["copies"] = t.copies;
    return d;
}


F32 py_rms_norm_cuda(const py::array& x, const py::array& w, float eps) {
    F32 xa = require<float>(x, "x", 2, "(m, d)");
    const int64_t m = xa.shape(0), d = xa.shape(1);
    F32 wa = require<float>(w, "w", 1, "(d,)");
    expect_dim(wa, 0, d, "w", "(" + std::to_string(d) + ",)");
    F32 y({m, d});
    float* yp = y.mutable_data();
    {
        py::gil_scoped_release nogil;
        flexquant::rms_norm_cuda(xa.data(), wa.data(), m, d, eps, yp);
    }
    return y;
}

py::tuple py_rope_cuda(const py::array& inv_freq, const py::array& q, const py::array& k,
                       const py::array_t<int64_t, py::array::c_style>& positions) {
    F32 qa = require<float>(q, "q", 3, "(m, n_heads, head_dim)");
    const int64_t m = qa.shape(0), H = qa.shape(1), d = qa.shape(2);
    const std::string kshape = "(" + std::to_string(m) + ", n_kv_heads, " + std::to_string(d) + ")";
    F32 ka = require<float>(k, "k", 3, kshape.c_str());
    expect_dim(ka, 0, m, "k", kshape);
    expect_dim(ka, 2, d, "k", kshape);
    F32 fa = require<float>(inv_freq, "inv_freq", 1, "(head_dim / 2,)");
    expect_dim(fa, 0, d / 2, "inv_freq", "(" + std::to_string(d / 2) + ",)");
    require<int64_t>(positions, "positions", 1, "(m,)");
    expect_dim(positions, 0, m, "positions", "(" + std::to_string(m) + ",)");
    F32 qo({m, H, d}), ko({m, ka.shape(1), d});
    std::copy(qa.data(), qa.data() + qa.size(), qo.mutable_data());
    std::copy(ka.data(), ka.data() + ka.size(), ko.mutable_data());
    {
        py::gil_scoped_release nogil;
        flexquant::rope_cuda(fa.data(), int(d), qo.mutable_data(), H, ko.mutable_data(), ka.shape(1), positions.data(), m);
    }
    return py::make_tuple(qo, ko);
}

F32 py_swiglu_cuda(const py::array& gate, const py::array& up) {
    F32 ga = require<float>(gate, "gate", 1, "(n,)");
    const std::string ushape = "(" + std::to_string(ga.shape(0)) + ",)";
    F32 ua = require<float>(up, "up", 1, ushape.c_str());
    expect_dim(ua, 0, ga.shape(0), "up", ushape);
    F32 out({ga.shape(0)});
    float* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        flexquant::swiglu_cuda(ga.data(), ua.data(), ga.shape(0), op);
    }
    return out;
}

F32 py_attention_cuda(const py::array& q, const py::array& k_cache, const py::array& v_cache, int64_t p0, int n_splits,
                      int64_t base, bool prefill) {
    F32 qa = require<float>(q, "q", 3, "(m, n_heads, head_dim)");
    const int64_t m = qa.shape(0), H = qa.shape(1), d = qa.shape(2);
    const bool f16 = k_cache.dtype().is(py::dtype("float16"));
    if (!f16 && !k_cache.dtype().is(py::dtype::of<float>()))
        throw py::type_error("k_cache: expected float32 or float16, got " + std::string(py::str(k_cache.dtype())));
    if (!k_cache.dtype().is(v_cache.dtype())) throw py::type_error("v_cache: must have k_cache's dtype");
    if (k_cache.ndim() != 3 || k_cache.shape(2) != d || !(k_cache.flags() & py::array::c_style))
        throw py::value_error("k_cache: expected a C-contiguous (t_max, n_kv_heads, " + std::to_string(d) + ") array, got " + shape_str(k_cache));
    const int64_t t_max = k_cache.shape(0), Hkv = k_cache.shape(1);
    const std::string vshape = "(" + std::to_string(t_max) + ", " + std::to_string(Hkv) + ", " + std::to_string(d) + ")";
    if (v_cache.ndim() != 3) throw py::value_error("v_cache: expected shape " + vshape + ", got " + shape_str(v_cache));
    for (int ax = 0; ax < 3; ++ax) expect_dim(v_cache, ax, k_cache.shape(ax), "v_cache", vshape);
    if (!(v_cache.flags() & py::array::c_style)) throw py::value_error("v_cache: must be C-contiguous");
    F32 out({m, H, d});
    float* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        flexquant::attention_cuda(qa.data(), k_cache.data(), v_cache.data(), f16, t_max, m, p0, H, Hkv, d, n_splits, op,
                                  base, prefill);
    }
    return out;
}

py::tuple py_entropy_and_top1_cuda(const py::array& logits) {
    F32 la = require<float>(logits, "logits", 1, "(vocab,)");
    float ent = 0, top1 = 0;
    int64_t arg = 0;
    {
        py::gil_scoped_release nogil;
        flexquant::entropy_and_top1_cuda(la.data(), la.shape(0), &ent, &top1, &arg);
    }
    return py::make_tuple(ent, top1, arg);
}

}  // namespace

void bind_cuda_ops(py::module_& m) {
    m.def("rms_norm_cuda", &py_rms_norm_cuda, py::arg("x"), py::arg("w"), py::arg("eps"),
          "The CUDA rms_norm: x (m, d), w (d,) float32 -> (m, d).");
    m.def("rope_cuda", &py_rope_cuda, py::arg("inv_freq"), py::arg("q"), py::arg("k"), py::arg("positions"),
          "The CUDA rope: inv_freq (d/2,), q (m, H, d), k (m, Hkv, d) float32, positions (m,) int64 -> rotated (q, k).");
    m.def("swiglu_cuda", &py_swiglu_cuda, py::arg("gate"), py::arg("up"),
          "The CUDA swiglu: silu(gate) * up over (n,) float32.");
    m.def("attention_cuda", &py_attention_cuda, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("p0"),
          py::arg("n_splits") = 1, py::arg("base") = 0, py::arg("prefill") = false,
          "The CUDA causal GQA attention of q (m, H, d) float32 at positions p0.. over a cache (t_max, Hkv, d)\n"
          "of float32 or float16, the positions of each (token, head) split into n_splits spans -> (m, H, d).\n"
          "base: the cache row of position 0 (a sequence's block of a multi-sequence cache). prefill: the\n"
          "tiled kernel of a prompt pass instead (head_dim a multiple of 4 up to 128; n_splits unused).");
    m.def("entropy_and_top1_cuda", &py_entropy_and_top1_cuda, py::arg("logits"),
          "The CUDA next-token signals of logits (vocab,) float32 -> (entropy, top1_prob, argmax).");
    m.def("bitplane_matmul_cuda", &py_bitplane_matmul_cuda, py::arg("planes"), py::arg("qparams"), py::arg("n"),
          py::arg("k"), py::arg("max_bits"), py::arg("group_size"), py::arg("bits"), py::arg("x"),
          py::arg("path") = "auto", py::arg("warps") = 0, py::arg("y0") = py::none(), py::arg("prefetch") = -1,
          "y = x @ W_bits.T on the current CUDA device (y = y0 + x @ W_bits.T with y0: the accumulating\n"
          "store the engine's residual adds use): planes (>= bits, plane_bytes) uint8 in the tc8x512\n"
          "layout, qparams (n, n_groups, 2) float16, x (m, k) or (k,) float32 -> y (m, n) or (n,) float32.\n"
          "Uploads only the first `bits` planes; the device output is filled with NaN before the launch, so\n"
          "an element the kernel missed comes back as NaN. path: 'tc' (int8 activations per group,\n"
          "binary tensor cores; group_size 32..512, powers of two), 'mma' (the same int8 activations, the\n"
          "codes decoded in registers for the s8 tensor cores; group_size 128, 256 or 512), 'mma_a16' (the\n"
          "same kernel with x rounded to float16 on the f16 tensor cores), 'fp32' (fp32 activations, any\n"
          "group size) or 'auto' (tc where it applies). warps: warps per block splitting K (0 = automatic).\n"
          "prefetch: 1 = each warp asks L2 for its next super-chunk ahead (sm_90), 0 = off, -1 = the default\n"
          "(FLEXQUANT_CUDA_PREFETCH=1 turns it on); the result is the same either way.");
    m.def("bitplane_matmul_fused_cuda", &py_bitplane_matmul_fused_cuda, py::arg("planes"), py::arg("qparams"),
          py::arg("n"), py::arg("k"), py::arg("max_bits"), py::arg("group_size"), py::arg("bits"), py::arg("x"),
          py::arg("op"), py::arg("aux"), py::arg("eps") = 1e-5f, py::arg("path") = "tc",
          "The decode step's fused activation preparation, then the GEMV (path 'tc' or 'mma', which read the\n"
          "same preparation), on x (m <= 8, k; mma: 16): op 'rms_norm'\n"
          "(aux = the norm weight (k,)) or 'swiglu' (x = gate, aux = up (m, k); in place as the engine runs\n"
          "it) -> (y (m, n), the op's output (m, k)). Both must equal rms_norm_cuda / swiglu_cuda followed\n"
          "by bitplane_matmul_cuda(path=path) bit for bit.");
    m.def("bitplane_matmul_multi_cuda", &py_bitplane_matmul_multi_cuda, py::arg("planes"), py::arg("qparams"),
          py::arg("ns"), py::arg("k"), py::arg("max_bits"), py::arg("group_size"), py::arg("bits"), py::arg("x"),
          py::arg("path") = "auto", py::arg("warps") = 0, py::arg("prefetch") = -1,
          "Several linears reading the same x (m <= 8, k; mma: 16), as the engine's q/k/v and gate/up, in ONE GEMV\n"
          "launch: planes, qparams, ns (n of each) and bits (each linear's bit-width, read from device memory\n"
          "as the engine's mask) are lists of 1..3 entries sharing k, max_bits and group_size -> [y_i (m, n_i)].\n"
          "Equals bitplane_matmul_cuda per linear bit for bit at the same warps (0: automatic, from the whole\n"
          "grid); outputs poisoned first.");
    m.def("bitplane_matmul_cuda_bench", &py_bitplane_matmul_cuda_bench, py::arg("planes"), py::arg("qparams"),
          py::arg("n"), py::arg("k"), py::arg("max_bits"), py::arg("group_size"), py::arg("bits"), py::arg("x"),
          py::arg("path") = "auto", py::arg("copies") = 0, py::arg("reps") = 20, py::arg("warps") = 0,
          py::arg("prefetch") = -1,
          "Time the device-resident product with x (m <= 8, k; mma: 16): uploads `copies` copies of the first `bits`\n"
          "planes and the qparams once (0: enough to read 4x the L2 size per rotation), replays CUDA graphs\n"
          "of launches rotating over the copies `reps` times, timed with cudaEvents. Returns a dict: path,\n"
          "matmul_us (median per launch, activations already prepared), matmul_min_us, prepare_us (the\n"
          "activation preparation kernel alone), total_us (prepare + matmul), copies, launches,\n"
          "warps_per_block (warps splitting K in a block; `warps` 0 = automatic), prefetch (0 or 1 as used;\n"
          "see bitplane_matmul_cuda), bytes (read per matmul).");
    m.def("bitplane_gemm_cuda", &py_bitplane_gemm_cuda, py::arg("planes"), py::arg("qparams"), py::arg("n"),
          py::arg("k"), py::arg("max_bits"), py::arg("group_size"), py::arg("bits"), py::arg("x"),
          py::arg("kind") = "a8", py::arg("act_bits") = 0, py::arg("y0") = py::none(),
          "y = x @ W_bits.T by the tensor-core GEMM (the many-rows path): arguments as bitplane_matmul_cuda\n"
          "(y0 too).\n"
          "kind 'a8': x quantized per (row, group) to int8 as the 'tc' GEMV does, s8 tensor cores; 'a16': x\n"
          "rounded to float16, f16 tensor cores with fp32 accumulation; 'b1': x quantized per (row, group) to\n"
          "act_bits-bit integers (2..8, as ops.quantize_activations), bit-serial on the binary tensor cores\n"
          "(group_size 32, 64, 128, 256 or 512); 'a8_wg': 'a8' on Hopper's wgmma (see\n"
          "bitplane_gemm_wgmma_supported). act_bits 0: the kind's own (8, 16, 8, 8). Any m; the\n"
          "device output and scratch are poisoned first (NaN / 0xff bytes).");
    m.def("bitplane_unpack_codes_cuda", &py_bitplane_unpack_codes_cuda, py::arg("planes"), py::arg("qparams"),
          py::arg("n"), py::arg("k"), py::arg("max_bits"), py::arg("group_size"), py::arg("bits"),
          "The GEMM's unpack launch alone: -> codes (n, ceil(k/128)*128) int8 = c_bits - 2^(bits-1).");
    m.def("bitplane_gemm_cuda_bench", &py_bitplane_gemm_cuda_bench, py::arg("planes"), py::arg("qparams"),
          py::arg("n"), py::arg("k"), py::arg("max_bits"), py::arg("group_size"), py::arg("bits"), py::arg("x"),
          py::arg("kind") = "a8", py::arg("reps") = 10, py::arg("act_bits") = 0,
          "Time the GEMM with x (m, k): median microseconds per call of unpack, prepare, gemm and all three\n"
          "(total; no unpack for 'b1'), the planes rotated over enough copies that they come from HBM. -> dict.");
    m.def("bitplane_gemm_b1_supports", &flexquant::bitplane_gemm_b1_supports, py::arg("group_size"),
          "Whether the 'b1' GEMM handles this group size.");
    m.def("bitplane_gemm_wgmma_supported", &flexquant::bitplane_gemm_wgmma_supported, py::arg("group_size"),
          "Whether the 'a8_wg' GEMM (wgmma, sm_90a) runs here at this group size: a compute capability 9.0\n"
          "GPU, a build with sm_90a code, group_size a multiple of 128.");
    m.def("cuda_device_name", &flexquant::cuda_device_name, py::arg("device") = 0,
          "The name of a CUDA device ('' when there is none).");
    m.def("bitplane_cuda_tc_supports", &flexquant::bitplane_cuda_tc_supports, py::arg("group_size"),
          "Whether the 'tc' path of bitplane_matmul_cuda handles this group size.");
    m.def("bitplane_cuda_mma_supports", &flexquant::bitplane_cuda_mma_supports, py::arg("group_size"),
          "Whether the 'mma' path of bitplane_matmul_cuda handles this group size.");
}
