"""The CPU ops (flexquant_rt._core.ops) against numpy, torch and transformers references.

Every kernel family this CPU can run ('portable', 'vec128', 'avx2', 'gfni', 'avx512') is tested: the fixture `kernels`
selects each in turn. Inputs are fresh random values (never zeros); shapes are deliberately awkward
(N not a multiple of 8, K not a multiple of 128, group sizes that split super-chunks).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import flexquant_rt._core as core
from flexquant_rt import bitplane

ops = core.ops

KERNELS = ops.cpu_kernels_available()


@pytest.fixture(params=KERNELS)
def kernels(request):
    prev = ops.get_cpu_kernels()
    assert ops.set_cpu_kernels(request.param) == request.param
    yield request.param
    ops.set_cpu_kernels(prev)


@pytest.fixture
def threads():
    """Restores the ops pool's thread count after a test that changes it."""
    prev = ops.get_num_threads()
    yield
    ops.set_num_threads(prev)


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---- bit-plane matmul ---------------------------------------------------------------------------

# (N, K, group_size, max_bits): K = 300 (one short super-chunk), 576 (a last super-chunk of one
# 128-word), 1536 (three full ones), 640 with G = 96 (groups that straddle words of a super-chunk
# differently per lane), 1536 with G = 256; N never a multiple of 8 except 64.
MATMUL_SHAPES = [(13, 300, 32, 8), (64, 576, 64, 8), (21, 1536, 128, 8), (9, 1536, 256, 6),
                 (17, 640, 96, 8), (5, 128, 32, 3)]
MATMUL_M = [1, 2, 3, 8, 17]


@pytest.fixture(scope="module", params=MATMUL_SHAPES, ids=lambda s: "n{}_k{}_g{}_b{}".format(*s))
def linear(request):
    n, k, g, b = request.param
    rng = np.random.default_rng(n * 1000 + k)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.2, 2.0, (n, 1))).astype(np.float32)
    w += rng.uniform(-0.5, 0.5, (n, 1)).astype(np.float32)  # rows off zero: the min term matters
    planes, qparams = bitplane.quantize_to_planes(w, b, g)
    views = {bits: bitplane.dequantize_planes(planes, qparams, n, k, bits, b, g).astype(np.float64)
             for bits in range(2, b + 1)}
    return dict(n=n, k=k, g=g, b=b, planes=planes, qparams=qparams, views=views)


@pytest.mark.parametrize("path", ["decode", "gemm", "auto"])
def test_bitplane_matmul_matches_reference(linear, kernels, path):
    n, k, g, b = linear["n"], linear["k"], linear["g"], linear["b"]
    rng = np.random.default_rng(7)
    worst = 0.0
    for bits in range(2, b + 1):
        ref_w = linear["views"][bits]
        for m in MATMUL_M:
            x = rng.standard_normal((m, k)).astype(np.float32)
            ref = x.astype(np.float64) @ ref_w.T
            y = ops.bitplane_matmul(linear["planes"], linear["qparams"], n, k, b, g, bits, x, path)
            assert y.shape == (m, n) and y.dtype == np.float32
            err = rel_err(y, ref)
            # Same-precision baseline: a plain fp32 product of the same fp32 view and x.
            base = rel_err(x @ ref_w.astype(np.float32).T, ref)
            assert err < max(1e-5, 4 * base), f"bits={bits} m={m}: rel err {err:.2e} (fp32 baseline {base:.2e})"
            np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
            worst = max(worst, err)
    assert worst < 1e-5


def round_i16_reference(x: np.ndarray, group: int, qmax: int = 32767) -> np.ndarray:
    """x̂ of act='i16' in numpy's fp32 arithmetic: s = absmax / 32767 per row and group, s * rint(x / s);
    qmax=127: act='i8'."""
    out = np.empty_like(x)
    for i in range(0, x.shape[1], group):
        blk = x[:, i:i + group]
        with np.errstate(invalid="ignore", divide="ignore"):
            amax = np.nanmax(np.abs(blk), axis=1, keepdims=True) if np.isnan(blk).any() else np.abs(blk).max(1, keepdims=True)
            s = (amax / np.float32(qmax)).astype(np.float32)
            q = np.where(s > 0, np.clip(np.rint(blk / np.where(s > 0, s, 1)), -qmax, qmax), 0).astype(np.float32)
            out[:, i:i + group] = np.where(np.isfinite(blk), s * q, blk)
    return out


def test_round_activations_i16_matches_numpy_bit_for_bit(kernels):
    rng = np.random.default_rng(11)
    for m, k, g in [(1, 576, 128), (3, 300, 32), (2, 1000, 96), (5, 17, 64)]:
        # magnitudes spread over many decades per row, so that groups have very different scales
        x = (rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-3, 3, (m, k))).astype(np.float32)
        x[0, : min(g, k) // 2] *= 1e3  # one outlier-heavy group
        np.testing.assert_array_equal(ops.round_activations_i16(x, g), round_i16_reference(x, g))
    # ties: x / s lands on .5 exactly (s = 1 when absmax is 32767): half to even, as rint
    x = np.array([[32767.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.0]], np.float32)
    np.testing.assert_array_equal(ops.round_activations_i16(x, 32), [[32767, 0, 2, 2, -0, -2, -2, 3]])
    # a group of zeros stays zero; NaN and inf are kept (they must show in y)
    x = np.zeros((1, 64), np.float32)
    x[0, 40] = np.nan
    x[0, 50] = -np.inf
    y = ops.round_activations_i16(x, 32)
    assert (y[0, :32] == 0).all() and np.isnan(y[0, 40]) and y[0, 50] == -np.inf
    with pytest.raises(ValueError, match="group"):
        ops.round_activations_i16(np.ones((1, 8), np.float32), 0)


def test_round_activations_i8_is_quantize_activations_8(kernels):
    """bits=8: act='i8''s x̂, s = absmax / 127: bit for bit numpy's fp32 arithmetic and, for finite
    x, quantize_activations(bits=8), which it replaces on the CPU (a NaN stays NaN here, so that y
    shows it; quantize_activations rounds it to a code)."""
    rng = np.random.default_rng(12)
    for m, k, g in [(1, 576, 128), (3, 300, 32), (2, 1000, 96), (5, 17, 64)]:
        x = (rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-3, 3, (m, k))).astype(np.float32)
        x[0, : min(g, k) // 2] *= 1e3
        y = ops.round_activations_i16(x, g, 8)
        np.testing.assert_array_equal(y, round_i16_reference(x, g, 127))
        np.testing.assert_array_equal(y, ops.quantize_activations(x, g, 8))
        # really 8 bits: at most 255 levels per group, and far coarser than the int16 rounding
        assert all(len(np.unique(y[r, i:i + g])) <= 255 for r in range(m) for i in range(0, k, g))
        assert rel_err(y, x) > 30 * rel_err(ops.round_activations_i16(x, g), x)
    x = np.zeros((1, 64), np.float32)
    x[0, 40] = np.nan
    y = ops.round_activations_i16(x, 32, 8)
    assert (y[0, :32] == 0).all() and np.isnan(y[0, 40])
    with pytest.raises(ValueError, match="bits: expected 16 or 8, got 7"):
        ops.round_activations_i16(np.ones((1, 8), np.float32), 8, 7)


@pytest.mark.parametrize("path", ["decode", "gemm"])
def test_bitplane_matmul_i8_vpdpbusd_equals_int16_kernels(path):
    """Where the CPU has AVX-512 VNNI (or AVX-VNNI, for the 'gfni' family's decode), act='i8' runs its
    own kernels: the code bytes against int8 activations with vpdpbusd, 64 products per instruction
    (the decode; the GEMMs, on quads of int8 activations of 16 rows per zmm, 8 per ymm). Their int32
    sums are the int16 kernels' on the same codes, so each compilation must give the bits of the one
    without VNNI (whose int16 kernel multiplies the same q), at every bit-width, decode passes of 1
    to 4 rows and GEMM blocks of 1 to 3 (2 on AVX2; with empty rows), K with full and short last
    super-chunks (1, 2 and 3 words per lane) and groups that split them; and each must record its
    own name."""
    prev = ops.get_cpu_kernels()
    have = set()
    if "avx512" in KERNELS:
        ops.set_cpu_kernels("avx512")
        have = set(ops.cpu_features_in_use())
    # (family, flags) -> the int8 kernel's name; then the variant without VNNI whose bits it must give
    cases = []
    if "avx512" in KERNELS:
        vnni = [(dict(), "avx512_gfni_vnni")] if {"gfni", "avx512vnni"} <= have else []
        vnni += [(dict(gfni=False), "avx512_vnni")] if "avx512vnni" in have else []
        cases.append(("avx512", vnni, dict(gfni=False, avx512vnni=False)))
    if "gfni" in KERNELS:  # AVX-VNNI: its decode's int8 variant, and the AVX2 GEMM's
        ops.set_cpu_kernels("gfni")
        name = "gfni_avxvnni" if path == "decode" else "avx2_avxvnni"
        has_avxvnni = "avxvnni" in ops.cpu_features_in_use()
        cases.append(("gfni", [(dict(), name)] if has_avxvnni else [], dict(avxvnni=False)))
    if not any(v for _, v, _ in cases):
        ops.set_cpu_kernels(prev)
        pytest.skip("no AVX-512 VNNI or AVX-VNNI on this CPU: no int8 kernel runs here")
    rng = np.random.default_rng(19)
    try:
        for n, k, g in [(19, 1664, 128), (16, 896, 32), (9, 2048, 64), (13, 640, 64), (21, 768, 256),
                        (11, 1408, 96)]:
            planes, qparams = bitplane.quantize_to_planes(rng.standard_normal((n, k)).astype(np.float32), 8, g)
            for m in (1, 2, 3, 4, 5) if path == "decode" else (1, 17, 40, 50):
                x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10.0, (m, 1))).astype(np.float32)
                for bits in range(8, 1, -1) if path == "decode" else (8, 6, 3):
                    for family, vnni, plain_flags in cases:
                        ops.set_cpu_kernels(family, **plain_flags)
                        plain = ops.bitplane_matmul(planes, qparams, n, k, 8, g, bits, x, path, act="i8")
                        assert ops.last_bitplane_kernel().startswith(f"{path}_i16_"), (family, plain_flags)
                        assert np.all(np.isfinite(plain))
                        for flags, name in vnni:
                            ops.set_cpu_kernels(family, **flags)
                            y = ops.bitplane_matmul(planes, qparams, n, k, 8, g, bits, x, path, act="i8")
                            assert ops.last_bitplane_kernel() == f"{path}_i8_{name}", (family, flags)
                            np.testing.assert_array_equal(
                                y, plain, err_msg=f"{family} {flags}: n={n} k={k} g={g} m={m} bits={bits}")
    finally:
        ops.set_cpu_kernels(prev)


