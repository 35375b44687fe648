"""View-aware GPTQ: B-bit codes chosen for all of their k-bit views at once (issue 9).

One model file serves every view k: the top k bits of each B-bit code, dequantized at the midpoint
of the truncated interval (docs/format.md). Round-to-nearest codes make the 8-bit view good and
the low views merely nested; GPTQ (Frantar et al., 2022) makes one bit-width good by compensating
each column's rounding error on the not yet quantized columns, through the inverse Hessian
H⁻¹ (H = E[x xᵀ] of the linear's input on calibration text). Here every view v keeps its own
GPTQ target (the weight plus the compensation of that view's own earlier errors), and each code
is the compromise between the views' targets weighted by λ_v (`VIEW_USE`): the top bits follow
the low views, and the high views compensate their errors through the low bits of later columns,
which no lower view sees. The group parameters (scale, min) are the min-max ones of the weight,
so the format, the bytes per token and the kernels do not change.

The column loop of each block runs in C++ (`_core.ops.nested_gptq_block`, cpp/src/ops/
nested_gptq.cpp); the update of the later blocks is one matrix product per view here (numpy's
BLAS). `block_reference` is the same block in numpy, for the tests.
"""
from __future__ import annotations

import numpy as np

from . import bitplane

#: Weight of each view k in the codes' objective, on the scale of the view's own step (λ_k =
#: use_k / 4^(B−k) per squared B-bit step). Measured on SmolLM2 (docs/quantization.md): the
#: 4-bit view leads, the others at 0.3 keep every view better than independent round-to-nearest.
VIEW_USE = {3: 0.3, 4: 1.0, 5: 0.3, 6: 0.3, 7: 0.3, 8: 0.3}
#: Dampening of H: this fraction of its mean diagonal is added to the diagonal. GPTQ's usual 0.01
#: over-fits the calibration activations when they are few against K (docs/quantization.md).
DAMP = 0.1
#: Columns per block: the errors of a block reach the later blocks in one matrix product.
BLOCK = 128
#: Rows quantized together (bounds the memory: views × rows × K float32 targets).
ROW_CHUNK = 8192


