"""The CUDA bit-plane matmul (_core.bitplane_matmul_cuda, cuda/bitplane_matmul.cu; the GEMM
_core.bitplane_gemm_cuda, cuda/bitplane_matmul_gemm.cu, at the end) against numpy.

Each path is held to a reference of its own precision (tolerance from a same-precision baseline):
- 'fp32' (fp32 activations): the fp64 value of the k-bit product y = x · W_kᵀ; allowed error
  2x that of a plain fp32 implementation (dequantize, then a sequential fp32 dot) + 1e-6.
- 'tc' (int8 activations on binary tensor cores): the fp64 value of W_k · x̂, x̂ = scale · q the
  int8 activations rebuilt here bit for bit (per weight group: scale = absmax / 127 in fp32,
  q = rint(x / scale)); allowed error 2x that of the plain fp32 evaluation of that formula + 1e-6. How far int8 activations are from fp32 ones is checked separately: the
  kernel may be no farther from the fp32-activation product than the numpy int8 product is.
Shapes are awkward on purpose (N % 8 != 0; K = 300 and 576 end in a short super-chunk), every
bit-width 2..max_bits is run, inputs are fresh random numbers (never zeros), and the device output
is NaN-poisoned before each launch, so an unwritten element fails the test.
"""
from __future__ import annotations

import numpy as np
import pytest

import flexquant_rt._core as core
from flexquant_rt import bitplane as bp

gpu = pytest.mark.skipif(not core.cuda_available(), reason="no CUDA device (or built without CUDA)")
# The GEMV tests take `cuda_ops` (tests/conftest.py): they run on the GPU and on the CPU stand-in for
# CUDA (tests/cuda_host/simt: the same sources, each block's threads as fibers, the tensor-core
# instructions from the PTX ISA's fragment layouts), so CI checks the GEMV kernels' indexing and
# arithmetic without a GPU. The GEMMs too: cp.async and ldmatrix (tests/cuda_host/simt/mma.h), and
# for the wgmma GEMM mbarrier, TMA, wgmma and setmaxnreg (hopper.h), as the stand-in models them
# from the PTX ISA; a Hopper GPU remains the judge of that model.

KS = (128, 300, 576, 1536, 4096)
NS = (13, 200)


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_linear(rng, n, k, max_bits, group_size):
    """A random weight whose rows differ in offset and spread (both s_k and m_k matter);
    returns (codes (n, k), qparams (n, n_groups, 2) float16, planes (max_bits, plane_bytes))."""
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 0.1, (n, 1)) + rng.uniform(-0.05, 0.05, (n, 1)))
    codes, qparams = bp.quantize(w.astype(np.float32), max_bits, group_size)
    return codes, qparams, bp.pack_planes(codes, max_bits)


def make_x(rng, m, k):
    """Activations with a non-zero mean and a few outliers, as a transformer's are."""
    x = rng.standard_normal((m, k)) + 0.1
    x[rng.random((m, k)) < 0.01] *= 20.0
    return x.astype(np.float32)


def _groups(a, group_size):
    """(..., k) -> (..., n_groups, group_size), zero padded."""
    k = a.shape[-1]
    ng = -(-k // group_size)
    out = np.zeros(a.shape[:-1] + (ng * group_size,), dtype=a.dtype)
    out[..., :k] = a
    return out.reshape(a.shape[:-1] + (ng, group_size))


def _view(codes, qparams, bits, max_bits, group_size):
    """c_k (n, n_groups, G) int64 and s_k, m_k (n, n_groups) float32 of the k-bit view."""
    ck = _groups((codes >> (max_bits - bits)).astype(np.int64), group_size)
    s_k, m_k = bp.view_params(qparams, bits, max_bits)
    return ck, s_k, m_k


def reference_fp32(codes, qparams, x, bits, max_bits, group_size):
    """(fp64 value of x · W_kᵀ, plain fp32 implementation of it), both (m, n)."""
    ck, s_k, m_k = _view(codes, qparams, bits, max_bits, group_size)
    xg = _groups(x.astype(np.float64), group_size)
    dots = np.einsum("ngi,rgi->rng", ck.astype(np.float64), xg)
    exact = (dots * s_k[None]).sum(-1) + (m_k[None] * xg.sum(-1)[:, None, :]).sum(-1)
    wk = bp.dequantize(codes, qparams, bits, max_bits, group_size)  # float32 (n, k)
    plain = np.cumsum(wk[None] * x[:, None, :], axis=-1, dtype=np.float32)[..., -1]
    return exact, plain


def quantize_activations(x, group_size, act_bits=8):
    """The activation quantization of the TC path (act_bits 8) and the B1 GEMM: q (m, n_groups, G)
    int64 and scale (m, n_groups) fp32, x̂ = scale · q, scale = absmax / (2^(a-1) - 1)."""
    qmax = (1 << (act_bits - 1)) - 1
    xg = _groups(x, group_size)
    scale = np.abs(xg).max(-1) / np.float32(qmax)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(xg / safe[..., None]), -qmax, qmax)
    q = np.where(scale[..., None] > 0, q, 0).astype(np.int64)
    return q, scale


def reference_act(codes, qparams, x, bits, max_bits, group_size, act_bits):
    """(fp64 value of W_k · x̂, its plain fp32 evaluation), both (m, n), x̂ the act_bits-bit activations."""
    ck, s_k, m_k = _view(codes, qparams, bits, max_bits, group_size)
    q, scale = quantize_activations(x, group_size, act_bits)
    idot = np.einsum("ngi,rgi->rng", ck, q)  # exact integers
    qsum = q.sum(-1)
    exact = ((idot * s_k[None].astype(np.float64) + qsum[:, None, :] * m_k[None].astype(np.float64))
             * scale[:, None, :]).sum(-1)
    terms = idot.astype(np.float32) * (s_k[None] * scale[:, None, :]) + m_k[None] * (scale * qsum).astype(np.float32)[:, None, :]
    plain = np.cumsum(terms, axis=-1, dtype=np.float32)[..., -1]
    return exact, plain


def reference_tc(codes, qparams, x, bits, max_bits, group_size):
    """reference_act with the TC path's int8 activations."""
    return reference_act(codes, qparams, x, bits, max_bits, group_size, 8)


