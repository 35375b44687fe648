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


def quantize(w: np.ndarray, max_bits: int = 8, group_size: int = 128):
    """Quantize w (N, K) float to B-bit codes.

    Returns (codes (N, K) uint8, qparams (N, n_groups, 2) float16 holding (scale, min)).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    shape = LinearShape(w.shape[0], w.shape[1], max_bits, group_size)
    if not np.all(np.isfinite(w)):
        raise ValueError("weight contains inf or nan")
    n, k, g = shape.n, shape.k, shape.group_size
    ng = shape.n_groups
    qmax = (1 << max_bits) - 1
    # Pad the ragged last group by repeating its first column so that min/max ignore the padding.
    kp = ng * g
    if kp != k:
        wp = np.concatenate([w, np.repeat(w[:, (ng - 1) * g:(ng - 1) * g + 1], kp - k, axis=1)], axis=1)
    else:
        wp = w
    wg = wp.reshape(n, ng, g)
    lo = wg.min(axis=2)
    hi = wg.max(axis=2)
    m16 = _f16_round(lo, -1.0)
    if not np.all(np.isfinite(m16)):
        raise ValueError("weight magnitude exceeds the fp16 range of the group parameters")
    s16 = _f16_round((hi - m16.astype(np.float32)) / np.float32(qmax), +1.0)
    if not np.all(np.isfinite(s16)):
        raise ValueError("weight range exceeds the fp16 range of the group scales")
    s = s16.astype(np.float32)[:, :, None]
    m = m16.astype(np.float32)[:, :, None]
    safe = np.where(s > 0, s, np.float32(1.0))
    c = np.rint((wg - m) / safe)
    c = np.where(s > 0, c, 0.0)
    codes = np.clip(c, 0, qmax).astype(np.uint8).reshape(n, kp)[:, :k]
    qparams = np.stack([s16, m16], axis=-1)
    return np.ascontiguousarray(codes), qparams


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


def quantize_to_planes(w: np.ndarray, max_bits: int = 8, group_size: int = 128):
    """w (N, K) -> (planes (max_bits, plane_bytes) uint8, qparams (N, n_groups, 2) float16)."""
    codes, qparams = quantize(w, max_bits, group_size)
    return pack_planes(codes, max_bits), qparams
