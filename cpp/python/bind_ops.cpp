// Python bindings of the CPU ops (cpp/src/ops/ops.h) on numpy arrays, for tests and benchmarks.
// They live in the submodule `_core.ops`; bindings.cpp calls bind_ops(m) on the main module.
//
// Every array argument must already have the stated dtype and be C-contiguous: nothing is cast or
// copied silently, so a benchmark measures the op and not a conversion. Shapes are checked and the
// error names the argument. The GIL is released while an op runs.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "array_checks.h"
#include "../src/cpu_features.h"
#include "../src/ops/ops.h"
#include "../src/thread_pool.h"

namespace py = pybind11;
using namespace flexquant;
using flexquant_py::expect_dim;
using flexquant_py::require;
using flexquant_py::shape_str;

namespace {

// The pool the bound ops run on (hardware concurrency by default; set_num_threads changes it).
ThreadPool& ops_pool() {
    static ThreadPool pool(0);
    return pool;
}

BitplaneMatmulPath parse_path(const std::string& s) {
    if (s == "auto") return BITPLANE_PATH_AUTO;
    if (s == "decode") return BITPLANE_PATH_DECODE;
    if (s == "gemm") return BITPLANE_PATH_GEMM;
    throw py::value_error("path: expected 'auto', 'decode' or 'gemm', got '" + s + "'");
}

RopeScalingType parse_scaling(const std::string& s) {
    if (s == "none" || s == "default") return ROPE_SCALING_NONE;
    if (s == "linear") return ROPE_SCALING_LINEAR;
    if (s == "llama3") return ROPE_SCALING_LLAMA3;
    throw py::value_error("scaling: expected 'none', 'linear' or 'llama3', got '" + s + "'");
}

RopeParams rope_params(int head_dim, float theta, const std::string& scaling, float factor, float low_freq_factor,
                       float high_freq_factor, int64_t original_max_position) {
    RopeParams p;
    p.head_dim = head_dim;
    p.theta = theta;
    p.scaling = parse_scaling(scaling);
    p.factor = factor;
    p.low_freq_factor = low_freq_factor;
    p.high_freq_factor = high_freq_factor;
    p.original_max_position = original_max_position;
    return p;
}

// A BitplaneLinear view of (planes, qparams) after checking their dtypes and shapes; the arrays
// must outlive it.
BitplaneLinear linear_view(const py::array& planes_a, const py::array& qparams_a, int64_t n, int64_t k, int max_bits,
                           int group_size, int bits) {
    auto planes = require<uint8_t>(planes_a, "planes", 2, "(max_bits, plane_bytes)");
    if (!py::isinstance<py::array>(qparams_a) || (qparams_a.dtype().kind() != 'f' && qparams_a.dtype().kind() != 'u') ||
        qparams_a.itemsize() != 2)
        throw py::type_error("qparams: expected dtype float16 (or its uint16 bits), got " +
                             std::string(py::str(qparams_a.dtype())));
    if (!(qparams_a.flags() & py::array::c_style)) throw py::value_error("qparams: must be C-contiguous");
    BitplaneLinear w;
    w.n = n;
    w.k = k;
    w.max_bits = max_bits;
    w.group_size = group_size;
    if (group_size <= 0) throw py::value_error("group_size: must be positive");
    const std::string qshape = "(" + std::to_string(n) + ", " + std::to_string(w.n_groups()) + ", 2)";
    if (qparams_a.ndim() != 3 || qparams_a.shape(0) != n || qparams_a.shape(1) != w.n_groups() ||
        qparams_a.shape(2) != 2)
        throw py::value_error("qparams: expected shape " + qshape + ", got " + shape_str(qparams_a));
    if (planes.shape(0) < bits)
        throw py::value_error("planes: holds " + std::to_string(planes.shape(0)) +
                              " planes, bits=" + std::to_string(bits) + " needs that many");
    w.planes = planes.data();
    w.plane_bytes = static_cast<uint64_t>(planes.shape(1));
    w.qparams = static_cast<const uint16_t*>(qparams_a.data());
    return w;
}

// act: 'f32', 'i16' or 'i8' (BitplaneActivations).
BitplaneActivations parse_act(const std::string& act) {
    if (act == "f32") return BITPLANE_ACT_F32;
    if (act == "i16") return BITPLANE_ACT_I16;
    if (act == "i8") return BITPLANE_ACT_I8;
    throw py::value_error("act: expected 'f32', 'i16' or 'i8', got '" + act + "'");
}

py::array_t<float> py_bitplane_matmul(const py::array& planes_a, const py::array& qparams_a, int64_t n, int64_t k,
                                      int max_bits, int group_size, int bits, const py::array& x_a,
                                      const std::string& path, bool threaded, const std::string& act) {
    const BitplaneActivations a = parse_act(act);
    const BitplaneLinear w = linear_view(planes_a, qparams_a, n, k, max_bits, group_size, bits);
    const bool vec = x_a.ndim() == 1;
    auto x = require<float>(x_a, "x", -1, "");
    if (!(x.ndim() == 1 || x.ndim() == 2))
        throw py::value_error("x: expected shape (m, " + std::to_string(k) + ") or (" + std::to_string(k) + ",), got " +
                              shape_str(x));
    expect_dim(x, x.ndim() - 1, k, "x", "(m, " + std::to_string(k) + ")");
    const int64_t m = vec ? 1 : x.shape(0);
    py::array_t<float> y = vec ? py::array_t<float>({n}) : py::array_t<float>({m, n});
    const BitplaneMatmulPath p = parse_path(path);
    {
        py::gil_scoped_release nogil;
        try {
            bitplane_matmul(w, bits, x.data(), m, y.mutable_data(), threaded ? &ops_pool() : nullptr, p, a);
        } catch (const std::invalid_argument& e) {
            py::gil_scoped_acquire gil;
            throw py::value_error(e.what());
        }
    }
    return y;
}

// linears: (planes, qparams, n) per linear, all of K = k inputs; bits: one per linear.
py::list py_bitplane_matmul_multi(const py::list& linears, int64_t k, int max_bits, int group_size,
                                  const std::vector<int>& bits, const py::array& x_a, const std::string& path,
                                  const std::string& act) {
    const BitplaneActivations a = parse_act(act);
    const size_t count = linears.size();
    if (count == 0) throw py::value_error("linears: need at least one (planes, qparams, n)");
    if (bits.size() != count)
        throw py::value_error("bits: expected one per linear (" + std::to_string(count) + "), got " +
                              std::to_string(bits.size()));
    std::vector<BitplaneLinear> views;
    std::vector<py::array> keep;  // the arrays the views point into
    views.reserve(count);
    for (size_t i = 0; i < count; ++i) {
        const std::string at = "linears[" + std::to_string(i) + "]";
        if (!py::isinstance<py::sequence>(linears[i]) || py::len(linears[i]) != 3)
            throw py::type_error(at + ": expected (planes, qparams, n)");
        const py::sequence t = linears[i].cast<py::sequence>();
        if (!py::isinstance<py::array>(t[0]) || !py::isinstance<py::array>(t[1]) || !py::isinstance<py::int_>(t[2]))
            throw py::type_error(at + ": expected (planes: ndarray, qparams: ndarray, n: int)");
        keep.push_back(t[0].cast<py::array>());
        keep.push_back(t[1].cast<py::array>());
        views.push_back(linear_view(keep[keep.size() - 2], keep.back(), t[2].cast<int64_t>(), k, max_bits, group_size,
                                    bits[i]));
    }
    auto x = require<float>(x_a, "x", 2, "(m, k)");
    expect_dim(x, 1, k, "x", "(m, " + std::to_string(k) + ")");
    const int64_t m = x.shape(0);
    std::vector<py::array_t<float>> ys;
    std::vector<const BitplaneLinear*> ws;
    std::vector<float*> yp;
    for (size_t i = 0; i < count; ++i) {
        ys.emplace_back(std::vector<py::ssize_t>{m, views[i].n});
        ws.push_back(&views[i]);
        yp.push_back(ys.back().mutable_data());
    }
    const BitplaneMatmulPath p = parse_path(path);
    {
        py::gil_scoped_release nogil;
        try {
            bitplane_matmul_multi(ws.data(), bits.data(), static_cast<int>(count), x.data(), m, yp.data(),
                                  &ops_pool(), p, a);
        } catch (const std::invalid_argument& e) {
            py::gil_scoped_acquire gil;
            throw py::value_error(e.what());
        }
    }
    py::list out;
    for (auto& y : ys) out.append(y);
    return out;
}

py::array_t<float> py_rms_norm(const py::array& x_a, const py::array& w_a, float eps) {
    auto x = require<float>(x_a, "x", -1, "");
    if (x.ndim() < 1) throw py::value_error("x: expected shape (..., d)");
    const int64_t d = x.shape(x.ndim() - 1);
    auto w = require<float>(w_a, "w", 1, "(d,)");
    expect_dim(w, 0, d, "w", "(" + std::to_string(d) + ",)");
    py::array_t<float> y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    const int64_t m = d ? x.size() / d : 0;
    py::gil_scoped_release nogil;
    rms_norm(x.data(), w.data(), m, d, eps, y.mutable_data());
    return y;
}

py::tuple py_rope(const py::array& q_a, const py::object& k_o, const py::array& pos_a, float theta,
                  const std::string& scaling, float factor, float low_freq_factor, float high_freq_factor,
                  int64_t original_max_position) {
    auto q = require<float>(q_a, "q", 3, "(m, n_heads, head_dim)");
    const int64_t m = q.shape(0), hd = q.shape(2);
    if (hd % 2) throw py::value_error("q: head_dim must be even, got " + std::to_string(hd));
    auto pos = require<int64_t>(pos_a, "positions", 1, "(m,)");
    expect_dim(pos, 0, m, "positions", "(" + std::to_string(m) + ",)");
    py::array_t<float> qo(std::vector<py::ssize_t>{m, q.shape(1), hd});
    std::memcpy(qo.mutable_data(), q.data(), q.size() * sizeof(float));
    py::object ko = py::none();
    float* kp = nullptr;
    int64_t hkv = 0;
    if (!k_o.is_none()) {
        auto k = require<float>(k_o.cast<py::array>(), "k", 3, "(m, n_kv_heads, head_dim)");
        expect_dim(k, 0, m, "k", "(" + std::to_string(m) + ", n_kv_heads, " + std::to_string(hd) + ")");
        expect_dim(k, 2, hd, "k", "(" + std::to_string(m) + ", n_kv_heads, " + std::to_string(hd) + ")");
        hkv = k.shape(1);
        py::array_t<float> kc(std::vector<py::ssize_t>{m, hkv, hd});
        std::memcpy(kc.mutable_data(), k.data(), k.size() * sizeof(float));
        kp = kc.mutable_data();
        ko = kc;
    }
    const Rope rope = rope_init(rope_params(static_cast<int>(hd), theta, scaling, factor, low_freq_factor,
                                            high_freq_factor, original_max_position));
    {
        py::gil_scoped_release nogil;
        rope_(rope, qo.mutable_data(), q.shape(1), kp, hkv, pos.data(), m);
    }
    return py::make_tuple(qo, ko);
}

py::array_t<float> py_attention(const py::array& q_a, const py::array& kc_a, const py::array& vc_a, int64_t p0,
                                bool threaded, const std::string& layout, const std::optional<py::array>& k_scale_a,
                                const std::optional<py::array>& v_scale_a) {
    auto q = require<float>(q_a, "q", 3, "(m, n_heads, head_dim)");
    const int64_t m = q.shape(0), h = q.shape(1), d = q.shape(2);
    if (layout != "tokens" && layout != "heads")
        throw py::value_error("layout: expected 'tokens' or 'heads', got '" + layout + "'");
    const bool heads = layout == "heads";  // (n_kv_heads, t_max, head_dim), else (t_max, n_kv_heads, head_dim)
    const int t_axis = heads ? 1 : 0, h_axis = heads ? 0 : 1;
    const bool f16 = kc_a.dtype().kind() == 'f' && kc_a.itemsize() == 2;
    const bool q8 = kc_a.dtype().is(py::dtype::of<int8_t>());
    if (kc_a.ndim() != 3 || vc_a.ndim() != 3)
        throw py::value_error(std::string("k_cache, v_cache: expected shape ") +
                              (heads ? "(n_kv_heads, t_max, head_dim)" : "(t_max, n_kv_heads, head_dim)"));
    const int64_t hkv = kc_a.shape(h_axis), t_max = kc_a.shape(t_axis);
    const std::string tdim = "t_max >= " + std::to_string(p0 + m);
    const std::string cshape = heads ? "(n_kv_heads, " + tdim + ", " + std::to_string(d) + ")"
                                     : "(" + tdim + ", n_kv_heads, " + std::to_string(d) + ")";
    for (const py::array* c : {&kc_a, &vc_a}) {
        const char* name = c == &kc_a ? "k_cache" : "v_cache";
        if (c->shape(t_axis) < p0 + m || c->shape(t_axis) != t_max || c->shape(h_axis) != hkv || c->shape(2) != d)
            throw py::value_error(std::string(name) + ": expected shape " + cshape + " (both the same), got " +
                                  shape_str(*c));
        if (!(c->flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
        const bool ok = f16  ? (c->dtype().kind() == 'f' && c->itemsize() == 2)
                        : q8 ? c->dtype().is(py::dtype::of<int8_t>())
                             : c->dtype().is(py::dtype::of<float>());
        if (!ok)
            throw py::type_error(std::string(name) + ": expected dtype float32, float16 or int8 (both the same), got " +
                                 std::string(py::str(c->dtype())));
    }
    // q8: the block scales, shaped as the caches with q8_blocks(d) in place of d
    if (q8 != (k_scale_a.has_value() && v_scale_a.has_value()) || (!q8 && (k_scale_a || v_scale_a)))
        throw py::value_error(q8 ? "int8 caches need k_scale and v_scale (float32, one per 32 values of a row)"
                                 : "k_scale, v_scale: only for int8 caches");
    py::array_t<float> k_scale, v_scale;
    if (q8) {
        const int64_t nb = q8_blocks(d);
        const std::string sshape = "(" + std::to_string(kc_a.shape(0)) + ", " + std::to_string(kc_a.shape(1)) + ", " +
                                   std::to_string(nb) + ")";
        for (const py::array* c : {&*k_scale_a, &*v_scale_a}) {
            const char* name = c == &*k_scale_a ? "k_scale" : "v_scale";
            auto a = require<float>(*c, name, 3, sshape.c_str());
            if (a.shape(0) != kc_a.shape(0) || a.shape(1) != kc_a.shape(1) || a.shape(2) != nb)
                throw py::value_error(std::string(name) + ": expected shape " + sshape + ", got " + shape_str(a));
            (c == &*k_scale_a ? k_scale : v_scale) = a;
        }
    }
    if (p0 < 0) throw py::value_error("p0: must be >= 0");
    if (hkv <= 0 || h % hkv) throw py::value_error("n_heads must be a multiple of n_kv_heads");
    const KvStrides kv = heads ? KvStrides::head_major(t_max, d) : KvStrides::token_major(hkv, d);
    py::array_t<float> out(std::vector<py::ssize_t>{m, h, d});
    ThreadPool* pool = threaded ? &ops_pool() : nullptr;
    py::gil_scoped_release nogil;
    if (f16)
        attention_f16(q.data(), static_cast<const uint16_t*>(kc_a.data()), static_cast<const uint16_t*>(vc_a.data()), m,
                      p0, h, hkv, d, kv, out.mutable_data(), pool);
    else if (q8)
        attention_q8(q.data(), static_cast<const int8_t*>(kc_a.data()), k_scale.data(),
                     static_cast<const int8_t*>(vc_a.data()), v_scale.data(), m, p0, h, hkv, d, kv, out.mutable_data(),
                     pool);
    else
        attention(q.data(), static_cast<const float*>(kc_a.data()), static_cast<const float*>(vc_a.data()), m, p0, h,
                  hkv, d, kv, out.mutable_data(), pool);
    return out;
}

py::array_t<float> py_swiglu(const py::array& g_a, const py::array& u_a) {
    auto g = require<float>(g_a, "gate", -1, "");
    auto u = require<float>(u_a, "up", g.ndim(), shape_str(g).c_str());
    for (py::ssize_t i = 0; i < g.ndim(); ++i) expect_dim(u, static_cast<int>(i), g.shape(i), "up", shape_str(g));
    py::array_t<float> out(std::vector<py::ssize_t>(g.shape(), g.shape() + g.ndim()));
    py::gil_scoped_release nogil;
    swiglu(g.data(), u.data(), g.size(), out.mutable_data());
    return out;
}

py::array_t<float> py_quantize_activations(const py::array& x_a, int group, int bits) {
    auto x = require<float>(x_a, "x", 2, "(m, k)");
    py::array_t<float> out({x.shape(0), x.shape(1)});
    float* o = out.mutable_data();
    py::gil_scoped_release nogil;
    quantize_activations(x.data(), x.shape(0), x.shape(1), group, bits, o);
    return out;
}

// w (V, n, b) float32 is updated in place; returns (codes (n, b) uint8, err (V, n, b) float32).
py::tuple py_nested_gptq_block(py::array& w_a, const py::array& u_a, const py::array& scale_a, const py::array& min_a,
                               const py::array& group_of_a, const py::array& views_a, const py::array& lambda_a,
                               int max_bits, bool threaded) {
    auto w = require<float>(w_a, "w", 3, "(V, n, b)");
    if (!w.writeable()) throw py::value_error("w: must be writeable (it is updated in place)");
    const int64_t nv = w.shape(0), n = w.shape(1), b = w.shape(2);
    const std::string bs = std::to_string(b), ns = std::to_string(n), vs = std::to_string(nv);
    auto u = require<double>(u_a, "u", 2, "(b, b)");
    expect_dim(u, 0, b, "u", "(" + bs + ", " + bs + ")");
    expect_dim(u, 1, b, "u", "(" + bs + ", " + bs + ")");
    auto scale = require<float>(scale_a, "scale", 2, "(n, n_groups)");
    expect_dim(scale, 0, n, "scale", "(" + ns + ", n_groups)");
    auto mn = require<float>(min_a, "min", 2, "(n, n_groups)");
    expect_dim(mn, 0, n, "min", "(" + ns + ", n_groups)");
    expect_dim(mn, 1, scale.shape(1), "min", "(" + ns + ", " + std::to_string(scale.shape(1)) + ")");
    auto group_of = require<int32_t>(group_of_a, "group_of", 1, "(b,)");
    expect_dim(group_of, 0, b, "group_of", "(" + bs + ",)");
    auto views = require<int32_t>(views_a, "views", 1, "(V,)");
    expect_dim(views, 0, nv, "views", "(" + vs + ",)");
    auto lam = require<double>(lambda_a, "lam", 1, "(V,)");
    expect_dim(lam, 0, nv, "lam", "(" + vs + ",)");
    py::array_t<uint8_t> codes({n, b});
    py::array_t<float> err({nv, n, b});
    float* wp = w.mutable_data();
    uint8_t* cp = codes.mutable_data();
    float* ep = err.mutable_data();
    {
        py::gil_scoped_release nogil;
        nested_gptq_block(wp, u.data(), scale.data(), mn.data(), scale.shape(1), group_of.data(), views.data(),
                          lam.data(), static_cast<int>(nv), max_bits, n, static_cast<int>(b), cp, ep,
                          threaded ? &ops_pool() : nullptr);
    }
    return py::make_tuple(codes, err);
}

py::array_t<float> logits_1d(const py::array& a, const char* name) {
    auto l = require<float>(a, name, 1, "(vocab,)");
    if (l.shape(0) == 0) throw py::value_error(std::string(name) + ": must not be empty");
    return l;
}

}  // namespace

// The instruction sets f turns on, in family order: cpu_features_in_use's names; the families among
// them are cpu_kernels_available's.
static std::vector<std::string> feature_names(const CpuFeatures& f) {
    std::vector<std::string> out;
    for (const auto& [on, name] : {std::pair{f.vec128, "vec128"}, {f.avx2, "avx2"}, {f.gfni, "gfni"},
                                   {f.avx512, "avx512"}, {f.avx512vnni, "avx512vnni"}, {f.avxvnni, "avxvnni"}})
        if (on) out.push_back(name);
    return out;
}

void bind_ops(py::module_& parent) {
    py::module_ m = parent.def_submodule("ops", "CPU ops of the forward pass on numpy arrays (tests, benchmarks).");

    m.def(
        "set_num_threads", [](int n) { ops_pool().set_num_threads(n); }, py::arg("n"),
        py::call_guard<py::gil_scoped_release>(),  // it waits for an op running on another thread
        "Threads of the pool the ops here run on (<= 0: hardware concurrency).");
    m.def("get_num_threads", [] { return ops_pool().num_threads(); });
    m.def(
        "parallel_for_trace",
        [](int64_t n, int64_t grain, int threads, int64_t fail_at, double chunk_us) {
            if (threads < 1 || threads > 256)
                throw py::value_error("threads must be in 1..256, got " + std::to_string(threads));
            if (!(chunk_us >= 0.0 && chunk_us <= 1e6))
                throw py::value_error("chunk_us must be in [0, 1e6], got " + std::to_string(chunk_us));
            struct Chunk {
                int64_t begin, end, thread, order;
            };
            std::vector<Chunk> out;
            std::vector<std::thread::id> ids{std::this_thread::get_id()};  // thread 0: the caller
            std::mutex mu;
            {
                py::gil_scoped_release release;
                ThreadPool pool(threads);
                pool.parallel_for(n, grain, [&](int64_t b, int64_t e) {
                    {
                        std::lock_guard<std::mutex> lock(mu);
                        const auto me = std::find(ids.begin(), ids.end(), std::this_thread::get_id());
                        const int64_t t = me - ids.begin();
                        if (me == ids.end()) ids.push_back(std::this_thread::get_id());
                        out.push_back({b, e, t, static_cast<int64_t>(out.size())});
                    }
                    if (b <= fail_at && fail_at < e)
                        throw std::runtime_error("chunk [" + std::to_string(b) + ", " + std::to_string(e) + ") failed");
                    std::this_thread::sleep_for(std::chrono::duration<double, std::micro>(chunk_us));
                });
            }
            py::array_t<int64_t> a({static_cast<py::ssize_t>(out.size()), py::ssize_t{4}});
            auto v = a.mutable_unchecked<2>();
            for (size_t i = 0; i < out.size(); ++i) {
                v(i, 0) = out[i].begin, v(i, 1) = out[i].end, v(i, 2) = out[i].thread, v(i, 3) = out[i].order;
            }
            return a;
        },
        py::arg("n"), py::arg("grain"), py::arg("threads"), py::arg("fail_at") = -1, py::arg("chunk_us") = 0.0,
        "Runs ThreadPool::parallel_for(n, grain) on a new pool of `threads` threads, fn sleeping chunk_us\n"
        "per chunk and throwing on the chunk that holds fail_at; returns (chunks, 4) int64 rows\n"
        "(begin, end, thread, order): thread 0 is the caller, others numbered as first seen, order the\n"
        "sequence in which the chunks started (for tests of the pool's scheduling).");
    m.def(
        "cpu_kernels_available",
        [] {
            std::vector<std::string> out{"portable"};
            for (const std::string& name : feature_names(allowed_cpu_features()))
                if (name != "avx512vnni" && name != "avxvnni") out.push_back(name);  // no families of their own
            return out;
        },
        "Kernel families this CPU can run, less what FLEXQUANT_CPU leaves out: 'portable' (scalar),\n"
        "'vec128' (16-byte SIMD: NEON on AArch64, SSE2 on x86-64; decode, GEMM, attention), 'avx2'\n"
        "(AVX2+FMA+F16C), 'gfni' (avx2 + GFNI),\n"
        "'avx512' (avx2 + AVX-512 F/BW/DQ/VL; with GFNI and AVX-512 VNNI where the CPU has them).\n"
        "AVX-VNNI is no family: see cpu_has_avxvnni; cpu_features_in_use lists what runs.");
    m.def(
        "cpu_has_avxvnni", [] { return allowed_cpu_features().avxvnni; },
        "Whether this CPU (and this build's compiler) has AVX-VNNI, which the 'gfni' int16 decode uses\n"
        "where present (set_cpu_kernels(kind, avxvnni=False) leaves it out).");
    m.def(
        "cpu_features_in_use", [] { return feature_names(cpu_features()); },
        "The instruction sets the kernels may use now (the family's, less what set_cpu_kernels or\n"
        "FLEXQUANT_CPU left out): 'vec128', 'avx2', 'gfni', 'avx512', 'avx512vnni', 'avxvnni'.");
    m.def("last_attention_kernel", [] { return std::string(attention_last_kernel()); },
          "The path the last attention call took: 'span_<kernels>' (per token) or 'prompt_<kernels>' (blocks\n"
          "of tokens x blocks of keys), kernels 'portable', 'vec128', 'avx2' or 'avx512' ('' before any).");
    m.def("last_bitplane_kernel", [] { return std::string(bitplane_last_kernel()); },
          "The kernel the last bitplane matmul ran, e.g. 'decode_i16_avx512_vnni' or 'gemm_portable' (tests:\n"
          "which family and compilation the dispatch picked; '' before any).");
    const auto family = [](const CpuFeatures& f) {
        return std::string(f.avx512 ? "avx512" : f.gfni ? "gfni" : f.avx2 ? "avx2" : f.vec128 ? "vec128" : "portable");
    };
    m.def(
        "get_cpu_kernels", [family] { return family(cpu_features()); }, "The kernel family in use.");
    m.def(
        "set_cpu_kernels",
        [family](const std::string& kind, bool avxvnni, bool gfni, bool avx512vnni) {
            if (kind != "avx512" && kind != "gfni" && kind != "avx2" && kind != "vec128" && kind != "portable")
                throw py::value_error("kind: expected 'avx512', 'gfni', 'avx2', 'vec128' or 'portable', got '" + kind +
                                      "'");
            CpuFeatures f;
            f.vec128 = kind != "portable";
            f.avx2 = f.vec128 && kind != "vec128";
            f.gfni = (kind == "gfni" || kind == "avx512") && gfni;
            f.avx512 = kind == "avx512";
            f.avx512vnni = f.avx512 && avx512vnni;
            f.avxvnni = f.avx2 && avxvnni;  // where the CPU has it (it is no family of its own)
            set_cpu_features(f);
            return family(cpu_features());
        },
        py::arg("kind"), py::arg("avxvnni") = true, py::arg("gfni") = true, py::arg("avx512vnni") = true,
        "Use at most this kernel family ('avx512', 'gfni', 'avx2', 'vec128' or 'portable'; the CPU may allow\n"
        "less);\n"
        "returns the family in effect. The flags leave parts out where the CPU has them, for tests and\n"
        "to measure what CPUs without them get: avxvnni=False (the 'gfni' int16 decode then multiplies with\n"
        "vpmaddwd), gfni=False ('avx512' as on Cascade Lake: the int16 kernels transpose bits with\n"
        "selects; 'gfni' becomes 'avx2'), avx512vnni=False ('avx512' as on Skylake-SP: vpmaddwd + vpaddd).");

    m.def("bitplane_matmul_multi", &py_bitplane_matmul_multi, py::arg("linears"), py::arg("k"), py::arg("max_bits"),
          py::arg("group_size"), py::arg("bits"), py::arg("x"), py::arg("path") = "auto", py::arg("act") = "f32",
          "[x @ W_i.T for each linear]: linears a list of (planes, qparams, n) sharing k, bits one per linear;\n"
          "one call prepares x once for all of them (what the engine does for q, k, v and for gate, up).");
    m.def("bitplane_matmul", &py_bitplane_matmul, py::arg("planes"), py::arg("qparams"), py::arg("n"), py::arg("k"),
          py::arg("max_bits"), py::arg("group_size"), py::arg("bits"), py::arg("x"), py::arg("path") = "auto",
          py::arg("threaded") = true, py::arg("act") = "f32",
          "y = x @ W_bits.T for a bit-plane linear: planes (>= bits, plane_bytes) uint8 in the tc8x512 layout,\n"
          "qparams (n, n_groups, 2) float16, x (m, k) or (k,) float32 -> y (m, n) or (n,) float32.\n"
          "Reads only the first `bits` planes. path: 'auto', 'decode' (bit-serial) or 'gemm' (dequantize + GEMM).\n"
          "act: 'f32' (x as given), 'i16' (x rounded per row and weight group to int16, x̂ = s * q with\n"
          "s = absmax / 32767; y = x̂ @ W_bits.T, on integer products with the SIMD kernels) or 'i8' (the same\n"
          "with s = absmax / 127, quantize_activations' 8 bits; vpdpbusd on AVX-512 VNNI and AVX-VNNI).");
    m.def(
        "bitplane_bytes_at",
        [](uint64_t plane_bytes, int64_t n, int64_t k, int group_size, int bits) {
            BitplaneLinear w;
            w.plane_bytes = plane_bytes;
            w.n = n;
            w.k = k;
            w.group_size = group_size;
            return bitplane_bytes_at(w, bits);
        },
        py::arg("plane_bytes"), py::arg("n"), py::arg("k"), py::arg("group_size"), py::arg("bits"),
        "Bytes one product at `bits` reads from the weight (planes + fp16 group parameters).");

    m.def("rms_norm", &py_rms_norm, py::arg("x"), py::arg("w"), py::arg("eps"),
          "x (..., d) * w (d,) / sqrt(mean(x^2, -1) + eps), float32.");
    m.def("rope", &py_rope, py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("theta"),
          py::arg("scaling") = "none", py::arg("factor") = 1.0f, py::arg("low_freq_factor") = 1.0f,
          py::arg("high_freq_factor") = 4.0f, py::arg("original_max_position") = 8192,
          "Rotate-half RoPE (Hugging Face Llama) of q (m, n_heads, d) and k (m, n_kv_heads, d) or None at\n"
          "positions (m,) int64; returns rotated copies (q, k). scaling: 'none', 'linear' or 'llama3'.");
    m.def(
        "rope_inv_freq",
        [](int head_dim, float theta, const std::string& scaling, float factor, float lo, float hi, int64_t orig) {
            const Rope r = rope_init(rope_params(head_dim, theta, scaling, factor, lo, hi, orig));
            py::array_t<float> a(static_cast<py::ssize_t>(r.inv_freq.size()));
            std::memcpy(a.mutable_data(), r.inv_freq.data(), r.inv_freq.size() * sizeof(float));
            return a;
        },
        py::arg("head_dim"), py::arg("theta"), py::arg("scaling") = "none", py::arg("factor") = 1.0f,
        py::arg("low_freq_factor") = 1.0f, py::arg("high_freq_factor") = 4.0f, py::arg("original_max_position") = 8192,
        "The (head_dim/2,) float32 inverse frequencies rope uses.");
    m.def("attention", &py_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("p0"),
          py::arg("threaded") = true, py::arg("layout") = "tokens", py::arg("k_scale") = py::none(),
          py::arg("v_scale") = py::none(),
          "Causal GQA of q (m, n_heads, d) at positions p0.. over caches float32, float16 or int8 holding\n"
          "positions 0..p0+m-1: (t_max, n_kv_heads, d) with layout='tokens', (n_kv_heads, t_max, d) with\n"
          "layout='heads' (the engine's). int8 caches (q8) come with k_scale and v_scale, float32, one per\n"
          "32 values of a row (the caches' shape with ceil(d / 32) for d): value = scale * code. Returns\n"
          "(m, n_heads, d) float32.");
    m.def(
        "quantize_kv_q8",
        [](const py::array& x_a) {
            auto x = require<float>(x_a, "x", 2, "(rows, head_dim)");
            const int64_t rows = x.shape(0), d = x.shape(1);
            py::array_t<int8_t> codes(std::vector<py::ssize_t>{rows, d});
            py::array_t<float> scales(std::vector<py::ssize_t>{rows, q8_blocks(d)});
            {
                py::gil_scoped_release nogil;
                quantize_rows_q8(x.data(), rows, d, codes.mutable_data(), scales.mutable_data());
            }
            return py::make_tuple(codes, scales);
        },
        py::arg("x"),
        "The q8 KV cache's rounding of x (rows, head_dim) float32: (codes int8 (rows, head_dim), scales\n"
        "float32 (rows, ceil(head_dim / 32))), per block of 32 values of a row scale = max |x| / 127 and\n"
        "codes = x / scale to nearest even (NaN scale for a block with NaN or inf).");
    m.def("swiglu", &py_swiglu, py::arg("gate"), py::arg("up"), "silu(gate) * up, float32, same shapes.");
    m.def(
        "round_activations_i16",
        [](const py::array& x_a, int group, int bits) {
            if (bits != 16 && bits != 8) throw py::value_error("bits: expected 16 or 8, got " + std::to_string(bits));
            auto x = require<float>(x_a, "x", 2, "(m, k)");
            py::array_t<float> out({x.shape(0), x.shape(1)});
            try {
                py::gil_scoped_release nogil;
                bitplane_round_i16(x.data(), x.shape(0), x.shape(1), group, out.mutable_data(),
                                   bits == 8 ? 127.0f : 32767.0f);
            } catch (const std::invalid_argument& e) {
                throw py::value_error(e.what());
            }
            return out;
        },
        py::arg("x"), py::arg("group"), py::arg("bits") = 16,
        "x̂: x (m, k) float32 rounded to int16 per row and group of `group` columns (s = absmax / 32767,\n"
        "x̂ = s * rint(x / s)), what bitplane_matmul(..., act='i16') multiplies; bits=8: s = absmax / 127,\n"
        "act='i8'. NaN and inf are kept\n"
        "(an inf makes its group's scale inf, so the group's finite elements become NaN).");
    m.def("quantize_activations", &py_quantize_activations, py::arg("x"), py::arg("group"), py::arg("bits"),
          "x (m, k) float32 quantized to symmetric `bits`-bit integers per row and group of `group` columns\n"
          "(scale = absmax / (2^(bits-1) - 1), round half to even) and back: the CUDA tensor-core GEMV's\n"
          "activations at bits = 8.");
    m.def("nested_gptq_block", &py_nested_gptq_block, py::arg("w"), py::arg("u"), py::arg("scale"), py::arg("min"),
          py::arg("group_of"), py::arg("views"), py::arg("lam"), py::arg("max_bits") = 8, py::arg("threaded") = true,
          "One block of view-aware GPTQ (cpp/src/ops/ops.h, nested_gptq_block): w (V, n, b) float32, each view's\n"
          "targets, updated in place; u (b, b) float64 upper Cholesky factor of the block of H^-1; scale, min\n"
          "(n, n_groups) float32; group_of (b,) int32; views (V,) int32; lam (V,) float64 view weights.\n"
          "Returns (codes (n, b) uint8, err (V, n, b) float32).");
    m.def(
        "softmax",
        [](const py::array& a) {
            auto l = logits_1d(a, "x");
            py::array_t<float> out(l.shape(0));
            std::memcpy(out.mutable_data(), l.data(), l.size() * sizeof(float));
            softmax_(out.mutable_data(), out.shape(0));
            return out;
        },
        py::arg("x"), "softmax of x (n,) float32.");
    m.def(
        "argmax",
        [](const py::array& a) {
            auto l = logits_1d(a, "x");
            return argmax(l.data(), l.shape(0));
        },
        py::arg("x"), "Index of the largest element of x (n,) float32, the first on ties.");
    m.def(
        "entropy_and_top1",
        [](const py::array& a) {
            auto l = logits_1d(a, "logits");
            float e = 0, p = 0;
            entropy_and_top1(l.data(), l.shape(0), &e, &p);
            return py::make_tuple(e, p);
        },
        py::arg("logits"), "(entropy in nats, top-1 probability) of softmax(logits (vocab,) float32).");

    py::class_<Sampler>(m, "Sampler", "Seeded token sampler (std::mt19937_64): same seed, same tokens.")
        .def(py::init<uint64_t>(), py::arg("seed") = 0)
        .def("seed", &Sampler::seed, py::arg("seed"))
        .def(
            "sample",
            [](Sampler& s, const py::array& a, float temperature, int64_t top_k, float top_p, float min_p,
               float repetition_penalty, const py::object& recent_o) {
                auto l = logits_1d(a, "logits");
                SamplerParams p;
                p.temperature = temperature;
                p.top_k = top_k;
                p.top_p = top_p;
                p.min_p = min_p;
                p.repetition_penalty = repetition_penalty;
                std::vector<int32_t> recent;
                if (!recent_o.is_none()) recent = recent_o.cast<std::vector<int32_t>>();
                return s.sample(l.data(), l.shape(0), p, recent.data(), static_cast<int64_t>(recent.size()));
            },
            py::arg("logits"), py::arg("temperature") = 1.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f,
            py::arg("min_p") = 0.0f, py::arg("repetition_penalty") = 1.0f, py::arg("recent") = py::none(),
            "Draw one token id from logits (vocab,) float32 after the penalty and filters (see ops.h).");
}
