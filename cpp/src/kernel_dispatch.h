// Internal: the CUDA dispatcher's decisions as plain C++ (no CUDA), so that the CPU build and its
// tests hold them too (tests/test_kernel_dispatch.py drives them with made-up measurements through
// the binding). cuda/forward.cu supplies the measurements of the GPU (CudaForward::tune) and applies
// the table (CudaForward::set_kernel_table).
//
// The kernels, by name (the names of KernelChoice::gemm and of `rejected`):
//   GEMV  "tc"      int8 activations on the binary tensor cores, 8 rows per launch (the reference)
//         "mma"     int8 activations on the s8 tensor cores, 16 rows per launch
//         "mma_a16" fp16 activations on the f16 tensor cores, 16 rows per launch (the reference)
//   GEMM  "a8", "a8_wg" (int8), "a16" (fp16)
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "flexquant/engine.h"  // KernelChoice

namespace flexquant::dispatch {

// Largest relative L2 error of a row accepted from a candidate kernel against the reference GEMV.
// Both compute the same thing: the same exact integer sums per group (int8) or the same fp16
// products with fp32 accumulation (fp16), so they differ by the fp32 rounding of per-group terms,
// about 1e-6 of a row's norm (tests/test_cuda_ops.py bounds a kernel by twice the fp32-against-fp64
// error of the same arithmetic). One element wrong by its own size in a row of n >= 2048 outputs is
// about 1/sqrt(n) >= 0.02 of the row; an element a kernel missed stays NaN (its output is poisoned).
constexpr double MAX_ROW_ERROR = 1e-4;

// Rows one launch of a GEMV kernel takes.
inline int64_t gemv_launch_rows(const std::string& gemv) { return gemv == "tc" ? 8 : 16; }

// One group of layer linears tune() measures together: one shape and activation family.
struct TuneGroup {
    int64_t n = 0, k = 0;
    bool int8 = true;       // int8 activations (reference "tc"), else fp16 ("mma_a16")
    bool mma_ok = false;    // int8: the MMA GEMV takes the group size
    bool wgmma_ok = false;  // int8: a8_wg can run every layer linear of the shape
    int bits_min = 2, bits_max = 8;
    int64_t max_m = 256;     // rows of the GEMM choice and of a GEMM check (tune's max_m, >= 16)
    int64_t odd_rows = 300;  // rows of the other GEMM check: a partial row tile past the first two
    int64_t all_rows = 4096; // decode_max_m when no GEMM is accepted: more than any pass, so the GEMV
                             // takes every pass (whatever rows per pass the engine allows)
};

// A kernel that cannot run here, found before it ran (Probe::error throws it): choose() leaves the
// kernel out. Any other exception is a failure of the measurement itself and passes through.
struct Refused : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The measurements, supplied by the caller, on groups of choose()'s argument by index.
//   error(g, kernel, bits, m): the largest relative L2 error of a row of `kernel` against group g's
//     reference GEMV on m rows of the same random input (+inf when an element is not finite), on
//     one of its linears; throws Refused when the kernel cannot run there.
//   time(gs, kernel, bits, m): the time of all the linears of the groups gs on `kernel` (any unit,
//     the same for all).
struct Probe {
    std::function<double(size_t, const std::string&, int, int64_t)> error;
    std::function<double(const std::vector<size_t>&, const std::string&, int, int64_t)> time;
};

// Rows at which the GEMV kernels are compared (the decode step, small batches, one MMA launch).
inline const std::array<int64_t, 5>& mma_rows() {
    static const std::array<int64_t, 5> rows = {16, 8, 4, 2, 1};  // largest first: see choose()
    return rows;
}

// The entries of every group, one per group and bit-width bits_min..bits_max in group order
// (act_bits, mma_min_rows, gemm, decode_max_m and rejected all set):
//  1. correctness: each candidate (int8: "mma" on every row count 1..16, each its own code path;
//     "a8", "a8_wg" where it runs; fp16: "a16") against the reference at every bit-width, GEMMs on
//     max_m and odd_rows rows. A candidate over MAX_ROW_ERROR anywhere, or Refused, is left out,
//     and named with its error in `rejected`.
//  2. the GEMV kernel, one per linear (the captured decode step holds it while the bits change) and
//     one for all the int8 groups of one k (their linears read the same input and share launches:
//     q, k, v; gate, up): "tc" against "mma" over all of them at m = 16, 8, 4, 2, 1, summed over
//     the bit-widths; mma_min_rows = the least m from which "mma" wins at every larger measured m,
//     except 16 -> 9 (from 9 rows "tc" takes two launches, which cost about what it loses at 16);
//     0: never, and for the whole family when "mma" cannot run or was left out in any group of it.
//  3. per group and bit-width, the GEMM: the faster accepted one on max_m rows; then the GEMV
//     against it at m = 2·L, 4·L, ... and max_m (L = the GEMV's launch rows) until the GEMM wins:
//     decode_max_m = the last m the GEMV won (>= min(L, max_m)). No accepted GEMM: all_rows.
inline std::vector<KernelChoice> choose(const std::vector<TuneGroup>& groups, const Probe& probe) {
    const size_t G = groups.size();
    std::vector<std::string> rejected(G);
    auto note = [&](size_t gi, const std::string& line) { rejected[gi] += (rejected[gi].empty() ? "" : "; ") + line; };
    auto agrees = [&](size_t gi, const std::string& kernel, const std::vector<int64_t>& rows) {
        const TuneGroup& g = groups[gi];
        for (int64_t m : rows)
            for (int bits = g.bits_min; bits <= g.bits_max; ++bits) {
                std::string why;
                try {
                    const double err = probe.error(gi, kernel, bits, m);
                    if (err <= MAX_ROW_ERROR) continue;  // (false for NaN too)
                    char line[160];
                    std::snprintf(line, sizeof line, "row error %.3g > %g", err, MAX_ROW_ERROR);
                    why = line;
                } catch (const Refused& ex) {  // e.g. a driver without the TMA entry point
                    why = ex.what();
                }
                note(gi, kernel + ": " + why + " at " + std::to_string(bits) + " bits, " + std::to_string(m) + " rows");
                return false;
            }
        return true;
    };

    // the GEMV kernel per family of int8 groups of one k
    std::vector<int64_t> every_launch;  // 16..1 rows
    for (int64_t m = 16; m >= 1; --m) every_launch.push_back(m);
    std::vector<char> mma_good(G, 0);
    for (size_t gi = 0; gi < G; ++gi)
        if (groups[gi].int8 && groups[gi].mma_ok) mma_good[gi] = agrees(gi, "mma", every_launch);
    std::vector<int> mma_from(G, 0);
    std::vector<char> family_done(G, 0);
    for (size_t gi = 0; gi < G; ++gi) {
        if (!groups[gi].int8 || family_done[gi]) continue;
        std::vector<size_t> family;
        bool all_good = true;
        for (size_t gj = gi; gj < G; ++gj)
            if (groups[gj].int8 && groups[gj].k == groups[gi].k) {
                family.push_back(gj);
                family_done[gj] = 1;
                all_good = all_good && mma_good[gj];
            }
        int from = 0;
        if (all_good) {
            const TuneGroup& g = groups[gi];
            for (int64_t m : mma_rows()) {
                double t_tc = 0, t_mma = 0;
                for (int bits = g.bits_min; bits <= g.bits_max; ++bits) {
                    t_tc += probe.time(family, "tc", bits, m);
                    t_mma += probe.time(family, "mma", bits, m);
                }
                if (!(t_mma < t_tc)) break;
                from = int(m);
            }
            if (from == 16) from = 9;
        } else {
            for (size_t gj : family)  // (a group whose own check failed has its line already)
                if (mma_good[gj])
                    note(gj, "mma: not used, as for every linear of k = " + std::to_string(groups[gj].k) +
                                 " (they share launches): another shape cannot run it or was left out");
        }
        for (size_t gj : family) mma_from[gj] = from;
    }

    std::vector<KernelChoice> out;
    for (size_t gi = 0; gi < G; ++gi) {
        const TuneGroup& g = groups[gi];
        const std::vector<size_t> self = {gi};
        // the GEMV of >= 16 rows (slices of one launch each)
        const std::string gemv = !g.int8 ? "mma_a16" : mma_from[gi] > 0 ? "mma" : "tc";
        std::vector<std::string> gemms;
        for (const char* kn : g.int8 ? std::vector<const char*>{"a8", "a8_wg"} : std::vector<const char*>{"a16"}) {
            if (std::string(kn) == "a8_wg" && !g.wgmma_ok) continue;
            std::vector<int64_t> rows = {g.max_m};
            if (g.odd_rows != g.max_m) rows.push_back(g.odd_rows);
            if (agrees(gi, kn, rows)) gemms.push_back(kn);
        }
        for (int bits = g.bits_min; bits <= g.bits_max; ++bits) {
            KernelChoice c;
            c.n = g.n;
            c.k = g.k;
            c.bits = bits;
            c.act_bits = g.int8 ? 8 : 16;
            c.mma_min_rows = g.int8 ? mma_from[gi] : -1;
            c.rejected = rejected[gi];  // (complete: the group's checks all ran above)
            c.decode_max_m = g.all_rows;
            if (!gemms.empty()) {
                std::string best = gemms.front();
                if (gemms.size() > 1) {
                    double t_best = std::numeric_limits<double>::infinity();
                    for (const std::string& kn : gemms) {
                        const double t = probe.time(self, kn, bits, g.max_m);
                        if (t < t_best) t_best = t, best = kn;
                    }
                }
                c.gemm = best;
                const int64_t one_launch = gemv_launch_rows(gemv);
                int64_t gemv_max = std::min(one_launch, g.max_m);
                for (int64_t m = std::min(2 * one_launch, g.max_m); m > gemv_max; m = std::min(2 * m, g.max_m)) {
                    if (probe.time(self, best, bits, m) < probe.time(self, gemv, bits, m)) break;
                    gemv_max = m;
                }
                c.decode_max_m = gemv_max;
            }
            out.push_back(c);
        }
    }
    return out;
}

// One linear as the table sees it.
struct LinearSlot {
    int64_t n = 0, k = 0;
    int act_bits = 8;        // its activations: 8 (int8), 16 (fp16), 0 (fp32: never on a GEMM)
    bool wgmma_ok = false;   // a8_wg can run it
    bool layer = true;       // a layer linear (false: the LM head, which keeps the defaults)
};

// What the dispatcher runs for one linear: the GEMV up to gemv_max[bits] rows, above it the GEMM
// (a8_wg where gemm_wg[bits], for int8); int8 GEMV launches of >= mma_from rows on "mma" (0: never).
struct LinearKernels {
    std::array<int64_t, 9> gemv_max{};
    std::array<char, 9> gemm_wg{};
    int mma_from = 0;
};

// The settings of every linear: the defaults (the GEMM from gemm_min_rows rows, gemm_min_rows 0 =
// never; a8_wg where wgmma_default and it runs; mma_from = mma_min_rows), then each entry of the
// table in order (a later entry for the same linear and bit-width wins) on the layer linears of its
// shape whose activations it is for (act_bits 0: int8 and fp16 alike). A kernel a linear cannot run
// is not set (a8_wg where wgmma_ok is false; the MMA GEMV's group sizes are the caller's check).
inline std::vector<LinearKernels> apply(const std::vector<KernelChoice>& table, const std::vector<LinearSlot>& lin,
                                        int64_t gemm_min_rows, bool wgmma_default, int mma_min_rows) {
    std::vector<LinearKernels> out(lin.size());
    for (size_t j = 0; j < lin.size(); ++j) {
        out[j].gemv_max.fill(gemm_min_rows > 0 ? gemm_min_rows - 1 : std::numeric_limits<int64_t>::max());
        out[j].gemm_wg.fill(wgmma_default && lin[j].wgmma_ok ? 1 : 0);
        out[j].mma_from = mma_min_rows;
    }
    for (const KernelChoice& c : table)
        for (size_t j = 0; j < lin.size(); ++j) {
            const LinearSlot& l = lin[j];
            const bool act = c.act_bits == 0 ? l.act_bits != 0 : c.act_bits == l.act_bits;
            if (!l.layer || l.n != c.n || l.k != c.k || !act || c.bits < 0 || c.bits > 8) continue;
            out[j].gemv_max[size_t(c.bits)] = c.decode_max_m;
            if (l.act_bits == 8 && !c.gemm.empty()) out[j].gemm_wg[size_t(c.bits)] = c.gemm == "a8_wg" && l.wgmma_ok;
            if (l.act_bits == 8 && c.mma_min_rows >= 0) out[j].mma_from = c.mma_min_rows;
        }
    return out;
}

// The first layer linear of shape (n, k), of any activations (set_activation_bits may move it to
// int8 later), that a8_wg cannot run; lin.size() when there is none. tune() offers a8_wg for a
// shape only where this finds none, and refusal() refuses a table by the same rule.
inline size_t a8_wg_blocker(const std::vector<LinearSlot>& lin, int64_t n, int64_t k) {
    for (size_t j = 0; j < lin.size(); ++j)
        if (lin[j].layer && lin[j].n == n && lin[j].k == k && !lin[j].wgmma_ok) return j;
    return lin.size();
}

// "" when every entry can run on these linears, else why not: an a8_wg entry whose shape has a
// linear a8_wg_blocker finds. group_size(j) names the cause.
inline std::string refusal(const std::vector<KernelChoice>& table, const std::vector<LinearSlot>& lin,
                           const std::function<int(size_t)>& group_size) {
    for (size_t i = 0; i < table.size(); ++i) {
        const KernelChoice& c = table[i];
        if (c.gemm != "a8_wg") continue;
        const size_t j = a8_wg_blocker(lin, c.n, c.k);
        if (j == lin.size()) continue;
        const int gs = group_size(j);
        return "kernel table entry " + std::to_string(i) + ": gemm 'a8_wg' cannot run linear " + std::to_string(j) +
               " (" + std::to_string(c.n) + " x " + std::to_string(c.k) + "): " +
               (gs % 128 != 0 ? "its group size " + std::to_string(gs) + " is not a multiple of 128"
                              : std::string("this GPU or build has no sm_90a wgmma"));
    }
    return "";
}

}  // namespace flexquant::dispatch