@pytest.mark.parametrize("act", ["i16", "i8"])
@pytest.mark.parametrize("path", ["decode", "gemm"])
def test_bitplane_matmul_i16_matches_reference(linear, kernels, path, act):
    """act='i16': y = x̂ · W_kᵀ, whichever kernel runs (the SIMD ones multiply the int16 codes); act='i8':
    the same with x̂ rounded to int8 (on AVX-512 VNNI and AVX-VNNI code bytes times int8 activations,
    vpdpbusd)."""
    n, k, g, b = linear["n"], linear["k"], linear["g"], linear["b"]
    qmax = 32767 if act == "i16" else 127
    rng = np.random.default_rng(8)
    for bits in range(2, b + 1):
        ref_w = linear["views"][bits]
        for m in MATMUL_M:
            x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 100.0, (m, 1))).astype(np.float32)
            xh = round_i16_reference(x, g, qmax)
            ref = xh.astype(np.float64) @ ref_w.T
            y = ops.bitplane_matmul(linear["planes"], linear["qparams"], n, k, b, g, bits, x, path, act=act)
            assert y.shape == (m, n) and y.dtype == np.float32
            err = rel_err(y, ref)
            base = rel_err(xh @ ref_w.astype(np.float32).T, ref)  # a plain fp32 product of the same x̂
            assert err < max(1e-5, 4 * base), f"bits={bits} m={m}: rel err {err:.2e} (fp32 baseline {base:.2e})"
            # and x̂ is x rounded as asked: 2^-16 of a group's largest |x| for int16, ~1e-2 for int8
            to_x = rel_err(y, x.astype(np.float64) @ ref_w.T)
            assert to_x < 1e-4 if act == "i16" else to_x > 1e-3


@pytest.mark.parametrize("path", ["decode", "gemm"])
def test_bitplane_matmul_i16_kernels_agree(path):
    """The integer kernels against an fp32 kernel on the same x̂, per element (not only in norm).

    Integer kernels: every SIMD family's. The decodes of 'avx512', 'gfni', 'avx2' and 'vec128' (the
    last three differ in how they transpose the planes' bits: GFNI, or shifts; 'vec128' is 'avx2' on
    16-byte vectors, NEON or SSE2) take up to 4 rows per pass; the
    GEMMs of 'avx512' (16 rows per vector) and of 'gfni' and 'avx2' (8 rows) take the rows in blocks, 3
    (AVX-512) or 2 (AVX2) blocks per pass: m from 1 to 100 covers one to thirteen blocks, passes of
    every size, full last blocks and last blocks with empty rows. The reference is the portable
    kernels' fp32 product of x̂. The GFNI decode uses AVX-VNNI where the CPU has it; without it the
    outputs must be the same bits (and are, trivially, for the kernels that never use it)."""
    # ('vec128' has an integer decode kernel of its own; its GEMM multiplies in fp32, tested below)
    integer = [kind for kind in ["avx512", "gfni", "avx2", "vec128"] if kind in KERNELS
               and (kind != "vec128" or path == "decode")]
    if not integer:
        pytest.skip("no integer kernel for this path here (no AVX2; vec128's GEMM is in fp32)")
    reference = "portable"
    prev = ops.get_cpu_kernels()
    rng = np.random.default_rng(9)
    rows = (1, 2, 3, 4, 6, 17) if path == "decode" else (1, 6, 16, 17, 33, 48, 50, 100)
    try:
        # K = 1664 / 896 / 384 / 2000 / 1408 / 768 / 640 / 768 / 768 / 1536: last super-chunks of 1, 3, 3,
        # 4, 3, 2, 1, 2, 2 and 4 words per lane (AVX-512 packs 4 or 2 weight rows into a vector for 1 or
        # 2). A lane's 4 words share a group (Job::super_lane_const: int32 sums over the super-chunk) in
        # the 1-word chunks at G = 128, the 2-word chunk at G = 256 and every chunk at G = 512
        for n, k, g in [(37, 1664, 128), (20, 896, 64), (11, 384, 32), (9, 2000, 256), (16, 1408, 96),
                        (13, 768, 128), (19, 640, 32), (21, 768, 64), (12, 768, 256), (10, 1536, 512)]:
            planes, qparams = bitplane.quantize_to_planes(rng.standard_normal((n, k)).astype(np.float32), 8, g)
            for m in rows:
                x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 100.0, (m, 1))).astype(np.float32)
                xh = round_i16_reference(x, g)
                for bits in (8, 7, 6, 5, 4, 3, 2) if path == "decode" else (8, 5, 2):
                    ys = {}
                    for kind in [reference, *integer]:
                        ops.set_cpu_kernels(kind)
                        ys[kind] = ops.bitplane_matmul(planes, qparams, n, k, 8, g, bits, x, path, act="i16")
                        ran = ops.last_bitplane_kernel()  # (the 'gfni' family's GEMM is the AVX2 one)
                        own = "portable" if kind == reference else "i16_avx2" if (kind, path) == ("gfni", "gemm") \
                            else f"i16_{kind}"
                        assert ran.startswith(f"{path}_{own}"), (kind, ran)
                    for kind in integer:
                        np.testing.assert_allclose(ys[kind], ys[reference], rtol=1e-5,
                                                   atol=1e-5 * np.abs(ys[reference]).max(),
                                                   err_msg=f"{kind}: m={m} bits={bits}")
                        # and it is an integer kernel that ran: its sums round differently from the fp32
                        # kernels' on the same x̂, the reference's and this family's own
                        assert not np.array_equal(ys[kind], ys[reference]), f"{kind}: m={m} bits={bits}"
                        ops.set_cpu_kernels(kind)
                        own_f32 = ops.bitplane_matmul(planes, qparams, n, k, 8, g, bits, xh, path, act="f32")
                        assert not np.array_equal(ys[kind], own_f32), f"{kind}: m={m} bits={bits}"
                        if kind != "avx512":
                            # AVX-VNNI (where the CPU has it) or vpmaddwd + vpaddd: the same exact int32 sums
                            ops.set_cpu_kernels(kind, avxvnni=False)
                            plain = ops.bitplane_matmul(planes, qparams, n, k, 8, g, bits, x, path, act="i16")
                            np.testing.assert_array_equal(plain, ys[kind],
                                                          err_msg=f"{kind} without AVX-VNNI: m={m} bits={bits}")
    finally:
        ops.set_cpu_kernels(prev)


@pytest.mark.parametrize("act", ["i16", "f32"])
def test_bitplane_matmul_vec128_gemm_matches_portable(act):
    """The 'vec128' GEMM (prompts on CPUs without AVX2): each weight tile dequantized to fp32 from the
    planes' bit transpose, then dotted with 2 (x86-64) or 4 (AArch64) activation rows at a time in
    4-lane sums. Against the portable GEMM per element (the same products summed in another order:
    close, not the same bits), on every tail of a row block, N not a multiple of 8 or 4, files stored
    at 8, 6 and 4 bits, every bit-width, K with full and short last super-chunks, and at K = 4096 the
    activations in several chunks of 32 rows (each tile dequantized again per chunk)."""
    if "vec128" not in KERNELS:
        pytest.skip("no 128-bit vectors on this CPU")
    prev = ops.get_cpu_kernels()
    rng = np.random.default_rng(19)
    try:
        for n, k, g, b, rows in [(13, 300, 32, 8, (5, 6, 7, 9, 17)), (37, 1664, 128, 6, (5, 8, 34)),
                                 (9, 2000, 256, 4, (6, 11)), (6, 4096, 128, 8, (70,)), (3, 640, 64, 8, (5, 12))]:
            planes, qparams = bitplane.quantize_to_planes(rng.standard_normal((n, k)).astype(np.float32), b, g)
            for m in rows:
                x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10.0, (m, 1))).astype(np.float32)
                for bits in range(b, 1, -1):
                    ys = {}
                    for kind in ("portable", "vec128"):
                        ops.set_cpu_kernels(kind)
                        ys[kind] = ops.bitplane_matmul(planes, qparams, n, k, b, g, bits, x, "gemm", act=act)
                        assert ops.last_bitplane_kernel() == f"gemm_{kind}"
                    np.testing.assert_allclose(ys["vec128"], ys["portable"], rtol=1e-5,
                                               atol=1e-5 * np.abs(ys["portable"]).max(),
                                               err_msg=f"n={n} k={k} m={m} bits={bits}")
                    assert not np.array_equal(ys["vec128"], ys["portable"]), f"n={n} k={k} m={m} bits={bits}"
    finally:
        ops.set_cpu_kernels(prev)


