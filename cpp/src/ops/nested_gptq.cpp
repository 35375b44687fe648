// For each row r, and for the block's columns j = 0, 1, ... in order (GPTQ, views v = 1..V):
//   c[r,j]    = argmin_c Σ_v λ_v (w_v[r,j] − q_v(c))²            over B-bit codes c
//   q_v(c)    = m + s · (⌊c / 2^(B−k_v)⌋ · 2^(B−k_v) + (2^(B−k_v) − 1)/2)   the k_v-bit view of c
//   e_v[r,j]  = (w_v[r,j] − q_v(c[r,j])) / U[j,j]
//   w_v[r,j'] −= e_v[r,j] · U[j,j']                                for j' > j in the block
// (s, m) = the (scale, min) of row r's group of column j; U = the upper Cholesky factor of the
// block of H⁻¹ (H = E[x xᵀ] of the linear's input, damped, columns in quantization order).
//
// Why: one file serves every view k (its codes' top k bits), so the codes must be chosen for all
// views at once. Each view keeps its own GPTQ target w_v (the weight plus the compensation of that
// view's own earlier errors), and the code is the compromise between the views' targets, weighted
// by λ_v. A view's low bits never change a lower view, so the high views compensate their errors
// through the low bits of later columns almost freely (docs/quantization.md).
//
// The argmin is exact (a branch-and-bound search over the bits, CodeSearch below). Rows are
// independent (the Python driver, nested_gptq.py, applies the block's errors to the
// later columns with one matrix product per view).
#include <cmath>
#include <stdexcept>
#include <string>

#include "ops/ops.h"
#include "thread_pool.h"

namespace flexquant {

namespace {

void check(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("nested_gptq_block: " + what);
}

// The exact argmin over the B-bit codes of Σ_v λ_v (t_v − q_v(c))² (t, q in B-bit code steps):
// depth-first over the bits from the most significant, the better child first, a prefix pruned
// when its bound (the exact cost of the views it fixes plus, for each other view, its cost at its
// own nearest value inside the prefix's interval) cannot beat the best code found.
// Ties go to the smaller code. Usually about 2·B prefixes are scored instead of 2^B codes.
struct CodeSearch {
    int B, n_views;
    const int32_t* views;
    const double* lambda;
    const double* half;  // (2^(B−k_v) − 1)/2 per view: the midpoint offset, in code steps
    double t[8];         // the targets of the current weight
    double best;
    int best_code;

    // The bound of the p-bit prefix q: exact for views k_v <= p, each other view at its best.
    double bound(int p, int q) const {
        const double lo = static_cast<double>(q << (B - p));
        double cost = 0.0;
        for (int v = 0; v < n_views; ++v) {
            const int k = views[v];
            double d;
            if (k <= p) {
                d = t[v] - (static_cast<double>((q >> (p - k)) << (B - k)) + half[v]);
            } else {  // the view's nearest value inside the interval: lo + half + i·step, i < 2^(k−p)
                const double step = static_cast<double>(1 << (B - k));
                const double i = std::nearbyint((t[v] - lo - half[v]) / step);
                const double last = static_cast<double>((1 << (k - p)) - 1);
                d = t[v] - (lo + half[v] + step * (i < 0.0 ? 0.0 : (i > last ? last : i)));
            }
            cost += lambda[v] * d * d;
        }
        return cost;
    }

    void visit(int p, int q, double cost) {  // cost = bound(p, q) < best
        if (p == B) {
            if (cost < best || (cost == best && q < best_code)) {
                best = cost;
                best_code = q;
            }
            return;
        }
        const double c0 = bound(p + 1, 2 * q), c1 = bound(p + 1, 2 * q + 1);
        const bool one_first = c1 < c0;
        const double first = one_first ? c1 : c0, second = one_first ? c0 : c1;
        if (first <= best) visit(p + 1, 2 * q + (one_first ? 1 : 0), first);
        if (second <= best) visit(p + 1, 2 * q + (one_first ? 0 : 1), second);
    }

    int argmin() {
        best = INFINITY;
        best_code = 0;
        visit(0, 0, bound(0, 0));
        return best_code;
    }
};

}  // namespace

void nested_gptq_block(float* w, const double* u, const float* scale, const float* min, int64_t n_groups,
                       const int32_t* group_of, const int32_t* views, const double* lambda, int n_views,
                       int max_bits, int64_t n, int b, uint8_t* codes, float* err, ThreadPool* pool) {
    check(max_bits >= 2 && max_bits <= 8, "max_bits must be in 2..8, got " + std::to_string(max_bits));
    check(n_views >= 1 && n_views <= 8, "need 1..8 views, got " + std::to_string(n_views));
    check(n >= 0 && b >= 1, "need n >= 0 rows and b >= 1 columns, got n=" + std::to_string(n) +
                                ", b=" + std::to_string(b));
    for (int v = 0; v < n_views; ++v) {
        check(views[v] >= 1 && views[v] <= max_bits,
              "view " + std::to_string(views[v]) + " is outside 1.." + std::to_string(max_bits));
        check(lambda[v] >= 0.0 && std::isfinite(lambda[v]), "view weights must be finite and >= 0");
    }
    for (int j = 0; j < b; ++j) {
        check(group_of[j] >= 0 && group_of[j] < n_groups,
              "group index " + std::to_string(group_of[j]) + " of column " + std::to_string(j) + " is outside 0.." +
                  std::to_string(n_groups - 1));
        check(u[j * b + j] > 0.0, "U[" + std::to_string(j) + "," + std::to_string(j) + "] must be positive");
    }
    const int B = max_bits;
    double half[8];  // (2^(B−k) − 1)/2: the midpoint offset of view k, in B-bit code steps
    for (int v = 0; v < n_views; ++v) half[v] = ((1 << (B - views[v])) - 1) / 2.0;

    auto rows = [&](int64_t r0, int64_t r1) {
        CodeSearch cs{B, n_views, views, lambda, half, {}, 0.0, 0};
        for (int64_t r = r0; r < r1; ++r) {
            for (int j = 0; j < b; ++j) {
                const double s = scale[r * n_groups + group_of[j]];
                const double m = min[r * n_groups + group_of[j]];
                int c = 0;
                if (s > 0.0) {  // s == 0: a constant group, every code dequantizes to m
                    for (int v = 0; v < n_views; ++v) cs.t[v] = (w[(v * n + r) * b + j] - m) / s;
                    c = cs.argmin();
                }
                codes[r * b + j] = static_cast<uint8_t>(c);
                const double ujj = u[j * b + j];
                for (int v = 0; v < n_views; ++v) {
                    const int k = views[v];
                    const double q = m + s * (static_cast<double>((c >> (B - k)) << (B - k)) + half[v]);
                    float* wr = w + (v * n + r) * b;
                    const double e = (wr[j] - q) / ujj;
                    err[(v * n + r) * b + j] = static_cast<float>(e);
                    const double* ur = u + static_cast<int64_t>(j) * b;
                    for (int jj = j + 1; jj < b; ++jj) wr[jj] -= static_cast<float>(e * ur[jj]);
                }
            }
        }
    };
    if (pool)
        pool->parallel_for(n, 64, rows);
    else
        rows(0, n);
}

}  // namespace flexquant