def reference_fp16_act(codes, qparams, x, bits, max_bits, group_size):
    """reference_fp32 with the activations rounded to fp16 first (the 'mma_a16' path)."""
    return reference_fp32(codes, qparams, x.astype(np.float16).astype(np.float32), bits, max_bits, group_size)


REFERENCES = {"fp32": reference_fp32, "tc": reference_tc, "mma": reference_tc,  # mma: TC's int8 activations
              "mma_a16": reference_fp16_act}


def bound_factor(path) -> int:
    """A path's error bound in units of the plain fp32 evaluation's: 2, and 4 for mma_a16, which sums
    in fp32 on the tensor cores (their accumulation order, and rounding, are the hardware's), as
    the f16 GEMM below."""
    return 4 if path == "mma_a16" else 2


def launch_rows(path) -> int:
    """Activation rows one GEMV launch of the path takes (bitplane_cuda_launch_rows)."""
    return 16 if path.startswith("mma") else 8


def run_and_check(ops, path, codes, qparams, planes, x, bits, max_bits, group_size, what, **tuning):
    n, k = codes.shape
    y = ops.bitplane_matmul_cuda(planes, qparams, n, k, max_bits, group_size, bits, x, path=path, **tuning)
    assert y.shape == (x.shape[0], n) and y.dtype == np.float32
    assert np.isfinite(y).all(), f"{what}: {np.count_nonzero(~np.isfinite(y))} outputs not written (NaN)"
    exact, plain = REFERENCES[path](codes, qparams, x, bits, max_bits, group_size)
    err, base = rel_err(y, exact), rel_err(plain, exact)
    factor = bound_factor(path)
    assert err <= factor * base + 1e-6, f"{what}: rel err {err:.3g} > {factor} x plain fp32 ({base:.3g}) + 1e-6"
    return y


@pytest.mark.parametrize("path", ["fp32", "tc"])
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("k", KS)
def test_matches_reference_every_bit_width(cuda_ops, path, n, group_size, k):
    rng = np.random.default_rng([n, k, group_size, int(path == "tc")])
    max_bits = 8 if (k + group_size) % 3 else 6
    codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
    for bits in range(2, max_bits + 1):
        m = 1 + (3 * bits + k + n) % 8  # every m in 1..8 appears across the sweep
        x = make_x(rng, m, k)
        run_and_check(cuda_ops, path, codes, qparams, planes, x, bits, max_bits, group_size,
                      f"{path} n={n} k={k} G={group_size} bits={bits} m={m}")


@pytest.mark.parametrize("path,group_size", [("tc", 256), ("tc", 512), ("fp32", 96), ("fp32", 256), ("fp32", 512)])
@pytest.mark.parametrize("k", [300, 1536, 4096])
def test_other_group_sizes(cuda_ops, path, group_size, k):
    rng = np.random.default_rng([k, group_size, 7])
    n, max_bits = 200, 8
    codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
    for bits in (2, 3, 5, 8):
        m = 1 + (bits + k) % 8
        run_and_check(cuda_ops, path, codes, qparams, planes, make_x(rng, m, k), bits, max_bits, group_size,
                      f"{path} k={k} G={group_size} bits={bits} m={m}")


@pytest.mark.parametrize("path,group_size", [("tc", 32), ("tc", 64), ("tc", 128), ("tc", 256), ("fp32", 128)]
                         + [(p, g) for p in ("mma", "mma_a16") for g in (128, 256, 512)])
def test_every_m(cuda_ops, path, group_size):
    """m = 1..8 (mma: 1..16, rows 9..16 the mma tile's lower half) is compiled per value (register
    arrays); more rows run in slices of one launch."""
    rng = np.random.default_rng([group_size, 11])
    n, k, max_bits = 200, 576, 7
    codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
    rows = launch_rows(path)
    for m in list(range(1, rows + 1)) + ([11, 17] if rows == 8 else [17, 35]):
        bits = 2 + m % (max_bits - 1)
        run_and_check(cuda_ops, path, codes, qparams, planes, make_x(rng, m, k), bits, max_bits, group_size,
                      f"{path} G={group_size} m={m} bits={bits}")


def test_auto_picks_tc_where_it_applies_and_vector_input(cuda_ops):
    rng = np.random.default_rng(3)
    n, k, max_bits = 13, 300, 4
    for group_size, path in ((64, "tc"), (96, "fp32")):
        codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
        x = make_x(rng, 1, k)
        y_auto = cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, max_bits, group_size, 3, x[0])
        y_path = cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, max_bits, group_size, 3, x, path=path)
        assert y_auto.shape == (n,)
        np.testing.assert_array_equal(y_auto, y_path[0])  # same kernel, deterministic reduction
    if cuda_ops is core:  # (the stand-in has no such query)
        assert core.bitplane_cuda_tc_supports(128) and not core.bitplane_cuda_tc_supports(96)


def test_reads_only_the_first_bits_planes(cuda_ops):
    """Garbage in the planes past `bits` (or no such planes at all) changes nothing."""
    rng = np.random.default_rng(5)
    n, k, max_bits, group_size = 200, 1536, 8, 128
    codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
    x = make_x(rng, 2, k)
    for path in ("tc", "fp32", "mma", "mma_a16"):
        for bits in (2, 5):
            y = cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, max_bits, group_size, bits, x, path=path)
            junk = planes.copy()
            junk[bits:] = rng.integers(0, 256, junk[bits:].shape, dtype=np.uint8)
            np.testing.assert_array_equal(
                cuda_ops.bitplane_matmul_cuda(junk, qparams, n, k, max_bits, group_size, bits, x, path=path), y)
            np.testing.assert_array_equal(cuda_ops.bitplane_matmul_cuda(
                np.ascontiguousarray(planes[:bits]), qparams, n, k, max_bits, group_size, bits, x, path=path), y)


def test_tc_error_is_the_int8_activation_error(cuda_ops):
    """Against fp32 activations the TC result is as far off as the numpy int8 product, no farther."""
    rng = np.random.default_rng(9)
    n, k, max_bits, group_size = 200, 4096, 8, 128
    codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
    for bits in (8, 4, 2):
        x = make_x(rng, 4, k)
        exact_fp32, _ = reference_fp32(codes, qparams, x, bits, max_bits, group_size)
        exact_int8, _ = reference_tc(codes, qparams, x, bits, max_bits, group_size)
        y = cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, max_bits, group_size, bits, x, path="tc")
        numpy_err, kernel_err = rel_err(exact_int8, exact_fp32), rel_err(y, exact_fp32)
        assert 0 < numpy_err < 0.1, numpy_err  # int8 with outliers in the group: percents
        assert kernel_err <= numpy_err * (1 + 1e-3) + 1e-6, (bits, kernel_err, numpy_err)