@pytest.mark.parametrize("act", ["i16", "i8"])
def test_bitplane_matmul_decode_rows_together_equal_each_row_alone(act):
    """A batch of m activation rows through the decode kernels gives each row the same bits as that
    row alone: batched decoding must not change a sequence's tokens. Every kernel family this CPU has;
    the AVX-512 decode takes two weight rows per pass at 1 and 2 rows and one at 3 and 4 (rows 5 and 6
    a second pass), and sums a tile's 8 outputs of a row in one transpose-and-add tree; N not a
    multiple of 8 (the last tile's masked store; odd N: a padding row paired), K with full and short
    last super-chunks (1, 2 and 3 words per lane; 1 and 2 pack several weight rows per vector),
    groups of 32 to 256, several bit-widths."""
    prev = ops.get_cpu_kernels()
    rng = np.random.default_rng(23)
    try:
        for n, k, g in [(19, 640, 128), (13, 768, 256), (21, 1664, 32), (11, 2000, 64), (9, 896, 128)]:
            planes, qparams = bitplane.quantize_to_planes(rng.standard_normal((n, k)).astype(np.float32), 8, g)
            x = (rng.standard_normal((6, k)) * rng.uniform(0.01, 100.0, (6, 1))).astype(np.float32)
            for kind in KERNELS:
                ops.set_cpu_kernels(kind)
                for bits in (8, 5, 2):
                    alone = np.concatenate([ops.bitplane_matmul(planes, qparams, n, k, 8, g, bits, x[i:i + 1],
                                                                "decode", act=act) for i in range(6)])
                    assert ops.last_bitplane_kernel().startswith("decode_"), (kind, ops.last_bitplane_kernel())
                    assert np.isfinite(alone).all() and np.abs(alone).max() > 0
                    for m in (2, 3, 4, 5, 6):
                        y = ops.bitplane_matmul(planes, qparams, n, k, 8, g, bits, x[:m], "decode", act=act)
                        np.testing.assert_array_equal(y, alone[:m], err_msg=f"{kind}: n={n} k={k} g={g} m={m} "
                                                                             f"bits={bits}")
    finally:
        ops.set_cpu_kernels(prev)


def test_bitplane_matmul_i16_decode_shift_transpose_equals_gfni():
    """The 'avx2' int16 decode transposes the planes' bits with shifts (delta swaps across the planes'
    vectors, fewer where planes are known zero), the 'gfni' one with gf2p8affineqb; the rest of the two
    kernels is the same code, so their outputs must agree bit for bit at every bit-width. So must the
    'gfni' one with and without AVX-VNNI (vpdpwssd, or vpmaddwd and vpaddd: the same exact int32 sums;
    on a CPU without AVX-VNNI, ops.cpu_has_avxvnni() False, both 'gfni' runs are the plain kernel).
    Random planes (all 8 bits of every byte vary), every row count of a pass, K with full and short
    last super-chunks."""
    if not {"avx2", "gfni"} <= set(KERNELS):
        pytest.skip("this CPU has no GFNI: only one of the two transposes runs here")
    prev = ops.get_cpu_kernels()
    rng = np.random.default_rng(14)
    try:
        for n, k, g in [(19, 1664, 128), (16, 896, 32), (9, 2048, 64)]:
            planes, qparams = bitplane.quantize_to_planes(rng.standard_normal((n, k)).astype(np.float32), 8, g)
            for m in (1, 2, 3, 4, 5):
                x = rng.standard_normal((m, k)).astype(np.float32)
                for bits in range(8, 1, -1):
                    ys = []
                    for kind, vnni in (("gfni", True), ("avx2", True), ("gfni", False)):
                        ops.set_cpu_kernels(kind, avxvnni=vnni)
                        ys.append(ops.bitplane_matmul(planes, qparams, n, k, 8, g, bits, x, "decode", act="i16"))
                    for i, what in ((1, "shifts"), (2, "gfni without AVX-VNNI")):
                        np.testing.assert_array_equal(ys[i], ys[0],
                                                      err_msg=f"{what}: n={n} k={k} g={g} m={m} bits={bits}")
    finally:
        ops.set_cpu_kernels(prev)


def avx512_compilation(features) -> str:
    """The AVX-512 int16 kernels' compilation that runs with these instruction sets in use."""
    return ("avx512_gfni_vnni" if {"gfni", "avx512vnni"} <= set(features)
            else "avx512_vnni" if "avx512vnni" in features else "avx512")


AVX512_VARIANTS = [  # set_cpu_kernels("avx512", **flags): the instruction sets each variant then uses
    (dict(), {"gfni", "avx512vnni"}),  # Ice Lake, Zen 4 and later
    (dict(gfni=False), {"avx512vnni"}),  # as Cascade Lake
    (dict(gfni=False, avx512vnni=False), set()),  # as Skylake-SP
    (dict(avx512vnni=False), {"gfni"}),  # no CPU: a cap only (runs the plain variant)
]


@pytest.mark.parametrize("path", ["decode", "gemm"])
def test_bitplane_matmul_i16_avx512_variants_equal(path):
    """The 'avx512' int16 kernels come in three compilations: GFNI transposes the planes' bits with
    gf2p8affineqb, the others with bit selects across the planes' vectors (fewer where planes are
    known zero); AVX-512 VNNI multiplies and adds with vpdpwssd, the plain one with vpmaddwd and vpaddd
    (the same exact int32 sums). The rest is one body, so every variant must give the bits of the
    first, at every bit-width, every row count of a decode pass and GEMM blocks of 1 to 3, K with
    full and short last super-chunks (1, 2 and 3 words per lane), groups that split them. Random
    planes (all 8 bits of every byte vary). On a CPU without GFNI or AVX-512 VNNI a flag that asks
    for it is no-op, and the check that the variant ran says so."""
    if "avx512" not in KERNELS:
        pytest.skip("this CPU has no AVX-512: the AVX-512 kernels do not run here")
    prev = ops.get_cpu_kernels()
    rng = np.random.default_rng(15)
    rows = (1, 2, 3, 4, 5) if path == "decode" else (1, 17, 40)
    try:
        ops.set_cpu_kernels("avx512")
        have = set(ops.cpu_features_in_use())
        for n, k, g in [(19, 1664, 128), (16, 896, 32), (9, 2048, 64), (13, 640, 64), (21, 768, 256)]:
            planes, qparams = bitplane.quantize_to_planes(rng.standard_normal((n, k)).astype(np.float32), 8, g)
            for m in rows:
                x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10.0, (m, 1))).astype(np.float32)
                for bits in range(8, 1, -1):
                    ys = []
                    for flags, uses in AVX512_VARIANTS:
                        assert ops.set_cpu_kernels("avx512", **flags) == "avx512"
                        in_use = set(ops.cpu_features_in_use())
                        assert in_use & {"gfni", "avx512vnni"} == uses & have, (flags, in_use)
                        ys.append(ops.bitplane_matmul(planes, qparams, n, k, 8, g, bits, x, path, act="i16"))
                        # and that compilation ran (each records its own name as it runs)
                        want = avx512_compilation(uses & have)
                        assert ops.last_bitplane_kernel() == f"{path}_i16_{want}", flags
                    assert np.all(np.isfinite(ys[0]))
                    for (flags, _), y in zip(AVX512_VARIANTS[1:], ys[1:]):
                        np.testing.assert_array_equal(y, ys[0], err_msg=f"{flags}: n={n} k={k} g={g} m={m} bits={bits}")
    finally:
        ops.set_cpu_kernels(prev)


def test_bitplane_matmul_dispatch_picks_each_familys_kernel():
    """Which kernel runs, per family, path and activations (each kernel records its own name as it
    runs): int16 activations take the integer kernels where the family has them ('vec128' for its
    decode only: its GEMM is in fp32 on either activations), fp32 ones the fp32 kernels (GFNI's or
    AVX2's); AVX-512 int16 picks its compilation by GFNI and AVX-512 VNNI, the 'gfni' decode by
    AVX-VNNI."""
    rng = np.random.default_rng(16)
    planes, qparams = bitplane.quantize_to_planes(rng.standard_normal((16, 640)).astype(np.float32), 8, 128)
    x = rng.standard_normal((2, 640)).astype(np.float32)
    prev = ops.get_cpu_kernels()
    try:
        for kind in KERNELS:
            for flags in ({}, dict(gfni=False), dict(gfni=False, avx512vnni=False), dict(avxvnni=False)):
                ops.set_cpu_kernels(kind, **flags)
                f = set(ops.cpu_features_in_use())
                for path in ("decode", "gemm"):
                    for act in ("i16", "f32"):
                        fp32 = "gfni" if "gfni" in f else "avx2" if "avx2" in f else "portable"
                        if "avx2" not in f and "vec128" in f and path == "gemm":
                            want = "vec128"  # its fp32 GEMM, on either activations (x̂ as fp32)
                        elif act == "f32":
                            want = fp32
                        elif "avx512" in f:
                            want = "i16_" + avx512_compilation(f)
                        elif "avx2" in f and path == "gemm":
                            want = "i16_avx2"
                        elif "avx2" in f:
                            want = ("i16_gfni_avxvnni" if "avxvnni" in f else "i16_gfni") if "gfni" in f else "i16_avx2"
                        elif "vec128" in f and path == "decode":
                            want = "i16_vec128"
                        else:
                            want = "portable"
                        ops.bitplane_matmul(planes, qparams, 16, 640, 8, 128, 6, x, path, act=act)
                        assert ops.last_bitplane_kernel() == f"{path}_{want}", (kind, flags, path, act, f)
    finally:
        ops.set_cpu_kernels(prev)


