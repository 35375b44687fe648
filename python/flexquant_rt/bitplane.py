"""Reference (numpy) implementation of the bit-plane weight store.

Every kernel -- the C++ CPU kernels and the CUDA kernels -- is tested against the functions here.
The layout is documented in docs/format.md; this module is its executable definition.

Quantization of one linear weight W (N, K), max_bits B, group size G along K:

    per row n and group g (columns [g*G, min((g+1)*G, K))):
        m = fp16 round-down of min(W[n, group])          # min ("zero point" in weight units)
        s = fp16 round-up of (max(W[n, group]) - m) / (2^B - 1)
        c = clip(rint((W - m) / s), 0, 2^B - 1)          # B-bit code, |W - (s*c + m)| <= s/2

    k-bit view (2 <= k <= B): keep the top k bits of c and take the middle of the interval of
    B-bit codes that share them:
        c_k = c >> (B - k)
        W_k = s_k * c_k + m_k,  s_k = s * 2^(B-k),  m_k = m + s * (2^(B-k) - 1) / 2
    so |W - W_k| <= s_k / 2: half the k-bit step, i.e. the view is a valid k-bit quantizer.

Rounding m down and s up (in fp16) makes [m, m + (2^B-1) s] cover the group, so no code clips
and the bound above holds with the stored fp16 parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Rows per tile: the 8 columns of a b1 m16n8k256 mma's B operand (one warp, 32 lanes).
TILE_N = 8
#: K bits per lane word.
WORD_BITS = 32
#: K granularity of the layout: one 32-bit word for each of the 4 lanes that hold a row.
TILE_K = 128
#: K covered by one full super-chunk: 4 words per lane = one 16-byte load per GPU thread.
SUPER_K = 512
MIN_BITS = 2
MAX_BITS_LIMIT = 8


def ceil_to(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass(frozen=True)
class LinearShape:
    """Geometry of one bit-plane linear of N output rows and K inputs."""

    n: int
    k: int
    max_bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.n <= 0 or self.k <= 0:
            raise ValueError(f"linear shape must be positive, got N={self.n}, K={self.k}")
        if not MIN_BITS <= self.max_bits <= MAX_BITS_LIMIT:
            raise ValueError(f"max_bits must be in {MIN_BITS}..{MAX_BITS_LIMIT}, got {self.max_bits}")
        if self.group_size <= 0 or self.group_size % WORD_BITS:
            raise ValueError(f"group_size must be a positive multiple of {WORD_BITS}, got {self.group_size}")

    @property
    def n_pad(self) -> int:
        return ceil_to(self.n, TILE_N)

    @property
    def k_pad(self) -> int:
        return ceil_to(self.k, TILE_K)

    @property
    def n_groups(self) -> int:
        return -(-self.k // self.group_size)

    @property
    def plane_bytes(self) -> int:
        """Bytes of one bit plane: one bit per (padded) weight."""
        return self.n_pad * self.k_pad // 8

    @property
    def qparams_bytes(self) -> int:
        """fp16 (scale, min) per row and group."""
        return self.n * self.n_groups * 2 * 2

    def bytes_at(self, bits: int) -> int:
        """Bytes a matrix-vector product reads at the k-bit view: k planes plus the group params."""
        check_bits(bits, self.max_bits)
        return bits * self.plane_bytes + self.qparams_bytes


def check_bits(bits: int, max_bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= max_bits:
        raise ValueError(f"bit-width must be an integer in {MIN_BITS}..{max_bits}, got {bits!r}")


def _f16_round(x: np.ndarray, direction: float) -> np.ndarray:
    """Round float32 x to float16, toward +inf (direction=+1) or -inf (direction=-1)."""
    h = x.astype(np.float16)
    off = (h.astype(np.float32) - x) * direction < 0  # rounded the wrong way
    h[off] = np.nextafter(h[off], np.float16(direction * np.inf))
    return h


#: Quantization methods of `quantize` (docs/format.md, "Choosing the group parameters").
METHODS = ("minmax", "multiview")
#: Default relative use of the views k = 2..8 in the multi-view objective: views the controller
#: actually runs (3..8) count, 2 bits is only a floor.
DEFAULT_VIEW_USE = {2: 0.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0, 7: 1.0, 8: 1.0}
#: Candidate (low, high) clip fractions of the group range tried by the multi-view search:
#: lo' = lo + a (hi - lo), hi' = hi - b (hi - lo); negative = widen.
SHRINK_FRACTIONS = (0.0, 0.03, 0.06)


def clip_candidates(max_bits: int) -> list[tuple[float, float]]:
    """(a, b) candidates: every pair of SHRINK_FRACTIONS, and for each view k < B the widening that
    makes the k-bit view exactly the min-max round-to-nearest k-bit grid of the group (its first
    and last midpoints on the group's min and max)."""
    cands = [(a, b) for a in SHRINK_FRACTIONS for b in SHRINK_FRACTIONS]
    for k in range(MIN_BITS + 1, max_bits):
        step = 1 << (max_bits - k)
        e = (step - 1) / 2 / ((1 << max_bits) - step)
        cands.append((-e, -e))
    return cands


def _pad_groups(w: np.ndarray, shape: "LinearShape") -> np.ndarray:
    """(N, n_groups, G) view of w; the ragged last group is padded by repeating its first column
    (min/max ignore it; the padding's codes are cut off again)."""
    n, k, g, ng = shape.n, shape.k, shape.group_size, shape.n_groups
    kp = ng * g
    if kp != k:
        w = np.concatenate([w, np.repeat(w[:, (ng - 1) * g:(ng - 1) * g + 1], kp - k, axis=1)], axis=1)
    return w.reshape(n, ng, g)


def _group_params(lo: np.ndarray, hi: np.ndarray, qmax: int):
    """fp16 (scale, min) covering [lo, hi]: min rounded down, scale rounded up."""
    m16 = _f16_round(lo, -1.0)
    if not np.all(np.isfinite(m16)):
        raise ValueError("weight magnitude exceeds the fp16 range of the group parameters")
    s16 = _f16_round((hi - m16.astype(np.float32)) / np.float32(qmax), +1.0)
    if not np.all(np.isfinite(s16)):
        raise ValueError("weight range exceeds the fp16 range of the group scales")
    return s16, m16


def _codes(wg: np.ndarray, s16: np.ndarray, m16: np.ndarray, qmax: int) -> np.ndarray:
    """Nearest B-bit code (float, clipped) of every weight of (N, ng, G) wg."""
    s = s16.astype(np.float32)[:, :, None]
    m = m16.astype(np.float32)[:, :, None]
    safe = np.where(s > 0, s, np.float32(1.0))
    c = np.rint((wg - m) / safe)
    c = np.where(s > 0, c, np.float32(0.0))
    return np.clip(c, 0, qmax, out=c)


def view_error(wg: np.ndarray, c: np.ndarray, s16: np.ndarray, m16: np.ndarray, max_bits: int,
               view_weight: dict[int, float], col_weight: np.ndarray | None = None) -> np.ndarray:
    """Σ_k view_weight[k] Σ_i col_weight_i (w_i - W_k,i)^2 per group (N, ng) for codes c (float)."""
    s = s16.astype(np.float32)[:, :, None]
    m = m16.astype(np.float32)[:, :, None]
    tot = np.zeros(wg.shape[:2], dtype=np.float32)
    for k, lam in view_weight.items():
        if lam == 0:
            continue
        step = np.float32(1 << (max_bits - k))
        ck = np.floor(c / step) if step > 1 else c
        d = wg - (ck * step + (step - 1) / 2) * s - m
        d *= d
        if col_weight is not None:
            d *= col_weight
        tot += np.float32(lam) * d.sum(axis=2)
    return tot


def quantize(w: np.ndarray, max_bits: int = 8, group_size: int = 128, method: str = "minmax",
             view_use: dict[int, float] | None = None, col_weight: np.ndarray | None = None):
    """Quantize w (N, K) float to B-bit codes.

    method "minmax": (s, m) cover the group's [min, max]; "multiview": per group, the (s, m) of
    the clip candidates `clip_candidates` that minimises Σ_k use_k 4^k ||w - W_k||^2 over the views
    k (view_use, default DEFAULT_VIEW_USE; 4^k puts every view's error on the scale of its own
    step), optionally weighted per input column by col_weight (K,) (e.g. mean squared
    activations). Codes are always the nearest B-bit code, whose truncations are then the
    nearest k-bit view codes too (docs/format.md).

    Returns (codes (N, K) uint8, qparams (N, n_groups, 2) float16 holding (scale, min)).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r} (known: {', '.join(METHODS)})")
    shape = LinearShape(w.shape[0], w.shape[1], max_bits, group_size)
    if not np.all(np.isfinite(w)):
        raise ValueError("weight contains inf or nan")
    n, k = shape.n, shape.k
    qmax = (1 << max_bits) - 1
    wg = _pad_groups(w, shape)
    lo = wg.min(axis=2)
    hi = wg.max(axis=2)
    s16, m16 = _group_params(lo, hi, qmax)
    c = _codes(wg, s16, m16, qmax)
    if method == "multiview" and max_bits > MIN_BITS:
        use = DEFAULT_VIEW_USE if view_use is None else view_use
        vw = {b: float(use.get(b, 0.0)) * 4.0 ** b for b in range(MIN_BITS, max_bits + 1)}
        cw = None
        if col_weight is not None:
            cw = _pad_groups(np.asarray(col_weight, np.float32).reshape(1, k), LinearShape(1, k, max_bits, group_size))
        best = view_error(wg, c, s16, m16, max_bits, vw, cw)
        r = hi - lo
        for a, b in clip_candidates(max_bits):
            if a == 0 and b == 0:
                continue
            lo_c, hi_c = lo + np.float32(a) * r, hi - np.float32(b) * r
            ok = hi_c > lo_c
            s_c, m_c = _group_params(np.where(ok, lo_c, lo), np.where(ok, hi_c, hi), qmax)
            c_c = _codes(wg, s_c, m_c, qmax)
            e = view_error(wg, c_c, s_c, m_c, max_bits, vw, cw)
            better = ok & (e < best)
            best = np.where(better, e, best)
            s16 = np.where(better, s_c, s16)
            m16 = np.where(better, m_c, m16)
            c = np.where(better[:, :, None], c_c, c)
    codes = c.astype(np.uint8).reshape(n, -1)[:, :k]
    qparams = np.stack([s16, m16], axis=-1)
    return np.ascontiguousarray(codes), qparams


def nested_gptq(w: np.ndarray, hessian: np.ndarray, qparams: np.ndarray, max_bits: int = 8,
                group_size: int = 128, anchor: int = 4, tol: float | None = None, damp: float = 0.01,
                block: int = 128) -> np.ndarray:
    """View-nested error feedback (GPTQ with the views as a chain of constraints).

    With the group parameters qparams fixed, choose the B-bit codes of w (N, K) so that every
    view from `anchor` up is a GPTQ quantizer of w for the input second moments `hessian`
    (K, K) = E[x x^T]: one GPTQ pass per view k = anchor..B, each starting from w with its own
    error feedback; pass `anchor` is free, pass k picks the k-bit code among the two whose top
    k-1 bits are the code pass k-1 chose (the views must stay nested). Views below the anchor are
    its truncations. tol (in B-bit code steps): every view's code must stay within tol steps of
    the nearest B-bit code of w (None: no limit), which bounds what the feedback may cost the
    high views. Returns codes (N, K) uint8.
    """
    w = np.asarray(w, dtype=np.float64)
    n, kdim = w.shape
    shape = LinearShape(n, kdim, max_bits, group_size)
    check_bits(anchor, max_bits)
    col_group = np.arange(kdim) // group_size
    s = qparams[..., 0].astype(np.float64)[:, col_group]
    m = qparams[..., 1].astype(np.float64)[:, col_group]
    safe = np.where(s > 0, s, 1.0)
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(kdim)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    qmax = (1 << max_bits) - 1
    x0 = np.clip(np.rint((w - m) / safe), 0, qmax)  # nearest B-bit code of every weight
    prev = None  # codes of the previous view
    for k in range(anchor, max_bits + 1):
        sh = max_bits - k
        step = float(1 << sh)
        off = (step - 1) / 2
        top = (1 << k) - 1
        wk = w.copy()
        codes = np.zeros((n, kdim), dtype=np.int64)
        for b0 in range(0, kdim, block):
            b1 = min(b0 + block, kdim)
            err = np.zeros((n, b1 - b0))
            for i in range(b0, b1):
                x = wk[:, i]
                j = np.floor(np.clip(np.rint((x - m[:, i]) / safe[:, i]), 0, qmax) / step)
                lo_j = np.zeros(n) if prev is None else 2 * prev[:, i]
                hi_j = np.full(n, top) if prev is None else 2 * prev[:, i] + 1
                if tol is not None:
                    lo_j = np.maximum(lo_j, np.floor(np.maximum(x0[:, i] - tol, 0) / step))
                    hi_j = np.minimum(hi_j, np.floor(np.minimum(x0[:, i] + tol, qmax) / step))
                j = np.clip(j, lo_j, hi_j)
                codes[:, i] = j
                q = (j * step + off) * s[:, i] + m[:, i]
                e = (x - q) / hinv[i, i]
                wk[:, i + 1:b1] -= np.outer(e, hinv[i, i + 1:b1])
                err[:, i - b0] = e
            wk[:, b1:] -= err @ hinv[b0:b1, b1:]
        prev = codes
    return prev.astype(np.uint8)


def view_params(qparams: np.ndarray, bits: int, max_bits: int):
    """(scale_k, min_k) float32 (N, n_groups) of the k-bit view."""
    check_bits(bits, max_bits)
    s = qparams[..., 0].astype(np.float32)
    m = qparams[..., 1].astype(np.float32)
    shift = max_bits - bits
    s_k = s * np.float32(1 << shift)
    m_k = m + s * np.float32(((1 << shift) - 1) / 2.0)
    return s_k, m_k


def dequantize(codes: np.ndarray, qparams: np.ndarray, bits: int, max_bits: int, group_size: int) -> np.ndarray:
    """The k-bit view (N, K) float32 of codes (N, K) uint8 with qparams (N, n_groups, 2)."""
    n, k = codes.shape
    s_k, m_k = view_params(qparams, bits, max_bits)
    ck = (codes >> (max_bits - bits)).astype(np.float32)
    col_group = np.arange(k) // group_size
    return ck * s_k[:, col_group] + m_k[:, col_group]


# ---------------------------------------------------------------------------------------------
# Plane layout ("tc8x512", docs/format.md)
#
# plane p (0 = most significant) of a linear is n_pad * k_pad / 8 bytes:
#   for each row tile rt of 8 rows, for each super-chunk s of the padded K range
#   (K [512 s, 512 s + 128 W), W = min(4, (k_pad - 512 s) / 128) words per lane),
#   for each lane l = 4 g + t (g = row in tile, t = 0..3), for each j < W:
#     one little-endian uint32 whose bit b is bit (B-1-p) of code[8 rt + g, 512 s + 128 j + 32 t + b].
# ---------------------------------------------------------------------------------------------

def _bits_to_words(bits01: np.ndarray) -> np.ndarray:
    """(R, Kp) array of 0/1 -> (R, Kp/32) uint32, bit b of word w = element 32 w + b."""
    r, kp = bits01.shape
    packed = np.packbits(bits01.reshape(r, kp // 8, 8).astype(np.uint8), axis=-1, bitorder="little")
    return packed.reshape(r, kp // 8).view("<u4")


def _words_to_bits(words: np.ndarray) -> np.ndarray:
    r, nw = words.shape
    b = np.unpackbits(np.ascontiguousarray(words).astype("<u4").view(np.uint8), axis=-1, bitorder="little")
    return b.reshape(r, nw * 32)


def _tile_permutation(k_pad: int) -> np.ndarray:
    """Storage order of one row tile: entry i is the (row g, K-word) index g * k_pad/32 + K/32 of
    the i-th stored uint32."""
    nw = k_pad // WORD_BITS
    perm = []
    for s0 in range(0, k_pad, SUPER_K):
        w = min(4, (k_pad - s0) // TILE_K)
        for lane in range(32):
            g, t = divmod(lane, 4)
            for j in range(w):
                perm.append(g * nw + (s0 + TILE_K * j + WORD_BITS * t) // WORD_BITS)
    return np.array(perm, dtype=np.int64)


def pack_planes(codes: np.ndarray, max_bits: int) -> np.ndarray:
    """codes (N, K) uint8 -> planes (max_bits, plane_bytes) uint8 in the tc8x512 layout."""
    n, k = codes.shape
    shape = LinearShape(n, k, max_bits, WORD_BITS)
    np_, kp = shape.n_pad, shape.k_pad
    if codes.max(initial=0) >> max_bits:
        raise ValueError(f"codes exceed {max_bits} bits")
    c = np.zeros((np_, kp), dtype=np.uint8)
    c[:n, :k] = codes
    perm = _tile_permutation(kp)
    out = np.empty((max_bits, shape.plane_bytes), dtype=np.uint8)
    for p in range(max_bits):
        words = _bits_to_words((c >> (max_bits - 1 - p)) & 1)  # (np_, kp/32)
        tiles = words.reshape(np_ // TILE_N, TILE_N * (kp // WORD_BITS))[:, perm]
        out[p] = tiles.reshape(-1).view(np.uint8)
    return out


def unpack_planes(planes: np.ndarray, n: int, k: int, max_bits: int, bits: int | None = None) -> np.ndarray:
    """planes (>= bits, plane_bytes) -> codes of the top `bits` planes (N, K) uint8 (c >> (B - bits))."""
    bits = max_bits if bits is None else bits
    check_bits(bits, max_bits)
    shape = LinearShape(n, k, max_bits, WORD_BITS)
    np_, kp = shape.n_pad, shape.k_pad
    if planes.shape[0] < bits or planes.shape[1] != shape.plane_bytes:
        raise ValueError(f"planes shape {planes.shape} does not hold {bits} planes of {shape.plane_bytes} bytes")
    perm = _tile_permutation(kp)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    c = np.zeros((np_, kp), dtype=np.uint8)
    for p in range(bits):
        tiles = np.ascontiguousarray(planes[p]).view("<u4").reshape(np_ // TILE_N, -1)
        words = tiles[:, inv].reshape(np_, kp // WORD_BITS)
        c = (c << 1) | _words_to_bits(words).astype(np.uint8)
    return c[:n, :k]


def dequantize_planes(planes: np.ndarray, qparams: np.ndarray, n: int, k: int, bits: int,
                      max_bits: int, group_size: int) -> np.ndarray:
    """The k-bit view (N, K) float32 read from the first `bits` planes only."""
    ck = unpack_planes(planes, n, k, max_bits, bits)
    s_k, m_k = view_params(qparams, bits, max_bits)
    col_group = np.arange(k) // group_size
    return ck.astype(np.float32) * s_k[:, col_group] + m_k[:, col_group]


def quantize_to_planes(w: np.ndarray, max_bits: int = 8, group_size: int = 128, **kw):
    """w (N, K) -> (planes (max_bits, plane_bytes) uint8, qparams (N, n_groups, 2) float16);
    kw: `quantize`'s method options."""
    codes, qparams = quantize(w, max_bits, group_size, **kw)
    return pack_planes(codes, max_bits), qparams