@pytest.mark.parametrize("path,group_size", [("tc", 64), ("fp32", 64), ("mma", 128), ("mma_a16", 512)])
def test_any_split_k(cuda_ops, path, group_size):
    """Any number of warps per block (split-K, each warp several super-chunks or none) is right."""
    rng = np.random.default_rng(23)
    n, k, max_bits = 13, 4096 + 384, 8  # 9 super-chunks, the last one short
    codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
    for m in (1, 4) + ((9, 16) if launch_rows(path) == 16 else ()):
        x = make_x(rng, m, k)
        for warps in (1, 2, 3, 16):
            run_and_check(cuda_ops, path, codes, qparams, planes, x, 5, max_bits, group_size, f"{path} warps={warps} m={m}",
                          warps=warps)


def test_deterministic(cuda_ops):
    rng = np.random.default_rng(13)
    n, k, max_bits, group_size = 200, 4096, 8, 64
    codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
    x = make_x(rng, 3, k)
    for path in ("tc", "fp32"):
        a = cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, max_bits, group_size, 6, x, path=path)
        b = cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, max_bits, group_size, 6, x, path=path)
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not hasattr(getattr(core, "ops", None), "bitplane_matmul"), reason="CPU op not bound (_core.ops)")
def test_fp32_path_matches_cpu_op(cuda_ops):
    rng = np.random.default_rng(17)
    for n, k, group_size in ((13, 300, 64), (200, 4096, 128)):
        codes, qparams, planes = make_linear(rng, n, k, 8, group_size)
        for bits, m in ((3, 1), (8, 5)):
            x = make_x(rng, m, k)
            exact, plain = reference_fp32(codes, qparams, x, bits, 8, group_size)
            cpu = core.ops.bitplane_matmul(planes, qparams, n, k, 8, group_size, bits, x)
            gpu = cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, 8, group_size, bits, x, path="fp32")
            assert rel_err(gpu, cpu) <= 4 * rel_err(plain, exact) + 2e-6


@gpu
def test_bad_arguments():
    rng = np.random.default_rng(19)
    n, k, max_bits = 13, 300, 4
    codes, qparams, planes = make_linear(rng, n, k, max_bits, 96)
    x = make_x(rng, 1, k)
    call = core.bitplane_matmul_cuda
    with pytest.raises(core.FlexquantError, match="bits must be in 2..4"):
        call(planes, qparams, n, k, max_bits, 96, 1, x)
    with pytest.raises(ValueError, match="holds 4 planes"):
        call(planes, qparams, n, k, max_bits, 96, 5, x)
    with pytest.raises(core.FlexquantError, match="TC path needs group_size"):
        call(planes, qparams, n, k, max_bits, 96, 3, x, path="tc")
    with pytest.raises(core.FlexquantError, match="plane_bytes must be"):
        call(np.ascontiguousarray(planes[:, :-128]), qparams, n, k, max_bits, 96, 3, x)
    with pytest.raises(ValueError, match=r"qparams: expected shape \(13, 4, 2\)"):
        call(planes, qparams[:, :3].copy(), n, k, max_bits, 96, 3, x)
    with pytest.raises(ValueError, match=r"x: expected shape"):
        call(planes, qparams, n, k, max_bits, 96, 3, x[:, :-1].copy())
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        call(planes, qparams, n, k, max_bits, 96, 3, x.astype(np.float64))
    with pytest.raises(core.FlexquantError, match="warps_per_block must be in 0..16"):
        call(planes, qparams, n, k, max_bits, 96, 3, x, warps=17)
    with pytest.raises(ValueError, match="path: expected"):
        call(planes, qparams, n, k, max_bits, 96, 3, x, path="int4")


# ---- the tensor-core GEMM (_core.bitplane_gemm_cuda, cuda/bitplane_matmul_gemm.cu) ------------------
#
# References of the GEMM's own precision:
# - 'a8': W_k · x̂ with the int8 activations of the TC GEMV (reference_tc, rebuilt here bit for bit);
# - 'a16': W_k · fp16(x) (reference_fp32 on the fp16-rounded activations);
# - 'b1' with a-bit activations: W_k · x̂_a (reference_act: the same formula with qmax = 2^(a-1) - 1).
# The GEMM groups its fp32 terms differently (centred codes, the group's offset added at its end),
# so the allowed error is 4x that of the plain fp32 evaluation (+ 1e-6), and the GEMM must agree with
# torch.matmul on the dequantized view and with the CPU op within the same bound.

def gemm_bits(ops, max_bits):
    """The bit-widths a GEMM sweep runs: all on a GPU; on the CPU stand-in, whose GEMMs (which have run
    on an H100) cost seconds each, four of them spread over 2..max_bits."""
    return range(2, max_bits + 1) if ops is core else (2, 3, max_bits - 2, max_bits)


def skip_unless_gemm_runs(ops, kind, group_size):
    """'a8_wg' (wgmma) runs on a Hopper GPU with sm_90a code, at group sizes that are multiples of 128."""
    if kind == "a8_wg" and not ops.bitplane_gemm_wgmma_supported(group_size):
        pytest.skip(f"the wgmma GEMM does not run here at group_size {group_size} (needs sm_90a, G % 128 == 0)")


def gemm_reference(kind, codes, qparams, x, bits, max_bits, group_size, act_bits=0):
    if kind == "a16":
        return reference_fp32(codes, qparams, x.astype(np.float16).astype(np.float32), bits, max_bits, group_size)
    return reference_act(codes, qparams, x, bits, max_bits, group_size, act_bits or 8)


def gemm_and_check(ops, kind, codes, qparams, planes, x, bits, max_bits, group_size, what, act_bits=0):
    n, k = codes.shape
    y = ops.bitplane_gemm_cuda(planes, qparams, n, k, max_bits, group_size, bits, x, kind=kind, act_bits=act_bits)
    assert y.shape == (x.shape[0], n) and y.dtype == np.float32
    assert np.isfinite(y).all(), f"{what}: {np.count_nonzero(~np.isfinite(y))} outputs not written or poisoned"
    exact, plain = gemm_reference(kind, codes, qparams, x, bits, max_bits, group_size, act_bits)
    err, base = rel_err(y, exact), rel_err(plain, exact)
    assert err <= 4 * base + 1e-6, f"{what}: rel err {err:.3g} > 4 x plain fp32 ({base:.3g}) + 1e-6"
    return y, exact, base