def test_bitplane_matmul_auto_path_crossover_per_family_and_activations():
    """path='auto' (the built-in rule, no kernel table): the decode kernels up to 6 rows where the
    integer decode is AVX-512 or AVX2 + GFNI and the activations are int16 or int8 (measured: their
    crossovers with the GEMM are 6-14 rows, 5 once), up to 4 rows otherwise (fp32 activations, plain AVX2,
    128-bit, portable), the GEMM above. Every family and cap this CPU has."""
    rng = np.random.default_rng(31)
    planes, qparams = bitplane.quantize_to_planes(rng.standard_normal((16, 640)).astype(np.float32), 8, 128)
    x = rng.standard_normal((8, 640)).astype(np.float32)
    prev = ops.get_cpu_kernels()
    try:
        for kind in KERNELS:
            for flags in ({}, dict(gfni=False)):
                ops.set_cpu_kernels(kind, **flags)
                f = set(ops.cpu_features_in_use())
                for act in ("i16", "i8", "f32"):
                    fast = act != "f32" and ("avx512" in f or {"avx2", "gfni"} <= f)
                    crossover = 6 if fast else 4
                    for m in (1, crossover, crossover + 1, 8):
                        ops.bitplane_matmul(planes, qparams, 16, 640, 8, 128, 6, x[:m], "auto", act=act)
                        want = "decode_" if m <= crossover else "gemm_"
                        assert ops.last_bitplane_kernel().startswith(want), (kind, flags, act, m, f)
    finally:
        ops.set_cpu_kernels(prev)


def test_cpu_kernel_caps_from_the_environment(tmp_path):
    """FLEXQUANT_CPU caps the instruction sets from the start (tools/bench.py's workers inherit it):
    each value leaves out what it names, never adds what the CPU lacks, and stays a ceiling: the
    families offered are the capped ones, and asking for the top one (as every test's fixture does)
    does not turn back on what the variable left out."""
    import os
    import subprocess
    import sys

    full = None
    expect = {
        None: set(),
        "portable": {"vec128", "avx2", "gfni", "avx512", "avx512vnni", "avxvnni"},
        "vec128": {"avx2", "gfni", "avx512", "avx512vnni", "avxvnni"},
        "avx2": {"gfni", "avx512", "avx512vnni"},
        "gfni": {"avx512", "avx512vnni"},
        "avx512-nogfni": {"gfni", "avxvnni"},  # as Cascade Lake (nor AVX-VNNI, an Alder Lake extension)
        "avx512-nogfni-novnni": {"gfni", "avx512vnni", "avxvnni"},  # as Skylake-SP
    }
    script = ("import flexquant_rt._core as c; o = c.ops; a = o.cpu_kernels_available(); "
              "print(o.get_cpu_kernels(), *o.cpu_features_in_use()); print(*a); "
              "o.set_cpu_kernels('portable'); print(o.set_cpu_kernels(a[-1]), *o.cpu_features_in_use())")
    for value, removed in expect.items():
        env = {k: v for k, v in os.environ.items() if k != "FLEXQUANT_CPU"}
        if value is not None:
            env["FLEXQUANT_CPU"] = value
        lines = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                               cwd=tmp_path).stdout.splitlines()
        family, *in_use = lines[0].split()
        in_use = set(in_use)
        if value is None:  # (the run itself may be capped: the child is not)
            full = in_use
        else:
            assert in_use == full - removed, (value, in_use)
            assert family == ("avx512" if "avx512" in in_use else "gfni" if "gfni" in in_use
                              else "avx2" if "avx2" in in_use else "vec128" if "vec128" in in_use
                              else "portable"), (value, family)
        assert lines[1].split()[-1] == family  # the top family offered is the capped one
        assert lines[2].split() == lines[0].split(), value  # and back to it, nothing more
    # an unknown value caps nothing, and says so naming it (a typo must not pass for a capped run)
    env = dict(os.environ, FLEXQUANT_CPU="avx-512")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert set(res.stdout.splitlines()[0].split()[1:]) == full
    assert "FLEXQUANT_CPU='avx-512' is none of" in res.stderr and "ignored" in res.stderr


@pytest.mark.parametrize("act", ["i16", "i8"])
def test_bitplane_matmul_i16_gemm_over_several_chunks_of_rows(kernels, act):
    """A long K: the GEMM's activations are taken in chunks of a few MiB (each decodes the weights
    again), so 200 rows of K = 20,000 pass in several chunks; every row against numpy."""
    n, k, g = 12, 20000, 128
    rng = np.random.default_rng(13)
    planes, qparams = bitplane.quantize_to_planes(rng.standard_normal((n, k)).astype(np.float32), 8, g)
    x = rng.standard_normal((200, k)).astype(np.float32)
    y = ops.bitplane_matmul(planes, qparams, n, k, 8, g, 7, x, "gemm", act=act)
    xh = round_i16_reference(x, g, 32767 if act == "i16" else 127)
    ref = xh.astype(np.float64) @ bitplane.dequantize_planes(planes, qparams, n, k, 7, 8, g).T
    base = rel_err(xh @ bitplane.dequantize_planes(planes, qparams, n, k, 7, 8, g).T, ref)
    for r in range(0, 200, 40):  # per row band: a chunk computed wrong or not at all shows
        assert rel_err(y[r:r + 40], ref[r:r + 40]) < max(1e-5, 4 * base), r


@pytest.mark.parametrize("act", ["i16", "i8"])
@pytest.mark.parametrize("path", ["decode", "gemm"])
def test_bitplane_matmul_i16_nonfinite_input_shows(kernels, path, act):
    n, k, g, b = 24, 640, 128, 8
    rng = np.random.default_rng(10)
    planes, qparams = bitplane.quantize_to_planes(rng.standard_normal((n, k)).astype(np.float32), b, g)
    # the GEMMs hold 8 or 16 rows per vector: bad rows at the first, last and middle lanes of blocks
    m, bad_rows = (2, [1]) if path == "decode" else (40, [1, 7, 8, 15, 16, 39])
    for bad in (np.nan, np.inf, -np.inf):
        x = rng.standard_normal((m, k)).astype(np.float32)
        for i, r in enumerate(bad_rows):
            x[r, [300, 0, 639, 127][i % 4]] = bad
        y = ops.bitplane_matmul(planes, qparams, n, k, b, g, 6, x, path, act=act)
        clean = [r for r in range(m) if r not in bad_rows]
        assert np.isfinite(y[clean]).all(), "a clean row must stay clean"
        assert not np.isfinite(y[bad_rows]).any(), f"{bad} in the input vanished from some outputs"


def test_bitplane_matmul_i16_one_group_over_a_long_row(kernels):
    """A group of 65,568 inputs (one group per row): Σ q of a group passes 2^31 and must not wrap."""
    n, k = 8, 65568
    rng = np.random.default_rng(12)
    planes, qparams = bitplane.quantize_to_planes((1.0 + 0.02 * rng.standard_normal((n, k))).astype(np.float32), 8, k)
    x = np.ones((1, k), np.float32)
    ref = round_i16_reference(x, k).astype(np.float64) @ bitplane.dequantize_planes(planes, qparams, n, k, 8, 8, k).T
    for path in ("decode", "gemm"):
        y = ops.bitplane_matmul(planes, qparams, n, k, 8, k, 8, x, path, act="i16")
        assert rel_err(y, ref) < 1e-5, path


@pytest.mark.parametrize("act", ["f32", "i16", "i8"])
@pytest.mark.parametrize("path", ["decode", "gemm"])
def test_bitplane_matmul_multi_equals_one_call_per_linear(kernels, threads, path, act):
    """q, k, v (or gate, up) in one call: the same bits as one bitplane_matmul each, whatever their
    sizes and bit-widths, on 1 to 16 threads (with few threads a thread's chunk of tiles spans two
    linears)."""
    k, g = 640, 64
    rng = np.random.default_rng(14)
    lins = []
    for n in (37, 8, 130):
        planes, qparams = bitplane.quantize_to_planes(rng.standard_normal((n, k)).astype(np.float32), 8, g)
        lins.append((planes, qparams, n))
    for t in (1, 2, 3, 16):
        ops.set_num_threads(t)
        for m in (1, 3, 21):
            x = rng.standard_normal((m, k)).astype(np.float32)
            bits = [8, 3, 5]
            ys = ops.bitplane_matmul_multi(lins, k, 8, g, bits, x, path, act=act)
            for (planes, qparams, n), b, y in zip(lins, bits, ys):
                want = ops.bitplane_matmul(planes, qparams, n, k, 8, g, b, x, path, act=act)
                np.testing.assert_array_equal(y, want, err_msg=f"threads={t} m={m}")
    other = bitplane.quantize_to_planes(rng.standard_normal((8, 128)).astype(np.float32), 8, g)
    with pytest.raises(ValueError, match="qparams: expected shape"):  # a linear of another K
        ops.bitplane_matmul_multi([lins[0], (*other, 8)], k, 8, g, [8, 8], x, path, act=act)
    with pytest.raises(ValueError, match="one per linear"):
        ops.bitplane_matmul_multi(lins, k, 8, g, [8, 8], x, path, act=act)
    with pytest.raises(ValueError, match="at least one"):
        ops.bitplane_matmul_multi([], k, 8, g, [], x, path, act=act)
    with pytest.raises(TypeError, match=r"linears\[1\]"):
        ops.bitplane_matmul_multi([lins[0], (lins[1][0], lins[1][1], "8")], k, 8, g, [8, 8], x, path, act=act)