def view_weights(use: dict[int, float], max_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(views (V,) int32, λ (V,) float64) of the views 1..max_bits with a positive weight."""
    ks = sorted(k for k, u in use.items() if u > 0 and 1 <= k <= max_bits)
    if not ks:
        raise ValueError(f"no view of 1..{max_bits} bits has a positive weight in {use}")
    bad = [u for u in use.values() if not np.isfinite(u) or u < 0]
    if bad:
        raise ValueError(f"view weights must be finite and >= 0, got {bad[0]}")
    return np.array(ks, np.int32), np.array([use[k] / 4.0 ** (max_bits - k) for k in ks], np.float64)


def _check_hessian(h: np.ndarray) -> None:
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hessian: expected a square matrix, got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("hessian contains inf or nan")
    d = np.diag(h)
    if np.any(d < 0):
        j = int(np.argmax(d < 0))
        raise ValueError(f"hessian: diagonal entry {j} is negative ({d[j]:.3g}): not a Gram matrix E[x xᵀ]")


def inverse_hessian_factor(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """U (K, K) float64: the upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, H (K, K).

    Columns no calibration input reached (a zero diagonal) get a unit diagonal: their error then
    moves nothing. Raises ValueError if H is not finite or not positive semi-definite enough to
    factor even after raising the dampening a hundredfold."""
    h = np.array(h, np.float64)
    _check_hessian(h)
    dead = np.diag(h) == 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(h)))
    for f in (1.0, 10.0, 100.0):
        hd = h.copy()
        hd[np.diag_indices_from(hd)] += f * damp * mean_diag
        try:
            lower = np.linalg.cholesky(hd)
            # H⁻¹ = L⁻ᵀ L⁻¹; its upper Cholesky factor is chol(H⁻¹)ᵀ
            inv = np.linalg.inv(lower)
            return np.ascontiguousarray(np.linalg.cholesky(inv.T @ inv).T)
        except np.linalg.LinAlgError:
            continue
    raise ValueError("hessian is not positive definite, even with 100x the dampening")


def block_reference(w: np.ndarray, u: np.ndarray, scale: np.ndarray, mn: np.ndarray, group_of: np.ndarray,
                    views: np.ndarray, lam: np.ndarray, max_bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin of `_core.ops.nested_gptq_block` (an exhaustive argmin over the codes where C++
    searches a tree; the smaller code on ties, as there), for the tests: w (V, n, b) updated in
    place; returns (codes (n, b), err (V, n, b))."""
    nv, n, b = w.shape
    half = ((1 << (max_bits - views)) - 1) / 2.0  # (V,)
    allc = np.arange(1 << max_bits)
    vals = ((allc[None, :] >> (max_bits - views[:, None])) << (max_bits - views[:, None])) + half[:, None]  # (V, C)
    codes = np.zeros((n, b), np.uint8)
    err = np.zeros((nv, n, b), np.float32)
    for j in range(b):
        s = scale[:, group_of[j]].astype(np.float64)
        m = mn[:, group_of[j]].astype(np.float64)
        safe = np.where(s > 0, s, 1.0)
        t = (w[:, :, j].astype(np.float64) - m) / safe  # (V, n)
        cost = np.einsum("v,vnc->nc", lam, (t[:, :, None] - vals[:, None, :]) ** 2)
        c = np.where(s > 0, np.argmin(cost, axis=1), 0)
        codes[:, j] = c
        q = m[None, :] + s[None, :] * vals[:, c]  # (V, n)
        e = (w[:, :, j] - q) / u[j, j]
        err[:, :, j] = e
        w[:, :, j + 1:] -= (e[:, :, None] * u[j, j + 1:][None, None, :]).astype(np.float32)
    return codes, err


def quantize(w: np.ndarray, hessian: np.ndarray, max_bits: int = 8, group_size: int = 128,
             use: dict[int, float] | None = None, act_order: bool = True, damp: float = DAMP,
             block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """View-aware GPTQ of w (N, K) with input Hessian `hessian` (K, K) = E[x xᵀ].

    Returns (codes (N, K) uint8, qparams (N, n_groups, 2) float16), as `bitplane.quantize`: the
    same min-max group parameters, other codes. act_order: quantize the columns in decreasing
    order of H's diagonal (GPTQ's "act order"; the groups stay the file's contiguous ones)."""
    from ._core import ops

    w = np.asarray(w, np.float32)
    _, qparams = bitplane.quantize(w, max_bits, group_size)  # checks w; its (scale, min) are kept
    n, k = w.shape
    hessian = np.asarray(hessian, np.float64)
    if hessian.shape != (k, k):
        raise ValueError(f"hessian: expected shape ({k}, {k}) for a weight of shape {w.shape}, got {hessian.shape}")
    views, lam = view_weights(VIEW_USE if use is None else use, max_bits)
    _check_hessian(hessian)
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(k)
    u = inverse_hessian_factor(hessian[np.ix_(order, order)], damp)
    scale = np.ascontiguousarray(qparams[..., 0].astype(np.float32))
    mn = np.ascontiguousarray(qparams[..., 1].astype(np.float32))
    group_of = (order // group_size).astype(np.int32)
    codes = np.empty((n, k), np.uint8)
    for r0 in range(0, n, ROW_CHUNK):
        r1 = min(n, r0 + ROW_CHUNK)
        targets = np.repeat(w[r0:r1][:, order][None], len(views), axis=0)  # (V, rows, K)
        sc, mc = scale[r0:r1], mn[r0:r1]
        for b0 in range(0, k, block):
            b1 = min(k, b0 + block)
            wb = np.ascontiguousarray(targets[:, :, b0:b1])
            cb, eb = ops.nested_gptq_block(wb, np.ascontiguousarray(u[b0:b1, b0:b1]), sc, mc,
                                           np.ascontiguousarray(group_of[b0:b1]), views, lam, max_bits)
            codes[r0:r1, order[b0:b1]] = cb
            if b1 < k:
                rest = u[b0:b1, b1:].astype(np.float32)
                for v in range(len(views)):
                    targets[v, :, b1:] -= eb[v] @ rest
    return codes, qparams


def quantize_to_planes(w: np.ndarray, hessian: np.ndarray, max_bits: int = 8, group_size: int = 128, **kw):
    """`quantize`, packed: (planes (max_bits, plane_bytes) uint8, qparams (N, n_groups, 2) float16)."""
    codes, qparams = quantize(w, hessian, max_bits, group_size, **kw)
    return bitplane.pack_planes(codes, max_bits), qparams