@pytest.mark.parametrize("kind", ["a8", "a16", "a8_wg"])
@pytest.mark.parametrize("n,k,group_size", [(13, 300, 32), (200, 576, 64), (200, 1536, 128), (131, 4096, 128),
                                            (257, 300, 96), (64, 1536, 256), (40, 4096 + 384, 512),
                                            (13, 300, 128), (130, 640, 384)])
def test_gemm_every_bit_width(cuda_ops, kind, n, k, group_size):
    """Every k in 2..max_bits, m across the tile edges, odd N, K not a multiple of 128, group sizes
    from 32 to 512 (96: groups that straddle the 128-column padding; 384 with k = 640: a last group
    of 256 columns, and chunks of 256 + 128 within the first)."""
    skip_unless_gemm_runs(cuda_ops, kind, group_size)
    rng = np.random.default_rng([n, k, group_size, 41 + int(kind == "a8")])
    max_bits = 8 if (n + k) % 2 else 7
    codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
    ms = (1, 7, 16, 100, 129, 300)
    for bits in gemm_bits(cuda_ops, max_bits):
        m = ms[(bits + n) % len(ms)]
        gemm_and_check(cuda_ops, kind, codes, qparams, planes, make_x(rng, m, k), bits, max_bits, group_size,
                       f"{kind} n={n} k={k} G={group_size} bits={bits} m={m}")


@pytest.mark.parametrize("kind", ["a8", "a16", "a8_wg"])
def test_gemm_large_m(cuda_ops, kind):
    """A prefill-sized m (2048): many row tiles, every one checked."""
    skip_unless_gemm_runs(cuda_ops, kind, 128)
    rng = np.random.default_rng(43)
    n, k, max_bits, group_size = 136, 1000, 8, 128
    codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
    for bits in (8, 4):
        gemm_and_check(cuda_ops, kind, codes, qparams, planes, make_x(rng, 2048, k), bits, max_bits, group_size,
                       f"{kind} m=2048 bits={bits}")


@pytest.mark.parametrize("kind,act_bits", [("a8", 0), ("a16", 0), ("b1", 8), ("b1", 6), ("b1", 4), ("a8_wg", 0)])
def test_gemm_signed_edges(cuda_ops, kind, act_bits):
    """Codes at 0 and 2^B - 1 (centred: -128 and 127 at 8 bits), activations at ±absmax of their
    group (±qmax, the sign plane set or not): the extremes of every integer the mma sees, over a
    long group (512: the longest int32 run between conversions; B1: two chunks per group)."""
    skip_unless_gemm_runs(cuda_ops, kind, 512)
    rng = np.random.default_rng(47)
    n, k, max_bits, group_size = 72, 2048, 8, 512
    codes = np.where(rng.random((n, k)) < 0.5, 0, 255).astype(np.uint8)
    _, qparams = bp.quantize(rng.standard_normal((n, k)).astype(np.float32), max_bits, group_size)
    planes = bp.pack_planes(codes, max_bits)
    x = np.where(rng.random((130, k)) < 0.5, -3.0, 3.0).astype(np.float32)
    for bits in (8, 5, 2):
        gemm_and_check(cuda_ops, kind, codes, qparams, planes, x, bits, max_bits, group_size,
                       f"{kind} a={act_bits} edges bits={bits}", act_bits=act_bits)