def test_bitplane_matmul_bad_act_is_named():
    planes, qparams = bitplane.quantize_to_planes(np.ones((8, 128), np.float32), 8, 128)
    with pytest.raises(ValueError, match="'bf16'"):
        ops.bitplane_matmul(planes, qparams, 8, 128, 8, 128, 8, np.ones(128, np.float32), act="bf16")


def test_bitplane_matmul_vector_input(linear, kernels):
    n, k, g, b = linear["n"], linear["k"], linear["g"], linear["b"]
    x = np.random.default_rng(1).standard_normal(k).astype(np.float32)
    y = ops.bitplane_matmul(linear["planes"], linear["qparams"], n, k, b, g, b, x)
    assert y.shape == (n,)
    assert rel_err(y, linear["views"][b] @ x.astype(np.float64)) < 1e-5


@pytest.mark.parametrize("act", ["f32", "i16", "i8"])
@pytest.mark.parametrize("path", ["decode", "gemm"])
def test_bitplane_matmul_reads_only_the_first_k_planes(linear, kernels, path, act):
    n, k, g, b = linear["n"], linear["k"], linear["g"], linear["b"]
    x = np.random.default_rng(2).standard_normal((3, k)).astype(np.float32)
    for bits in range(2, b + 1):
        want = ops.bitplane_matmul(linear["planes"], linear["qparams"], n, k, b, g, bits, x, path, act=act)
        # Only `bits` planes passed: anything past them would be out of bounds.
        head = np.ascontiguousarray(linear["planes"][:bits])
        np.testing.assert_array_equal(
            ops.bitplane_matmul(head, linear["qparams"], n, k, b, g, bits, x, path, act=act), want)
        # Garbage in the unused planes changes nothing.
        poisoned = linear["planes"].copy()
        poisoned[bits:] = np.random.default_rng(bits).integers(0, 256, poisoned[bits:].shape, dtype=np.uint8)
        np.testing.assert_array_equal(
            ops.bitplane_matmul(poisoned, linear["qparams"], n, k, b, g, bits, x, path, act=act), want)


def test_bitplane_matmul_same_result_on_any_thread_count(kernels, threads):
    n, k, g, b = 203, 1100, 64, 8
    rng = np.random.default_rng(3)
    planes, qparams = bitplane.quantize_to_planes(rng.standard_normal((n, k)).astype(np.float32), b, g)
    for m, path, act in [(1, "decode", "f32"), (3, "decode", "f32"), (9, "gemm", "f32"), (1, "decode", "i16"),
                         (6, "decode", "i16"), (9, "gemm", "i16"), (3, "decode", "i8"), (20, "gemm", "i8")]:
        x = rng.standard_normal((m, k)).astype(np.float32)
        results = []
        for t in [1, 2, 3, 5]:
            ops.set_num_threads(t)
            assert ops.get_num_threads() == t
            results.append(ops.bitplane_matmul(planes, qparams, n, k, b, g, 5, x, path, act=act))
        results.append(ops.bitplane_matmul(planes, qparams, n, k, b, g, 5, x, path, threaded=False, act=act))
        for r in results[1:]:
            np.testing.assert_array_equal(r, results[0])


def test_bitplane_matmul_large_group_offsets():
    """Rows whose groups sit far from zero: the min term dominates and must not lose digits."""
    n, k, g, b = 16, 512, 128, 8
    rng = np.random.default_rng(4)
    w = (100.0 + rng.standard_normal((n, k))).astype(np.float32)
    planes, qparams = bitplane.quantize_to_planes(w, b, g)
    x = rng.standard_normal((2, k)).astype(np.float32)
    for bits in (2, 5, 8):
        ref = x.astype(np.float64) @ bitplane.dequantize_planes(planes, qparams, n, k, bits, b, g).astype(np.float64).T
        for path in ("decode", "gemm"):
            y = ops.bitplane_matmul(planes, qparams, n, k, b, g, bits, x, path)
            base = rel_err(x @ bitplane.dequantize_planes(planes, qparams, n, k, bits, b, g).T, ref)
            assert rel_err(y, ref) < max(1e-5, 4 * base)


def test_bitplane_matmul_rejects_bad_arguments():
    n, k, g, b = 8, 256, 64, 4
    planes, qparams = bitplane.quantize_to_planes(np.ones((n, k), np.float32) + np.arange(k, dtype=np.float32), b, g)
    x = np.ones((1, k), np.float32)
    for bits in (1, 5):
        with pytest.raises(ValueError, match="bits"):
            ops.bitplane_matmul(planes, qparams, n, k, b, g, bits, x)
    with pytest.raises(ValueError, match="group_size"):
        ops.bitplane_matmul(planes, qparams[:, :1].copy(), n, k, b, 257, 2, x)
    with pytest.raises(ValueError, match="plane_bytes"):
        ops.bitplane_matmul(np.zeros((b, planes.shape[1] - 1), np.uint8), qparams, n, k, b, g, 2, x)
    with pytest.raises(ValueError, match="qparams"):
        ops.bitplane_matmul(planes, qparams[:, :2].copy(), n, k, b, g, 2, x)
    with pytest.raises(ValueError, match="x"):
        ops.bitplane_matmul(planes, qparams, n, k, b, g, 2, np.ones((1, k + 1), np.float32))
    with pytest.raises(TypeError, match="x"):
        ops.bitplane_matmul(planes, qparams, n, k, b, g, 2, np.ones((1, k), np.float64))
    with pytest.raises(ValueError, match="planes"):
        ops.bitplane_matmul(planes[:1].copy(), qparams, n, k, b, g, 2, x)


def test_bitplane_bytes_at():
    shape = bitplane.LinearShape(100, 300, 8, 64)
    for bits in range(2, 9):
        assert ops.bitplane_bytes_at(shape.plane_bytes, 100, 300, 64, bits) == shape.bytes_at(bits)


# ---- rms_norm, swiglu ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 576), (5, 300), (3, 4096)])
def test_rms_norm_matches_transformers(shape):
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rng = np.random.default_rng(shape[1])
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    w = rng.uniform(0.5, 1.5, shape[1]).astype(np.float32)
    norm = LlamaRMSNorm(shape[1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w))
        ref = norm(torch.from_numpy(x)).numpy()
    y = ops.rms_norm(x, w, 1e-5)
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-6)
    x64 = x.astype(np.float64)
    ref64 = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w
    assert rel_err(y, ref64) < 1e-6


def test_swiglu_matches_torch(kernels):
    import torch

    rng = np.random.default_rng(5)
    g = (rng.standard_normal((3, 1533)) * 4).astype(np.float32)  # n % 8 = 5: a tail on the vector path
    g[0, :8] = [-100.0, -89.0, 89.0, 100.0, -3e38, -1e30, 3e38, -88.5]  # exp overflow on either side
    g[2, -3:] = [-95.0, 1e30, -1e38]  # and in the tail
    u = rng.standard_normal((3, 1533)).astype(np.float32)
    ref = (torch.nn.functional.silu(torch.from_numpy(g)) * torch.from_numpy(u)).numpy()
    y = ops.swiglu(g, u)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-7)
    # -inf: -inf * sigmoid(-inf) = -inf * 0 is NaN, as torch; +inf and NaN pass through
    special = ops.swiglu(np.array([[-np.inf, np.inf, np.nan, 1.0]], np.float32), np.ones((1, 4), np.float32))
    want = (torch.nn.functional.silu(torch.tensor([[-np.inf, np.inf, np.nan, 1.0]]))).numpy()
    np.testing.assert_allclose(special, want, rtol=2e-6, equal_nan=True)


def test_swiglu_does_not_depend_on_where_a_call_starts(kernels):
    """The engine splits a prompt's rows among threads: any split must give the same values."""
    rng = np.random.default_rng(6)
    g = (rng.standard_normal(1203) * 6).astype(np.float32)
    u = rng.standard_normal(1203).astype(np.float32)
    whole = ops.swiglu(g, u)
    for cuts in ([150, 301, 700], [1, 2, 3, 997], [8, 16, 1200]):
        parts = np.concatenate([ops.swiglu(a, b) for a, b in zip(np.split(g, cuts), np.split(u, cuts))])
        np.testing.assert_array_equal(parts, whole)


# ---- rope ---------------------------------------------------------------------------------------