@pytest.mark.parametrize("kind", ["a8", "a16"])
def test_gemm_matches_torch_and_the_cpu_op(cuda_ops, kind):
    """The GEMM against torch.matmul on the dequantized view and against the CPU op, each on the
    activations of its precision."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(53)
    n, k, max_bits, group_size = 300, 1536, 8, 128
    codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
    x = make_x(rng, 64, k)
    for bits in (8, 6, 4):
        y, exact, base = gemm_and_check(cuda_ops, kind, codes, qparams, planes, x, bits, max_bits, group_size, f"{kind} bits={bits}")
        if kind == "a8":
            xa = core.ops.quantize_activations(x, group_size, 8)  # x̂, bit for bit the GEMM's int8 activations
        else:
            xa = x.astype(np.float16).astype(np.float32)
        wk = bp.dequantize(codes, qparams, bits, max_bits, group_size)
        ref = (torch.from_numpy(xa) @ torch.from_numpy(wk).T).numpy()
        assert rel_err(y, ref) <= 4 * base + rel_err(ref, exact) + 1e-6, (bits, rel_err(y, ref))
        cpu = core.ops.bitplane_matmul(planes, qparams, n, k, max_bits, group_size, bits, xa)
        assert rel_err(y, cpu) <= 4 * base + rel_err(cpu, exact) + 1e-6, (bits, rel_err(y, cpu))


def test_gemm_a8_equals_the_tc_gemv(cuda_ops):
    """Both W{k}A8 paths compute W_k · x̂ with the same x̂: they agree to fp32 rounding."""
    rng = np.random.default_rng(59)
    n, k, max_bits, group_size = 200, 4096, 8, 128
    codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
    x = make_x(rng, 8, k)
    for bits in (8, 3):
        gemv = cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, max_bits, group_size, bits, x, path="tc")
        gemm = cuda_ops.bitplane_gemm_cuda(planes, qparams, n, k, max_bits, group_size, bits, x, kind="a8")
        exact, plain = reference_tc(codes, qparams, x, bits, max_bits, group_size)
        assert rel_err(gemm, gemv) <= 6 * rel_err(plain, exact) + 1e-6


@pytest.mark.parametrize("group_size", [128, 256, 512])
def test_gemm_a8_wg_equals_the_a8_gemm(cuda_ops, group_size):
    """The wgmma GEMM runs the A8 GEMM's arithmetic (same int8 x̂, codes and fp32 expressions; its
    fp32 steps come every 128 K, the A8 GEMM's every group or 256 K: the same steps at groups of 128),
    so the two agree to fp32 rounding, on every shape the tiles can cut."""
    skip_unless_gemm_runs(cuda_ops, "a8_wg", group_size)
    rng = np.random.default_rng(group_size)
    # (k = 600: K padding in the last stage and a short last group at every group size)
    for n, k, m in ((131, 4096 + 384, 300), (128, 1536, 128), (7, 600, 1), (300, 2048, 257)):
        codes, qparams, planes = make_linear(rng, n, k, 8, group_size)
        x = make_x(rng, m, k)
        for bits in (8, 5, 2):
            a8 = cuda_ops.bitplane_gemm_cuda(planes, qparams, n, k, 8, group_size, bits, x, kind="a8")
            wg = cuda_ops.bitplane_gemm_cuda(planes, qparams, n, k, 8, group_size, bits, x, kind="a8_wg")
            assert np.isfinite(wg).all()
            exact, plain = reference_act(codes, qparams, x, bits, 8, group_size, 8)
            assert rel_err(wg, a8) <= 2 * rel_err(plain, exact) + 1e-7, (n, k, m, bits, rel_err(wg, a8))


def test_gemm_a8_wg_refuses_what_it_cannot_run(cuda_ops, monkeypatch):
    """Group sizes that are not multiples of 128 (and, without sm_90a or with the off switch
    FLEXQUANT_CUDA_WGMMA_OFF=1, every call) get an error naming the cause, never a launch of the
    kernel's trap branch."""
    rng = np.random.default_rng(73)
    n, k = 40, 576
    codes, qparams, planes = make_linear(rng, n, k, 8, 64)
    x = make_x(rng, 3, k)
    with pytest.raises(core.FlexquantError, match="multiple of 128, got 64"):
        cuda_ops.bitplane_gemm_cuda(planes, qparams, n, k, 8, 64, 8, x, kind="a8_wg")
    codes, qparams, planes = make_linear(rng, n, k, 8, 128)
    if cuda_ops is not core:  # (the stand-in runs each op in a fresh process, which reads the switch)
        monkeypatch.setenv("FLEXQUANT_CUDA_WGMMA_OFF", "1")
        assert not cuda_ops.bitplane_gemm_wgmma_supported(128)
    if not cuda_ops.bitplane_gemm_wgmma_supported(128):
        with pytest.raises(core.FlexquantError, match="needs a compute capability 9.0 GPU"):
            cuda_ops.bitplane_gemm_cuda(planes, qparams, n, k, 8, 128, 8, x, kind="a8_wg")
    monkeypatch.delenv("FLEXQUANT_CUDA_WGMMA_OFF", raising=False)
    # the device still works afterwards
    gemm_and_check(cuda_ops, "a8", codes, qparams, planes, x, 8, 8, 128, "a8 after the refusals")


def test_gemm_unpack_codes(cuda_ops):
    """The unpack launch: centred codes of the first `bits` planes, K padding included (zero bits)."""
    rng = np.random.default_rng(61)
    for n, k in ((13, 300), (200, 4096 + 384)):
        codes, qparams, planes = make_linear(rng, n, k, 8, 128)
        k_pad = -(-k // 128) * 128
        for bits in (8, 5, 2):
            got = cuda_ops.bitplane_unpack_codes_cuda(planes, qparams, n, k, 8, 128, bits)
            want = np.zeros((n, k_pad), dtype=np.int64)
            want[:, :k] = codes >> (8 - bits)
            want -= 1 << (bits - 1)
            np.testing.assert_array_equal(got.astype(np.int64), want)


def test_gemm_reads_only_the_first_bits_planes_and_is_deterministic(cuda_ops):
    rng = np.random.default_rng(67)
    n, k, max_bits = 200, 1536, 8
    x = make_x(rng, 150, k)
    # (the wgmma GEMM takes group sizes that are multiples of 128)
    kinds = [("a8", 64), ("a16", 64)] + ([("a8_wg", 128)] if cuda_ops.bitplane_gemm_wgmma_supported(128) else [])
    for kind, group_size in kinds:
        codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
        y = cuda_ops.bitplane_gemm_cuda(planes, qparams, n, k, max_bits, group_size, 5, x, kind=kind)
        np.testing.assert_array_equal(cuda_ops.bitplane_gemm_cuda(planes, qparams, n, k, max_bits, group_size, 5, x,
                                                              kind=kind), y)
        junk = planes.copy()
        junk[5:] = rng.integers(0, 256, junk[5:].shape, dtype=np.uint8)
        np.testing.assert_array_equal(cuda_ops.bitplane_gemm_cuda(junk, qparams, n, k, max_bits, group_size, 5, x,
                                                              kind=kind), y)


@gpu
def test_gemm_bad_arguments():
    rng = np.random.default_rng(71)
    n, k, max_bits = 13, 300, 4
    codes, qparams, planes = make_linear(rng, n, k, max_bits, 96)
    x = make_x(rng, 3, k)
    call = core.bitplane_gemm_cuda
    with pytest.raises(core.FlexquantError, match="bits must be in 2..4, got 1"):
        call(planes, qparams, n, k, max_bits, 96, 1, x)
    with pytest.raises(ValueError, match="kind: expected 'a8', 'a16', 'b1' or 'a8_wg', got 'a4'"):
        call(planes, qparams, n, k, max_bits, 96, 3, x, kind="a4")
    with pytest.raises(core.FlexquantError, match="plane_bytes must be"):
        call(np.ascontiguousarray(planes[:, :-128]), qparams, n, k, max_bits, 96, 3, x)
    with pytest.raises(ValueError, match=r"x: expected shape"):
        call(planes, qparams, n, k, max_bits, 96, 3, x[:, :-1].copy())
    assert call(planes, qparams, n, k, max_bits, 96, 3, x[:0]).shape == (0, n)


@pytest.mark.parametrize("act_bits", [8, 6, 4, 3])
@pytest.mark.parametrize("n,k,group_size", [(13, 300, 32), (200, 576, 64), (131, 1536, 128), (40, 4096 + 384, 256),
                                            (64, 1000, 512)])
def test_gemm_b1_every_bit_width(cuda_ops, act_bits, n, k, group_size):
    """The binary-tensor-core GEMM (W{k}A{a}) against W_k · x̂_a: every weight k, activation widths
    on both plane layouts (8 rows per token for a >= 5, 4 for a <= 4), masked passes for groups
    under 256 columns, short last chunks (K % 256 == 128), m across the 16-token warp tiles."""
    rng = np.random.default_rng([n, k, group_size, act_bits, 73])
    max_bits = 8
    codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
    ms = (1, 7, 16, 17, 100, 129)
    for bits in gemm_bits(cuda_ops, max_bits):
        m = ms[(bits + n + act_bits) % len(ms)]
        gemm_and_check(cuda_ops, "b1", codes, qparams, planes, make_x(rng, m, k), bits, max_bits, group_size,
                       f"b1 a={act_bits} n={n} k={k} G={group_size} bits={bits} m={m}", act_bits=act_bits)


def test_gemm_b1_a8_equals_a8_gemm_and_cpu_op(cuda_ops):
    """W{k}A8 on the binary tensor cores, on the s8 tensor cores and on the CPU (quantize_activations
    then the CPU op) are one product: they agree to fp32 rounding."""
    rng = np.random.default_rng(79)
    n, k, max_bits, group_size = 200, 1536, 8, 128
    codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
    x = make_x(rng, 40, k)
    for bits, act_bits in ((8, 8), (6, 6), (4, 4)):
        b1 = cuda_ops.bitplane_gemm_cuda(planes, qparams, n, k, max_bits, group_size, bits, x, kind="b1", act_bits=act_bits)
        cpu = core.ops.bitplane_matmul(planes, qparams, n, k, max_bits, group_size, bits,
                                       core.ops.quantize_activations(x, group_size, act_bits))
        exact, plain = reference_act(codes, qparams, x, bits, max_bits, group_size, act_bits)
        assert rel_err(b1, cpu) <= 4 * rel_err(plain, exact) + rel_err(cpu, exact) + 1e-6
        if act_bits == 8:
            a8 = cuda_ops.bitplane_gemm_cuda(planes, qparams, n, k, max_bits, group_size, bits, x, kind="a8")
            assert rel_err(b1, a8) <= 8 * rel_err(plain, exact) + 1e-6


def test_gemm_b1_bad_arguments(cuda_ops):
    rng = np.random.default_rng(83)
    n, k, max_bits = 13, 300, 8
    codes, qparams, planes = make_linear(rng, n, k, max_bits, 96)
    x = make_x(rng, 3, k)
    call = cuda_ops.bitplane_gemm_cuda
    with pytest.raises(core.FlexquantError, match="B1 GEMM needs group_size 32, 64, 128, 256 or 512, got 96"):
        call(planes, qparams, n, k, max_bits, 96, 4, x, kind="b1")
    if cuda_ops is core:  # (the stand-in has no such query)
        assert not core.bitplane_gemm_b1_supports(96) and not core.bitplane_gemm_b1_supports(1024)
        assert core.bitplane_gemm_b1_supports(512)
    codes, qparams, planes = make_linear(rng, n, k, max_bits, 64)
    with pytest.raises(core.FlexquantError, match="act_bits must be in 2..8 for the B1 GEMM, got 9"):
        call(planes, qparams, n, k, max_bits, 64, 4, x, kind="b1", act_bits=9)
    with pytest.raises(core.FlexquantError, match="act_bits must be 8 \\(or 0\\) for this kind, got 6"):
        call(planes, qparams, n, k, max_bits, 64, 4, x, kind="a8", act_bits=6)


# ---- the fused decode-step pieces: the accumulating store and the fused activation preparation ---------

@pytest.mark.parametrize("kind", ["tc", "fp32", "mma", "mma_a16"])
def test_accumulate_adds_the_product_with_one_rounding(cuda_ops, kind):
    """y0 + x · W_kᵀ as the engine's residual adds run it (o and down store into x): the stored
    value is y0 plus the product the plain call returns, one fp32 addition, every element."""
    rng = np.random.default_rng(21)
    n, k, bits = 131, 576, 5
    g = 128 if kind.startswith("mma") else 64  # the MMA kernels' smallest group
    codes, qparams, planes = make_linear(rng, n, k, 8, g)
    for m in (1, 3, 8) + ((13, 16) if kind.startswith("mma") else ()):
        x = make_x(rng, m, k)
        y0 = rng.standard_normal((m, n)).astype(np.float32)
        plain = cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, 8, g, bits, x, path=kind)
        acc = cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, 8, g, bits, x, path=kind, y0=y0)
        np.testing.assert_array_equal(acc, y0 + plain, err_msg=f"gemv {kind} m={m}")


@pytest.mark.parametrize("kind", ["a8", "a16", "b1", "a8_wg"])
def test_gemm_accumulate_adds_the_product_with_one_rounding(cuda_ops, kind):
    """The same for the GEMMs (the prompt's residual adds)."""
    rng = np.random.default_rng(21)
    n, k, bits = 131, 576, 5
    g = 128 if kind == "a8_wg" else 64  # the wgmma kernel's smallest group
    skip_unless_gemm_runs(cuda_ops, kind, g)
    codes, qparams, planes = make_linear(rng, n, k, 8, g)
    for m in (1, 17, 130):
        x = make_x(rng, m, k)
        y0 = rng.standard_normal((m, n)).astype(np.float32)
        plain = cuda_ops.bitplane_gemm_cuda(planes, qparams, n, k, 8, g, bits, x, kind=kind)
        acc = cuda_ops.bitplane_gemm_cuda(planes, qparams, n, k, 8, g, bits, x, kind=kind, y0=y0)
        np.testing.assert_array_equal(acc, y0 + plain, err_msg=f"gemm {kind} m={m}")


@pytest.mark.parametrize("path,group_size,m",
                         [(p, g, m) for p, g in (("tc", 128), ("tc", 32), ("tc", 512), ("fp32", 96)) for m in (1, 3, 8)]
                         + [(p, g, m) for p in ("mma", "mma_a16") for g in (128, 512) for m in (1, 3, 8, 13, 16)])