ROPE_CASES = {
    "none": dict(theta=10000.0, rope_scaling=None),
    "linear": dict(theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama3": dict(theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3_odd": dict(theta=123456.0, rope_scaling={"rope_type": "llama3", "factor": 3.0, "low_freq_factor": 2.0,
                                                     "high_freq_factor": 6.0, "original_max_position_embeddings": 1000}),
}


def rope_kwargs(case):
    rs = case["rope_scaling"]
    if rs is None:
        return dict(scaling="none")
    if rs["rope_type"] == "linear":
        return dict(scaling="linear", factor=rs["factor"])
    return dict(scaling="llama3", factor=rs["factor"], low_freq_factor=rs["low_freq_factor"],
                high_freq_factor=rs["high_freq_factor"], original_max_position=rs["original_max_position_embeddings"])


@pytest.mark.parametrize("name", list(ROPE_CASES))
@pytest.mark.parametrize("head_dim", [64, 36])
def test_rope_matches_transformers(name, head_dim):
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    case = ROPE_CASES[name]
    H, Hkv, m = 6, 2, 9
    cfg = LlamaConfig(hidden_size=H * head_dim, num_attention_heads=H, num_key_value_heads=Hkv, head_dim=head_dim,
                      rope_theta=case["theta"], rope_scaling=case["rope_scaling"], max_position_embeddings=1 << 17)
    emb = LlamaRotaryEmbedding(cfg)
    kw = rope_kwargs(case)
    inv = ops.rope_inv_freq(head_dim, case["theta"], **kw)
    np.testing.assert_allclose(inv, emb.inv_freq.numpy(), rtol=3e-7, atol=0)

    rng = np.random.default_rng(head_dim)
    pos = np.concatenate([[0, 1, 2], rng.integers(3, 1 << 16, m - 3)]).astype(np.int64)
    q = rng.standard_normal((m, H, head_dim)).astype(np.float32)
    k = rng.standard_normal((m, Hkv, head_dim)).astype(np.float32)
    with torch.no_grad():
        qt = torch.from_numpy(q).transpose(0, 1)[None]  # (1, H, m, d)
        kt = torch.from_numpy(k).transpose(0, 1)[None]
        cos, sin = emb(qt, torch.from_numpy(pos)[None])
        qr, kr = apply_rotary_pos_emb(qt, kt, cos, sin)
    q_ref = qr[0].transpose(0, 1).numpy()
    k_ref = kr[0].transpose(0, 1).numpy()
    qo, ko = ops.rope(q, k, pos, case["theta"], **kw)
    # Same fp32 angles; cos/sin within an ulp of torch's, so ~1e-6 of the values' scale.
    np.testing.assert_allclose(qo, q_ref, rtol=0, atol=2e-6 * float(np.abs(q).max()))
    np.testing.assert_allclose(ko, k_ref, rtol=0, atol=2e-6 * float(np.abs(k).max()))
    assert rel_err(qo, q_ref) < 1e-6 and rel_err(ko, k_ref) < 1e-6
    q_only, none = ops.rope(q, None, pos, case["theta"], **kw)
    assert none is None
    np.testing.assert_array_equal(q_only, qo)


def test_rope_rejects_bad_arguments():
    q = np.ones((2, 1, 8), np.float32)
    with pytest.raises(ValueError, match="positions"):
        ops.rope(q, None, np.zeros(3, np.int64), 10000.0)
    with pytest.raises(ValueError, match="scaling"):
        ops.rope(q, None, np.zeros(2, np.int64), 10000.0, scaling="yarn")
    with pytest.raises(ValueError, match="llama3"):
        ops.rope(q, None, np.zeros(2, np.int64), 10000.0, scaling="llama3", factor=8.0, low_freq_factor=4.0,
                 high_freq_factor=1.0)


# ---- attention ----------------------------------------------------------------------------------

def attention_reference(q, kc, vc, p0):
    """Causal GQA in float64: q (m, H, d), caches (>= p0+m, Hkv, d)."""
    m, H, d = q.shape
    Hkv = kc.shape[1]
    out = np.zeros((m, H, d))
    for i in range(m):
        T = p0 + i + 1
        for h in range(H):
            hk = h // (H // Hkv)
            s = kc[:T, hk].astype(np.float64) @ q[i, h].astype(np.float64) / math.sqrt(d)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ vc[:T, hk].astype(np.float64)
    return out


# m >= 8 runs the prompt path on AVX2 and 'vec128' (blocks of tokens x blocks of 64 keys): 9 and 40 tokens from
# position 0 or 13, and 130 after 300 cached positions (several token blocks, partial key blocks).
@pytest.mark.parametrize("m,p0", [(1, 0), (1, 37), (6, 0), (7, 20), (1, 700), (3, 530), (9, 0), (40, 13),
                                  (130, 300)])
# Group sizes H / Hkv of 1 to 17: the AVX2 decode kernels take up to 4 heads per pass (3, 4, 5 = 4 + 1,
# 8 = 4 + 4, 17 = 4 x 4 + 1), with their own row and column tiles per pass.
@pytest.mark.parametrize("H,Hkv,d", [(6, 2, 64), (4, 4, 40), (3, 1, 36), (2, 1, 128), (4, 2, 200), (9, 3, 64),
                                     (8, 1, 16), (17, 1, 8), (8, 2, 24), (10, 2, 40)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_attention_matches_reference(kernels, m, p0, H, Hkv, d, dtype):
    rng = np.random.default_rng(m * 100 + p0 + d)
    t_max = p0 + m + 5
    q = rng.standard_normal((m, H, d)).astype(np.float32)
    kc = (rng.standard_normal((t_max, Hkv, d)) * 2).astype(dtype)
    vc = rng.standard_normal((t_max, Hkv, d)).astype(dtype)
    # Positions past p0 + m - 1 are not attended to: poison them.
    kc[p0 + m:] = np.nan
    vc[p0 + m:] = np.nan
    ref = attention_reference(q, kc.astype(np.float32), vc.astype(np.float32), p0)
    out = ops.attention(q, kc, vc, p0)
    assert out.shape == (m, H, d) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    # Same-precision baseline: the reference formula evaluated in fp32.
    base = rel_err(attention_reference(q, kc.astype(np.float32), vc.astype(np.float32), p0).astype(np.float32), ref)
    assert rel_err(out, ref) < max(2e-6, 4 * base)
    single = ops.attention(q, kc, vc, p0, threaded=False)
    np.testing.assert_array_equal(out, single)
    # The engine's head-major cache (n_kv_heads, t_max, d): the same rows at other addresses, so the
    # same operations and the same result, bit for bit.
    heads = ops.attention(q, np.ascontiguousarray(kc.transpose(1, 0, 2)), np.ascontiguousarray(vc.transpose(1, 0, 2)),
                          p0, layout="heads")
    np.testing.assert_array_equal(heads, out)


@pytest.mark.parametrize("m,p0", [(9, 0), (40, 13), (130, 300)])
@pytest.mark.parametrize("H,Hkv,d", [(9, 3, 64), (2, 1, 128), (4, 2, 200), (8, 2, 24), (10, 2, 40), (6, 2, 48)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_attention_prompt_path_avx512_equals_avx2(m, p0, H, Hkv, d, dtype):
    """The prompt path's tiles on AVX-512 (32 keys x 4 query vectors per score tile, 16-lane output
    tiles, an AVX2 tile for the last 8 dims where d is not a multiple of 16) sum the same products in
    the same order per lane as the AVX2 tiles: the same bits."""
    if "avx512" not in KERNELS:
        pytest.skip("this CPU has no AVX-512: only the AVX2 tiles run here")
    rng = np.random.default_rng(m + p0 + d)
    q = rng.standard_normal((m, H, d)).astype(np.float32)
    kc = (rng.standard_normal((p0 + m, Hkv, d)) * 2).astype(dtype)
    vc = rng.standard_normal((p0 + m, Hkv, d)).astype(dtype)
    prev = ops.get_cpu_kernels()
    try:
        out = {}
        for kind in ("avx512", "avx2"):  # (GFNI plays no part in attention)
            ops.set_cpu_kernels(kind)
            out[kind] = ops.attention(q, kc, vc, p0)
    finally:
        ops.set_cpu_kernels(prev)
    assert np.all(np.isfinite(out["avx512"]))
    np.testing.assert_array_equal(out["avx512"], out["avx2"])


def test_attention_f16_cache_widened_exactly(kernels):
    """Every fp16 bit pattern of a cache reaches the output as numpy widens it: the first token attends
    to one position, so its output is 1 · V[0] / 1, exactly the row. The 'vec128' kernels widen in
    vectors (fcvtl on AArch64; on x86-64 without F16C the bits are moved and rebiased, subnormals as a
    difference of two normal floats, inf and NaN fixed up), the 'avx2' ones with F16C, the portable
    ones one at a time: subnormals, normals, the largest, infinities and NaNs (compared as NaN), of
    both signs. At decode (one token: the per-token span) and in a prompt of 8 tokens (the prompt
    path's widening of V rows)."""
    Hkv, d = 16, 4096
    v0 = np.arange(65536, dtype=np.uint16).view(np.float16).reshape(1, Hkv, d)
    rng = np.random.default_rng(31)
    for m in (1, 8):
        q = rng.standard_normal((m, Hkv, d)).astype(np.float32)
        k = rng.standard_normal((m, Hkv, d)).astype(np.float16)
        v = np.concatenate([v0, rng.standard_normal((m - 1, Hkv, d)).astype(np.float16)])
        out = ops.attention(q, k, v, 0)
        simd = {"portable": "portable", "vec128": "vec128", "avx512": "avx512"}.get(kernels, "avx2")
        want = "span_" + ("avx2" if simd == "avx512" else simd) if m == 1 or simd == "portable" else "prompt_" + simd
        assert ops.last_attention_kernel() == want, (kernels, m)
        np.testing.assert_array_equal(out[0], v0[0].astype(np.float32), err_msg=f"m={m}")


def test_attention_dispatch_picks_each_familys_path():
    """Which path and kernels ran (ops.last_attention_kernel), per family: per token ('span') at decode
    and for a few tokens, blocks of tokens x keys ('prompt') from 8 tokens and 16 (token, KV head)
    pairs on; the SIMD kernels where head_dim allows them (AVX2 a multiple of 8, 'vec128' of 4), the
    portable loops otherwise."""
    rng = np.random.default_rng(33)
    prev = ops.get_cpu_kernels()
    try:
        for kind in KERNELS:
            ops.set_cpu_kernels(kind)
            f = set(ops.cpu_features_in_use())
            for m, d in [(1, 64), (40, 64), (1, 12), (40, 12), (1, 6), (40, 6)]:
                q = rng.standard_normal((m, 4, d)).astype(np.float32)
                kv = rng.standard_normal((m + 3, 2, d)).astype(np.float16)
                ops.attention(q, kv, kv, 3)
                simd = "avx2" if "avx2" in f and d % 8 == 0 else \
                    "vec128" if "avx2" not in f and "vec128" in f and d % 4 == 0 else None
                if simd is None:
                    want = "span_portable"
                elif m == 1:
                    want = f"span_{simd}"
                else:
                    want = "prompt_" + ("avx512" if simd == "avx2" and "avx512" in f else simd)
                assert ops.last_attention_kernel() == want, (kind, m, d)
    finally:
        ops.set_cpu_kernels(prev)


def q8_reference(x):
    """numpy's q8 rounding of x (rows, d): blocks of 32 values of a row (the last one shorter), scale
    = max |x| / 127 in fp32, codes = x / scale to nearest even; 0 for a zero block; a NaN scale and
    zero codes for a block holding NaN or inf."""
    rows, d = x.shape
    nb = -(-d // 32)
    codes = np.zeros((rows, d), np.int8)
    scales = np.zeros((rows, nb), np.float32)
    for b in range(nb):
        blk = x[:, 32 * b:32 * b + 32]
        finite = np.all(np.isfinite(blk), axis=1)
        s = np.abs(np.where(np.isfinite(blk), blk, 0)).max(1) / np.float32(127)
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.clip(np.rint(blk / s[:, None]), -127, 127)
        c[~finite | (s == 0)] = 0
        codes[:, 32 * b:32 * b + 32] = c.astype(np.int8)
        scales[:, b] = np.where(finite, s, np.float32(np.nan))
    return codes, scales


@pytest.mark.parametrize("d", [64, 40, 8])
def test_quantize_kv_q8_matches_numpy(d):
    """The q8 cache's rounding, block by block of 32 values (d = 40: a block of 8 ends each row)."""
    rng = np.random.default_rng(21 + d)
    x = (rng.standard_normal((40, d)) * rng.uniform(0.01, 30, (40, 1))).astype(np.float32)
    x[3] = 0.0
    x[5, 7] = np.nan
    x[6, d - 1] = -np.inf
    x[7, :8] = np.arange(-4, 4, dtype=np.float32) + np.float32(0.5)  # with 127 in the block: scale 1,
    x[7, 0] = 127.0                                                  # and ties k + 1/2 to even
    # subnormal values: the scale is subnormal too, and max |x| = 1.88e-43 over its rounded scale
    # (1.4e-45) is 134: the codes are clamped to ±127 (numpy's rint then clip)
    x[8] = (np.linspace(-1, 1, d) * 1.88e-43).astype(np.float32)
    codes, scales = ops.quantize_kv_q8(x)
    want_c, want_s = q8_reference(x)
    assert codes.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == want_s.shape
    np.testing.assert_array_equal(codes, want_c)
    np.testing.assert_array_equal(scales, want_s)  # NaN where numpy has NaN
    assert scales[7, 0] == 1.0 and list(codes[7, 1:8]) == [-2, -2, 0, 0, 2, 2, 4]
    assert np.isnan(scales[5, 0]) and np.isnan(scales[6, -1]) and scales[3].max() == 0
    assert 0 < scales[8, 0] < np.finfo(np.float32).tiny and np.abs(codes[8]).max() == 127
    live = np.isfinite(scales) & (scales > 0)  # every other block reaches ±127
    nb = scales.shape[1]
    amax = np.array([[np.abs(codes[r, 32 * b:32 * b + 32]).max() for b in range(nb)] for r in range(40)])
    assert np.all(amax[live] == 127)


def q8_caches(k, v, layout):
    """Token-major float caches (t, Hkv, d) -> the op's q8 arguments in `layout`, and the dequantized
    float32 caches (token-major) that they stand for."""
    t, hkv, d = k.shape
    out, deq = [], []
    for c in (k, v):
        codes, scales = ops.quantize_kv_q8(np.ascontiguousarray(c, np.float32).reshape(-1, d))
        codes, scales = codes.reshape(t, hkv, d), scales.reshape(t, hkv, -1)
        per_value = np.repeat(scales, 32, axis=2)[..., :d]
        deq.append((codes.astype(np.float32) * per_value).astype(np.float32))
        if layout == "heads":
            codes, scales = np.ascontiguousarray(codes.transpose(1, 0, 2)), np.ascontiguousarray(scales.transpose(1, 0, 2))
        out += [codes, scales]
    return out, deq


@pytest.mark.parametrize("m,p0", [(1, 0), (1, 37), (7, 20), (1, 700), (3, 530), (9, 0), (40, 13), (130, 300)])
@pytest.mark.parametrize("H,Hkv,d", [(6, 2, 64), (3, 1, 36), (9, 3, 64), (17, 1, 8), (10, 2, 40)])
@pytest.mark.parametrize("layout", ["tokens", "heads"])
def test_attention_q8_matches_the_dequantized_cache(kernels, m, p0, H, Hkv, d, layout):
    """A q8 cache (int8 codes, a scale per 32 values) gives the attention of its dequantized rows,
    within fp32 rounding (of int16-rounded queries on the AVX2 decode path), on the decode and the
    prompt paths; rows past the positions are never read."""
    rng = np.random.default_rng(m * 7 + p0 + d + H)
    t_max = p0 + m + 5
    q = rng.standard_normal((m, H, d)).astype(np.float32)
    k = rng.standard_normal((t_max, Hkv, d)) * 2
    v = rng.standard_normal((t_max, Hkv, d))
    (kc, ks, vc, vs), (kd, vd) = q8_caches(k, v, layout)
    # poison the rows past p0 + m - 1: a NaN scale would show in the output if they were read
    for sc in (ks, vs):
        if layout == "heads":
            sc[:, p0 + m:] = np.nan
        else:
            sc[p0 + m:] = np.nan
    assert kc.dtype == np.int8 and ks.shape[-1] == -(-d // 32)
    ref = attention_reference(q, kd, vd, p0)
    out = ops.attention(q, kc, vc, p0, layout=layout, k_scale=ks, v_scale=vs)
    assert out.shape == (m, H, d) and np.all(np.isfinite(out))
    base = rel_err(attention_reference(q, kd, vd, p0).astype(np.float32), ref)
    # The AVX2 decode kernel multiplies integers: each query vector rounded to int16 (a step of
    # max |q| / 32767), so it is held to the reference on those queries; the prompt path and the
    # portable kernel use q itself.
    sq = np.abs(q).max(-1, keepdims=True) / np.float32(32767)
    ref_q16 = attention_reference(np.rint(q / sq) * sq, kd, vd, p0)
    assert min(rel_err(out, ref), rel_err(out, ref_q16)) < max(2e-6, 4 * base)
    np.testing.assert_array_equal(out, ops.attention(q, kc, vc, p0, threaded=False, layout=layout, k_scale=ks,
                                                     v_scale=vs))
    # and it is the fp32 cache's attention to within the rounding of int8 codes (random rows: the
    # worst case, no outliers to spare; real text: tools/numerics_quality.py)
    exact = attention_reference(q, k, v, p0)
    assert 0 < rel_err(out, exact) < 0.03


def test_attention_q8_rejects_bad_scales():
    q = np.ones((1, 4, 8), np.float32)
    kc = np.ones((3, 2, 8), np.int8)
    sc = np.ones((3, 2, 1), np.float32)
    with pytest.raises(ValueError, match="int8 caches need k_scale and v_scale"):
        ops.attention(q, kc, kc, 2)
    with pytest.raises(ValueError, match="k_scale, v_scale: only for int8 caches"):
        ops.attention(q, kc.astype(np.float32), kc.astype(np.float32), 2, k_scale=sc, v_scale=sc)
    with pytest.raises(ValueError, match=r"v_scale: expected shape \(3, 2, 1\), got \(3, 2, 2\)"):
        ops.attention(q, kc, kc, 2, k_scale=sc, v_scale=np.ones((3, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"k_scale: expected shape \(3, 2, 1\), got \(3, 2\)"):
        ops.attention(q, kc, kc, 2, k_scale=sc[..., 0], v_scale=sc)
    with pytest.raises(TypeError, match="k_scale: expected dtype float32"):
        ops.attention(q, kc, kc, 2, k_scale=sc.astype(np.float64), v_scale=sc)
    with pytest.raises(TypeError, match="v_cache: expected dtype float32, float16 or int8"):
        ops.attention(q, kc, kc.astype(np.float32), 2, k_scale=sc, v_scale=sc)


@pytest.mark.parametrize("m", [2, 45])
def test_attention_same_result_on_any_thread_count(threads, m):
    rng = np.random.default_rng(11)
    q = rng.standard_normal((m, 8, 64)).astype(np.float32)
    kc = rng.standard_normal((900, 2, 64)).astype(np.float32)
    vc = rng.standard_normal((900, 2, 64)).astype(np.float32)
    outs = []
    for t in [1, 2, 3, 7]:
        ops.set_num_threads(t)
        outs.append(ops.attention(q, kc, vc, 850))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_attention_rejects_bad_arguments():
    q = np.ones((2, 4, 8), np.float32)
    kc = np.ones((3, 2, 8), np.float32)
    with pytest.raises(ValueError, match="k_cache"):
        ops.attention(q, kc, kc, 2)  # needs t_max >= 4
    with pytest.raises(ValueError, match="multiple"):
        ops.attention(np.ones((2, 3, 8), np.float32), kc, kc, 0)
    with pytest.raises(TypeError, match="v_cache"):
        ops.attention(q, kc, kc.astype(np.float16), 0)
    # head-major caches (n_kv_heads, t_max, d): the layout names the axes that are checked
    kh = np.ones((2, 3, 8), np.float32)
    with pytest.raises(ValueError, match=r"k_cache: expected shape \(n_kv_heads, t_max >= 4, 8\)"):
        ops.attention(q, kh, kh, 2, layout="heads")
    with pytest.raises(ValueError, match="v_cache.*both the same"):
        ops.attention(q[:1], kh, np.ones((2, 4, 8), np.float32), 2, layout="heads")
    with pytest.raises(ValueError, match="layout: expected 'tokens' or 'heads', got 'rows'"):
        ops.attention(q, kc, kc, 0, layout="rows")


# ---- sampling -----------------------------------------------------------------------------------

def test_softmax_argmax_entropy(kernels):
    """Against float64 numpy, on each family's exponentials (AVX2's exp8, the 128-bit exp4, the
    portable expf): 49k random logits, ties, -inf, a single logit; and a softmax whose inputs span
    exp's whole range (down past the vector kernels' cut at -87.3; NaN as -inf) on every lane
    position."""
    rng = np.random.default_rng(6)
    logits = (rng.standard_normal(49152) * 3).astype(np.float32)
    l64 = logits.astype(np.float64)
    p = np.exp(l64 - l64.max())
    p /= p.sum()
    np.testing.assert_allclose(ops.softmax(logits), p, rtol=1e-5, atol=1e-9)
    assert ops.argmax(logits) == int(np.argmax(logits))
    ent, top1 = ops.entropy_and_top1(logits)
    assert ent == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-5)
    assert top1 == pytest.approx(float(p.max()), rel=1e-5)
    tied = np.array([1.0, 3.0, 3.0, 2.0], np.float32)
    assert ops.argmax(tied) == 1
    ent, top1 = ops.entropy_and_top1(np.array([0.0, -np.inf, 0.0], np.float32))
    assert ent == pytest.approx(math.log(2)) and top1 == pytest.approx(0.5)
    ent, top1 = ops.entropy_and_top1(np.array([5.0], np.float32))
    assert ent == pytest.approx(0.0, abs=1e-7) and top1 == pytest.approx(1.0)
    # after the max is subtracted the exponents run from 0 down to below -87.3 (0 there), NaN gives 0;
    # 37 entries: vector bodies and scalar tails
    wide = np.concatenate([np.linspace(0.0, -95.0, 33), [np.nan, -np.inf, -87.0, -88.0]]).astype(np.float32)
    for shift in range(4):
        x = np.roll(wide, shift)
        got = ops.softmax(x)
        x64 = np.where(np.isnan(x), -np.inf, x).astype(np.float64)
        want = np.exp(x64 - x64.max())
        want /= want.sum()
        # (below -87.3 the vector kernels give 0, expf a subnormal: both within fp32's normal range)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=np.finfo(np.float32).tiny)
        assert got[np.isnan(x)].max() == 0.0 and got[x < -87.3].max() < np.finfo(np.float32).tiny
    # each exponential within 5e-7 of float64 (Cephes: ~1.5e-7): logits within 8 of the max, so every
    # term counts, over every reduced argument |r| <= ln 2 / 2
    x = np.concatenate([[0.0], rng.uniform(-8.0, 0.0, 4095)]).astype(np.float32)
    want = np.exp(x.astype(np.float64))
    got = ops.softmax(x)
    np.testing.assert_allclose(got, want / want.sum(), rtol=5e-7)
    if kernels != "portable":  # and it is the family's vector exp that ran, not expf: other last bits
        ops.set_cpu_kernels("portable")
        try:
            assert not np.array_equal(got, ops.softmax(x))
        finally:
            ops.set_cpu_kernels(kernels)


def hf_distribution(logits, history, temperature, top_k, top_p, min_p, penalty):
    """The distribution transformers' processors leave, in generate()'s order."""
    import torch
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    ids = torch.tensor([history], dtype=torch.long)
    s = torch.from_numpy(logits.astype(np.float32))[None]
    if penalty != 1.0:
        s = RepetitionPenaltyLogitsProcessor(penalty)(ids, s)
    s = TemperatureLogitsWarper(temperature)(ids, s)
    if top_k > 0:
        s = TopKLogitsWarper(top_k)(ids, s)
    if top_p < 1.0:
        s = TopPLogitsWarper(top_p)(ids, s)
    if min_p > 0.0:
        s = MinPLogitsWarper(min_p)(ids, s)
    return torch.softmax(s.double(), -1)[0].numpy()


SAMPLER_CASES = [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, penalty=1.0),
    dict(temperature=0.7, top_k=4, top_p=1.0, min_p=0.0, penalty=1.0),
    dict(temperature=1.3, top_k=0, top_p=0.8, min_p=0.0, penalty=1.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1, penalty=1.0),
    dict(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05, penalty=1.3),
]


@pytest.mark.parametrize("case", SAMPLER_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_sampler_distribution_matches_transformers(case):
    rng = np.random.default_rng(8)
    logits = (rng.standard_normal(10) * 1.5).astype(np.float32)
    logits[3] = -logits[3] if logits[3] > 0 else logits[3]  # a negative logit in the history
    history = [3, 1, 1, 7]
    want = hf_distribution(logits, history, case["temperature"], case["top_k"], case["top_p"], case["min_p"],
                           case["penalty"])
    sampler = ops.Sampler(1234)
    n = 20000
    counts = np.bincount([sampler.sample(logits, case["temperature"], case["top_k"], case["top_p"], case["min_p"],
                                         case["penalty"], history) for _ in range(n)], minlength=10)
    freq = counts / n
    assert np.all(counts[want == 0] == 0), (freq, want)
    tol = 4.5 * np.sqrt(want * (1 - want) / n) + 1e-3
    assert np.all(np.abs(freq - want) <= tol), (freq, want)


def test_sampler_is_seeded_and_greedy_at_zero_temperature():
    rng = np.random.default_rng(9)
    logits = rng.standard_normal(49152).astype(np.float32)
    a = ops.Sampler(42)
    b = ops.Sampler(42)
    seq_a = [a.sample(logits, 1.0, 50, 0.95, 0.0, 1.1, [1, 2, 3]) for _ in range(50)]
    seq_b = [b.sample(logits, 1.0, 50, 0.95, 0.0, 1.1, [1, 2, 3]) for _ in range(50)]
    assert seq_a == seq_b
    c = ops.Sampler(43)
    assert [c.sample(logits, 1.0, 50, 0.95) for _ in range(50)] != seq_a
    a.seed(42)
    assert [a.sample(logits, 1.0, 50, 0.95, 0.0, 1.1, [1, 2, 3]) for _ in range(50)] == seq_a
    top = int(np.argmax(logits))
    assert all(a.sample(logits, 0.0) == top for _ in range(5))
    assert a.sample(logits, 1.0, top_k=1) == top
    # The penalty applies under greedy decoding too: a penalized top token can lose.
    l2 = np.array([2.0, 1.9, -1.0], np.float32)
    assert a.sample(l2, 0.0) == 0
    assert a.sample(l2, 0.0, repetition_penalty=1.2, recent=[0]) == 1
    # Ids outside the vocabulary in the history are ignored.
    assert a.sample(l2, 0.0, repetition_penalty=1.2, recent=[-1, 7]) == 0


def test_sampler_full_vocab_top_p_matches_transformers_support():
    """top-p over a 49k vocab: the sampled tokens lie in transformers' nucleus."""
    rng = np.random.default_rng(10)
    logits = (rng.standard_normal(49152) * 4).astype(np.float32)
    want = hf_distribution(logits, [0], 1.0, 0, 0.5, 0.0, 1.0)
    support = set(np.nonzero(want)[0].tolist())
    s = ops.Sampler(5)
    got = {s.sample(logits, 1.0, 0, 0.5) for _ in range(300)}
    assert got <= support and len(got) > 1


@pytest.mark.parametrize("bits", [0, 1])
def test_bitplane_matmul_names_a_bit_width_below_2(bits):
    # the op's own check (check_view, its messages built only on failure), past the binding's shape checks
    w = np.random.default_rng(3).standard_normal((16, 256)).astype(np.float32)
    planes, qparams = bitplane.quantize_to_planes(w, 6, 128)
    x = np.random.default_rng(4).standard_normal((2, 256)).astype(np.float32)
    with pytest.raises(ValueError, match=rf"bitplane_matmul: bits must be in 2\.\.6, got {bits}$"):
        ops.bitplane_matmul(planes, qparams, 16, 256, 6, 128, bits, x, "decode")