def test_multi_linear_launch_equals_a_launch_each(cuda_ops, path, group_size, m):
    """q, k and v (or gate and up) in one GEMV launch, each linear at its own bit-width read from
    device memory: at the same warps per block, bit for bit a launch per linear; with the automatic
    warps (from the whole grid) within the path's tolerance. Narrow k/v (n = 13: GQA, a partial last
    row tile) sit between wider linears, so block-to-linear mapping and the tile edges are exercised."""
    rng = np.random.default_rng(m * 7 + group_size)
    k = 1536 if group_size == 512 else 576
    ns, bits = [200, 13, 64], [8, 3, 5]
    lins = [make_linear(rng, n, k, 8, group_size) for n in ns]
    # each linear's planes array holds only its own bits[i] planes (all the entry point may read)
    planes = [np.ascontiguousarray(lin[2][:b]) for lin, b in zip(lins, bits)]
    qps = [lin[1] for lin in lins]
    x = make_x(rng, m, k)
    for warps in (1, 2, 4):
        ys = cuda_ops.bitplane_matmul_multi_cuda(planes, qps, ns, k, 8, group_size, bits, x, path=path, warps=warps)
        for i, y in enumerate(ys):
            assert y.shape == (m, ns[i]) and np.isfinite(y).all(), f"linear {i}: outputs not written"
            one = cuda_ops.bitplane_matmul_cuda(planes[i], qps[i], ns[i], k, 8, group_size, bits[i], x, path=path,
                                            warps=warps)
            np.testing.assert_array_equal(y, one, err_msg=f"linear {i}, warps {warps}")
    ys = cuda_ops.bitplane_matmul_multi_cuda(planes, qps, ns, k, 8, group_size, bits, x, path=path)
    for i, y in enumerate(ys):
        codes, qp, _ = lins[i]
        exact, plain = REFERENCES[path](codes, qp, x, bits[i], 8, group_size)
        assert rel_err(y, exact) <= bound_factor(path) * rel_err(plain, exact) + 1e-6, f"linear {i}"


@pytest.mark.parametrize("path", ["tc", "fp32", "mma", "mma_a16"])
@pytest.mark.parametrize("k", [300, 1536, 4096 + 384])
def test_l2_prefetch_changes_no_result(cuda_ops, path, k):
    """prefetch=1 (each warp asks L2 for its next super-chunk, the short last one included) is a
    hint: bit for bit the same products, at every split and bit-width, through the one-linear and the
    several-linear launch."""
    rng = np.random.default_rng(k)
    g = 96 if path == "fp32" else 128
    codes, qp, planes = make_linear(rng, 77, k, 8, g)
    x = make_x(rng, 3, k)
    for bits in (8, 5, 2):
        for warps in (1, 2, 4):
            a, b = (cuda_ops.bitplane_matmul_cuda(planes, qp, 77, k, 8, g, bits, x, path=path, warps=warps, prefetch=pf)
                    for pf in (0, 1))
            assert np.isfinite(a).all()
            np.testing.assert_array_equal(a, b, err_msg=f"bits {bits}, warps {warps}")
    ys = [cuda_ops.bitplane_matmul_multi_cuda([planes] * 2, [qp] * 2, [77, 77], k, 8, g, [6, 3], x, path=path, prefetch=pf)
          for pf in (0, 1)]
    for a, b in zip(*ys):
        np.testing.assert_array_equal(a, b)
    if cuda_ops is core:  # the benchmark entry point (CUDA graphs) runs on a GPU only
        r = core.bitplane_matmul_cuda_bench(planes, qp, 77, k, 8, g, 8, x[:1], path=path, reps=2, prefetch=1)
        assert r["prefetch"] == 1


@pytest.mark.parametrize("op", ["rms_norm", "swiglu"])
@pytest.mark.parametrize("k,group_size", [(576, 64), (4096, 128), (1536, 256), (300, 32)])
def test_fused_preparation_is_the_separate_ops_bit_for_bit(cuda_ops, op, k, group_size):
    """The decode step runs RMSNorm (and SwiGLU) inside the GEMV's int8 preparation: the op's output
    must be what rms_norm_cuda / swiglu_cuda give, and the product what the TC GEMV gives on it."""
    rng = np.random.default_rng(22)
    n, bits = 200, 6
    codes, qparams, planes = make_linear(rng, n, k, 8, group_size)
    for m in (1, 5, 8):
        x = make_x(rng, m, k)
        if op == "rms_norm":
            aux = (1.0 + 0.1 * rng.standard_normal(k)).astype(np.float32)
            ref_out = cuda_ops.rms_norm_cuda(x, aux, 1e-5)
        else:
            aux = rng.standard_normal((m, k)).astype(np.float32)
            ref_out = cuda_ops.swiglu_cuda(x.reshape(-1), aux.reshape(-1)).reshape(m, k)
        y, out = cuda_ops.bitplane_matmul_fused_cuda(planes, qparams, n, k, 8, group_size, bits, x, op=op, aux=aux,
                                                 eps=1e-5)
        np.testing.assert_array_equal(out, ref_out, err_msg=f"{op} output, m={m}")
        ref_y = cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, 8, group_size, bits, ref_out, path="tc")
        np.testing.assert_array_equal(y, ref_y, err_msg=f"{op} product, m={m}")
        assert np.isfinite(y).all()


# ---- the MMA path: the TC path's int8 activations on the s8 tensor cores (cuda/bitplane_mma.cuh) -------
#
# Its integer sums per group are exact and equal the TC path's; only the fp32 epilogue differs (the
# centred form a_s·s·2^(B-8)·I8 + a_z·z_k), so it is held to the TC reference's bound and must agree
# with the TC kernel to fp32 rounding. tests/test_mma_layout.py checks its data layout on the CPU.

MMA_GROUPS = (128, 256, 512)


def test_mma_signed_edges(cuda_ops):
    """Codes at both ends of the range and activations at ±127 after quantization: the largest
    integer sums (|I8| up to 512·127·128), exact in int32 and in fp32."""
    rng = np.random.default_rng(41)
    n, k, max_bits = 24, 1536, 8
    for group_size in MMA_GROUPS:
        codes = np.where(rng.random((n, k)) < 0.5, 0, 255).astype(np.uint8)
        codes[:8] = 255
        codes[8:16] = 0
        qparams = np.stack([np.full((n, k // group_size), 0.01), np.full((n, k // group_size), -1.28)], -1)
        qparams = qparams.astype(np.float16)
        planes = bp.pack_planes(codes, max_bits)
        x = np.where(rng.random((3, k)) < 0.5, -1.0, 1.0).astype(np.float32)
        x[0] = 1.0
        x[1] = -1.0
        for bits in (8, 5, 2):
            run_and_check(cuda_ops, "mma", codes, qparams, planes, x, bits, max_bits, group_size, f"G={group_size} bits={bits}")


@pytest.mark.parametrize("op", ["rms_norm", "swiglu"])
@pytest.mark.parametrize("k,group_size", [(4096, 128), (1536, 256), (4096 + 384, 512)])
def test_mma_from_the_fused_preparation(cuda_ops, op, k, group_size):
    """The decode step prepares inside RMSNorm / SwiGLU; the MMA kernel must read that preparation
    as it reads the plain one (the int8 copy in its order is written by both)."""
    rng = np.random.default_rng(53)
    n, bits = 200, 6
    codes, qparams, planes = make_linear(rng, n, k, 8, group_size)
    for m in (1, 5, 8, 12, 16):
        x = make_x(rng, m, k)
        aux = ((1.0 + 0.1 * rng.standard_normal(k)) if op == "rms_norm" else rng.standard_normal((m, k))).astype(np.float32)
        y, out = cuda_ops.bitplane_matmul_fused_cuda(planes, qparams, n, k, 8, group_size, bits, x, op=op, aux=aux,
                                                 eps=1e-5, path="mma")
        ref_y = cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, 8, group_size, bits, out, path="mma")
        np.testing.assert_array_equal(y, ref_y, err_msg=f"{op} product, m={m}")


@pytest.mark.parametrize("path", ["mma", "mma_a16"])
@pytest.mark.parametrize("group_size", MMA_GROUPS)
@pytest.mark.parametrize("k", KS + (4096 + 384,))
def test_mma_matches_reference_every_bit_width(cuda_ops, path, group_size, k):
    """Every bit-width and k (short last super-chunks) against the path's reference. 'mma' also
    equals the TC kernel to fp32 rounding (the same integer sums); 'mma_a16' (W{k}A16) is nearer the
    fp32-activation product than the int8 path (fp16 keeps 11 bits of each activation, int8 per
    group about 7)."""
    rng = np.random.default_rng([k, group_size, 31, int(path == "mma_a16")])
    n = 13 if k % 3 else 200
    max_bits = 8 if (k + group_size) % 3 else 6
    codes, qparams, planes = make_linear(rng, n, k, max_bits, group_size)
    for bits in range(2, max_bits + 1):
        m = 1 + (3 * bits + k) % 16
        x = make_x(rng, m, k)
        y = run_and_check(cuda_ops, path, codes, qparams, planes, x, bits, max_bits, group_size,
                          f"{path} n={n} k={k} G={group_size} bits={bits} m={m}")
        if path == "mma":
            tc = cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, max_bits, group_size, bits, x, path="tc")
            assert rel_err(y, tc) < 1e-5, f"bits={bits} m={m}: mma and tc differ by {rel_err(y, tc):.3g}"
        else:
            exact32, _ = reference_fp32(codes, qparams, x, bits, max_bits, group_size)
            y8 = cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, max_bits, group_size, bits, x, path="mma")
            assert rel_err(y, exact32) < rel_err(y8, exact32), f"bits={bits}: fp16 activations no nearer than int8"


def test_mma_bad_arguments(cuda_ops):
    rng = np.random.default_rng(59)
    n, k = 13, 300
    codes, qparams, planes = make_linear(rng, n, k, 4, 64)
    x = make_x(rng, 1, k)
    if cuda_ops is core:  # (the stand-in has no such query)
        assert core.bitplane_cuda_mma_supports(128) and not core.bitplane_cuda_mma_supports(64)
    with pytest.raises(core.FlexquantError, match="MMA path needs group_size 128, 256 or 512, got 64"):
        cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, 4, 64, 3, x, path="mma")
    with pytest.raises(core.FlexquantError, match="MMA path needs group_size"):
        cuda_ops.bitplane_matmul_multi_cuda([planes], [qparams], [n], k, 4, 64, [3], x, path="mma")
    with pytest.raises(core.FlexquantError, match="MMA_A16 path needs group_size 128, 256 or 512, got 64"):
        cuda_ops.bitplane_matmul_cuda(planes, qparams, n, k, 4, 64, 3, x, path="mma_a16")
    with pytest.raises(core.FlexquantError, match="path must be TC or MMA"):
        cuda_ops.bitplane_matmul_fused_cuda(planes, qparams, n, k, 4, 64, 3, x, op="rms_norm",
                                        aux=np.ones(k, np.float32), path="mma_a16")
    with pytest.raises(core.FlexquantError, match="m must be in 1..8 for this path, got 9"):
        cuda_ops.bitplane_matmul_multi_cuda([planes], [qparams], [n], k, 4, 64, [3], make_x(rng, 9, k), path="tc")
    with pytest.raises(core.FlexquantError, match="path must be TC or MMA"):
        cuda_ops.bitplane_matmul_fused_cuda(planes, qparams, n, k, 4, 64, 3, x, op="rms_norm",
                                        aux=np.ones(k, np.float32), path="fp32")


def test_stand_in_builder_rewrites_every_shared_declaration():
    """The stand-in's builder (tests/simt_ops.py) turns each __shared__ declaration into references into
    the block's static shared memory, one key per variable, every line kept in place, and refuses a
    source where a declaration it cannot read would stay a plain (unpoisoned) static."""
    from simt_ops import _rewrite_text

    src = ("template <int N> __global__ void k() {\n"
           "    __shared__ __align__(16) float a[N][4], b[2];  // two at once\n"
           "    __shared__ int count;\n"
           "}\n")
    out = _rewrite_text(src, "x.cu")
    assert out.count("\n") == src.count("\n") and "__shared__" not in out.split("//")[0]
    line = out.splitlines()[1]
    assert "float (&a)[N][4] = ::simt::static_shared<float[N][4]>(__PRETTY_FUNCTION__, " in line and ", 16);" in line
    assert "float (&b)[2] = ::simt::static_shared<float[2]>(__PRETTY_FUNCTION__, " in line
    assert "int &count = ::simt::static_shared<int>(__PRETTY_FUNCTION__, " in out.splitlines()[2]
    keys = [int(k) for k in __import__("re").findall(r"__PRETTY_FUNCTION__, (\d+)u", out)]
    assert len(keys) == 3 and len(set(keys)) == 3
    with pytest.raises(ValueError, match="x.cu: the stand-in's builder left __shared__ at lines \\[2\\]"):
        _rewrite_text("void f() {\n    __shared__ float buf[(4)];\n}\n", "x.cu")
