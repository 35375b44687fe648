"""The CUDA backend of the engine (cuda/*.cu, Engine(backend="cuda")) against the CPU engine.

The CPU part (always run): the max_bits cap, which both backends share, and the fallback when
backend="cuda" is asked for where there is no GPU (CI) or no CUDA build.

The GPU part (skipped without a CUDA device): every decode op against its CPU twin on fresh random
inputs with odd sizes, the output poisoned first (the host entry points fill the device output with
NaN); then whole models. Tolerances come from a same-precision baseline: for an op, at most 2x the
error of the CPU op against an fp64 numpy evaluation (+ a few fp32 ulps); for the model on the fp32-
activation GEMV path, 1e-4 relative on the logits, as the CPU engine is held to against transformers.
The int8-activation (tensor-core) path is held to the CPU engine running the same int8 activations
(Engine.set_activation_bits(8), itself checked against transformers in test_activation_bits.py).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import flexquant_rt._core as core
from flexquant_rt import Engine, FlexquantError

from conftest import rel_err

gpu = pytest.mark.skipif(not core.cuda_available(), reason="no CUDA device (or built without CUDA)")


# ---- CPU: the bit-width cap and the fallback --------------------------------------------------------

def test_max_bits_caps_the_mask_and_matches_the_full_file(tiny_fq):
    full = Engine(tiny_fq, backend="cpu", kv_dtype="f32", cpu_activations="f32")
    capped = Engine(tiny_fq, backend="cpu", kv_dtype="f32", cpu_activations="f32", max_bits=6)
    assert full.max_bits == 8 and capped.max_bits == 6
    assert (capped.layer_bits() == 6).all() and capped.lm_head_bits == 6
    with pytest.raises(FlexquantError, match=r"= 7 is outside 2..6 \(the engine's max_bits; the file holds 8\)"):
        capped.set_layer_bits(7)
    with pytest.raises(FlexquantError, match="lm_head bits = 8 is outside 2..6"):
        capped.set_layer_bits(6, lm_head_bits=8)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 320, 12)
    for bits in (6, 4, 3):
        full.set_layer_bits(bits, lm_head_bits=bits)
        capped.set_layer_bits(bits, lm_head_bits=bits)
        np.testing.assert_array_equal(capped.forward(ids), full.forward(ids))
    for bad in (1, 9):
        with pytest.raises(FlexquantError, match=f"max_bits = {bad} is outside 2..8"):
            Engine(tiny_fq, backend="cpu", max_bits=bad)
    with pytest.raises(ValueError, match="max_bits must be an int"):
        Engine(tiny_fq, max_bits=6.5)


@pytest.mark.skipif(core.cuda_available(), reason="a CUDA device is present: the fallback does not apply")
def test_cuda_backend_without_gpu_falls_back_with_a_reason(tiny_fq):
    with pytest.warns(RuntimeWarning, match="backend CUDA: .*running on the CPU"):
        eng = Engine(tiny_fq, backend="cuda")
    assert eng.backend == "cpu" and eng._eng.device_bytes == 0
    ref = Engine(tiny_fq, backend="cpu")
    assert eng.kv_dtype == ref.kv_dtype == "f16"  # the fallback is the CPU engine, its default cache too
    assert eng.generate([1, 2, 3], max_new_tokens=8) == ref.generate([1, 2, 3], max_new_tokens=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" picks the CPU silently
        assert Engine(tiny_fq, backend="auto").backend == "cpu"


# ---- the ops: on a GPU, and on the CPU stand-in for CUDA -------------------------------------------
#
# Each op test runs twice (the `cuda_ops` fixture, tests/conftest.py): on the GPU (skipped without
# one) and on tests/cuda_host/simt (the same CUDA sources compiled as C++ for the CPU, each block's
# threads as fibers; tests/simt_ops.py), so that CI, which has no GPU, runs the index arithmetic,
# masks, bounds and shared-memory use of these kernels against the CPU ops. The stand-in does not
# model races or the device math library's ulps; the tolerances below hold for both.


@pytest.mark.parametrize("m,d", [(1, 64), (3, 576), (8, 4096), (5, 100)])
def test_rms_norm_cuda(cuda_ops, m, d):
    rng = np.random.default_rng(m * d)
    x = (rng.standard_normal((m, d)) * 3 + 0.5).astype(np.float32)
    w = rng.uniform(0.5, 1.5, d).astype(np.float32)
    ref64 = x.astype(np.float64) / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    cpu = core.ops.rms_norm(x, w, 1e-5)
    out = cuda_ops.rms_norm_cuda(x, w, 1e-5)
    assert np.isfinite(out).all()
    assert rel_err(out, ref64) <= 2 * rel_err(cpu, ref64) + 1e-7


@pytest.mark.parametrize("m,H,Hkv,d", [(1, 4, 2, 16), (7, 9, 3, 64), (8, 32, 8, 128)])
def test_rope_cuda(cuda_ops, m, H, Hkv, d):
    rng = np.random.default_rng(m + H + d)
    q = rng.standard_normal((m, H, d)).astype(np.float32)
    k = rng.standard_normal((m, Hkv, d)).astype(np.float32)
    pos = rng.integers(0, 5000, m).astype(np.int64)
    inv = core.ops.rope_inv_freq(d, 10000.0)
    qc, kc = core.ops.rope(q, k, pos, 10000.0)
    qg, kg = cuda_ops.rope_cuda(inv, q, k, pos)
    # Same fp32 angle, cos/sin from fp64: only the fp64 cos/sin of the two libraries may differ.
    assert rel_err(qg, qc) < 1e-6 and rel_err(kg, kc) < 1e-6


@pytest.mark.parametrize("n", [1, 1000, 11008 * 3 + 5])
def test_swiglu_cuda(cuda_ops, n):
    rng = np.random.default_rng(n)
    g = (rng.standard_normal(n) * 4).astype(np.float32)
    u = rng.standard_normal(n).astype(np.float32)
    g64 = g.astype(np.float64)
    ref64 = g64 / (1 + np.exp(-g64)) * u
    cpu = core.ops.swiglu(g, u)
    out = cuda_ops.swiglu_cuda(g, u)
    assert rel_err(out, ref64) <= 2 * rel_err(cpu, ref64) + 1e-7


def attention_ref64(q, kc, vc, p0):
    """Causal GQA attention of q (m, H, d) at positions p0.. in fp64, on the same (possibly
    fp16-rounded) cache values kc, vc (t_max, Hkv, d)."""
    m, H, d = q.shape
    Hkv = kc.shape[1]
    k64, v64 = kc.astype(np.float64), vc.astype(np.float64)
    ref = np.zeros((m, H, d))
    for i in range(m):
        for h in range(H):
            hk = h // (H // Hkv)
            s = k64[: p0 + i + 1, hk] @ q[i, h].astype(np.float64) / np.sqrt(d)
            p = np.exp(s - s.max())
            ref[i, h] = (p / p.sum()) @ v64[: p0 + i + 1, hk]
    return ref


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("m,p0,H,Hkv,d,splits", [(1, 0, 4, 2, 16, 1), (1, 700, 8, 2, 64, 7), (1, 2047, 32, 8, 128, 8),
                                                  (5, 33, 6, 3, 24, 1), (8, 300, 4, 4, 256, 1), (1, 5, 4, 1, 48, 16),
                                                  # d a multiple of 128: the vector loads, with spans and GQA
                                                  (3, 501, 8, 2, 128, 5), (2, 130, 4, 2, 256, 3), (1, 2, 4, 4, 128, 16),
                                                  (4, 0, 2, 1, 128, 1), (1, 77, 4, 2, 160, 2),
                                                  # more spans than the merge keeps in shared memory
                                                  (1, 200, 2, 1, 128, 70)])
def test_attention_cuda(cuda_ops, kv, m, p0, H, Hkv, d, splits):
    rng = np.random.default_rng(p0 + H + d + m)
    dt = np.float32 if kv == "f32" else np.float16
    t_max = p0 + m + 3
    q = rng.standard_normal((m, H, d)).astype(np.float32)
    kc = rng.standard_normal((t_max, Hkv, d)).astype(dt)
    vc = rng.standard_normal((t_max, Hkv, d)).astype(dt)
    cpu = core.ops.attention(q, kc, vc, p0)
    ref = attention_ref64(q, kc, vc, p0)
    out = cuda_ops.attention_cuda(q, kc, vc, p0, splits)
    assert np.isfinite(out).all()
    assert rel_err(out, ref) <= 2 * rel_err(cpu, ref) + 1e-6
    # The same sequence as the second block of a two-sequence cache (rows t_max.. of 2 t_max): the
    # per-query bases of batched decode; the first block holds other values and must not be read.
    other = rng.standard_normal((t_max, Hkv, d)).astype(dt)
    out2 = cuda_ops.attention_cuda(q, np.concatenate([other, kc]), np.concatenate([-other, vc]), p0, splits, base=t_max)
    np.testing.assert_array_equal(out2, out)


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("m,p0,H,Hkv,d", [(1, 0, 4, 2, 16), (31, 5, 4, 1, 64), (32, 0, 8, 2, 128), (33, 700, 4, 4, 128),
                                          (100, 33, 6, 3, 24), (257, 1000, 8, 2, 128), (64, 0, 2, 1, 80),
                                          (70, 130, 4, 2, 4), (45, 31, 3, 3, 36)])
def test_attention_prefill_cuda(cuda_ops, kv, m, p0, H, Hkv, d):
    """The tiled prefill kernel (one sequence's consecutive positions, 32 queries a block, K/V tiles
    of 32 positions through shared memory) against the fp64 reference, held to the per-token
    kernel's tolerance: query tiles cut at any m, key tiles at any p0, GQA, head dims down to 4 and
    up to 128, both cache types. Cache rows past the last query hold NaN: none may be read."""
    rng = np.random.default_rng([m, p0, H, d])
    dt = np.float32 if kv == "f32" else np.float16
    t_max = p0 + m + 40
    q = rng.standard_normal((m, H, d)).astype(np.float32)
    kc = rng.standard_normal((t_max, Hkv, d)).astype(dt)
    vc = rng.standard_normal((t_max, Hkv, d)).astype(dt)
    kc[p0 + m:] = np.nan
    vc[p0 + m:] = np.nan
    cpu = core.ops.attention(q, kc, vc, p0)
    ref = attention_ref64(q, kc, vc, p0)
    out = cuda_ops.attention_cuda(q, kc, vc, p0, prefill=True)
    assert np.isfinite(out).all()
    assert rel_err(out, ref) <= 2 * rel_err(cpu, ref) + 1e-6, (rel_err(out, ref), rel_err(cpu, ref))
    # the sequence as the second block of a two-sequence cache: the first block must not be read
    other = np.full((t_max, Hkv, d), np.nan, dtype=dt)
    out2 = cuda_ops.attention_cuda(q, np.concatenate([other, kc]), np.concatenate([other, vc]), p0, base=t_max,
                               prefill=True)
    np.testing.assert_array_equal(out2, out)


def test_attention_prefill_cuda_refuses_other_head_dims(cuda_ops):
    q = np.ones((40, 2, 30), np.float32)
    kc = np.ones((50, 2, 30), np.float32)
    with pytest.raises(core.FlexquantError, match="head_dim in 4..128, a multiple of 4, got 30"):
        cuda_ops.attention_cuda(q, kc, kc, 0, prefill=True)
    q, kc = np.ones((40, 2, 256), np.float32), np.ones((50, 2, 256), np.float32)
    with pytest.raises(core.FlexquantError, match="got 256"):
        cuda_ops.attention_cuda(q, kc, kc, 0, prefill=True)


@gpu
@pytest.mark.parametrize("which,kv_f16", [("tiny", False), ("wide", True)])
def test_engine_cuda_tiled_prefill_attention(tiny_fq, wide_head_fq, monkeypatch, which, kv_f16):
    """FLEXQUANT_CUDA_TILED_ATTENTION=1: prompt passes of >= 64 rows take the tiled attention kernel.
    The logits of a 150-token prompt (one pass), a 70-token chunk (a pass at n_past = 150: on the
    GEMM, and with cuda_gemm_min_rows=100 on the GEMV) and greedy steps match the per-token kernel's;
    so do those of the same prompt in the second sequence of a two-sequence engine (its cache rows
    from n_ctx on) after the first sequence took another prompt. The results are not bit for bit the
    per-token kernel's (another summation order): the tiled kernel did run."""
    path = tiny_fq if which == "tiny" else wide_head_fq
    rng = np.random.default_rng(7)
    ids, more, other = rng.integers(0, 320, 150), (rng.integers(0, 320, 70),), rng.integers(0, 320, 100)

    def run(**kw):
        return _core_steps(core.Engine(str(path), backend="cuda", n_ctx=256, kv_dtype="f16" if kv_f16 else "f32", **kw), ids, 3, more=more)

    def second_sequence():
        eng = core.Engine(str(path), backend="cuda", n_ctx=256, kv_dtype="f16" if kv_f16 else "f32", n_seq=2)
        eng.eval_seq(0, other.astype(np.int32))
        out = []
        for chunk in (ids, *more):
            eng.eval_seq(1, np.asarray(chunk, dtype=np.int32))
            out.append(np.array(eng.logits()))
        return np.stack(out)

    monkeypatch.delenv("FLEXQUANT_CUDA_TILED_ATTENTION", raising=False)
    plain = [run(), run(cuda_gemm_min_rows=100), second_sequence()]
    monkeypatch.setenv("FLEXQUANT_CUDA_TILED_ATTENTION", "1")
    tiled = [run(), run(cuda_gemm_min_rows=100), second_sequence()]
    # The reference: the CPU engine with the same int8 activations. An fp32 difference in attention
    # (another summation order) can move an int8 activation across a rounding boundary downstream,
    # so tiled and plain differ by about the int8 path's own distance from the CPU engine (1.2-1.4%
    # on the wide model, measured on the CPU stand-in for CUDA): the tiled kernel may be no farther
    # from the reference than the per-token kernel is, with a margin.
    cpu = core.Engine(str(path), backend="cpu", n_ctx=256, kv_dtype="f16" if kv_f16 else "f32", cpu_activations="f32")
    cpu.set_activation_bits(np.array([8], dtype=np.int32))
    ref = _core_steps(cpu, ids, 3, more=more)
    # the greedy steps read the same tokens on both sides (else the step rows compare other inputs)
    for b in plain[:2]:
        np.testing.assert_array_equal(ref[1:-1].argmax(-1), b[1:-1].argmax(-1))
    for a, b in zip(tiled, plain):
        r = ref[: len(a)]  # (the second sequence: the prompt and the chunk, no steps)
        assert np.isfinite(a).all()
        assert rel_err(a, r) <= 1.25 * rel_err(b, r) + 2e-3, (rel_err(a, r), rel_err(b, r))
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
        assert not np.array_equal(a, b)


@pytest.mark.parametrize("vocab", [1, 320, 1025, 49152, 128256])
def test_entropy_and_top1_cuda(cuda_ops, vocab):
    rng = np.random.default_rng(vocab)
    lg = (rng.standard_normal(vocab) * 3).astype(np.float32)
    if vocab > 10:
        lg[vocab // 3] = lg.max() + 2  # a clear winner, and a tie after it: the first index wins
        lg[vocab // 2] = lg[vocab // 3]
    ent, top1 = core.ops.entropy_and_top1(lg)
    e, t, a = cuda_ops.entropy_and_top1_cuda(lg)
    assert a == int(np.argmax(lg))
    assert abs(e - ent) <= 1e-5 * max(1.0, abs(ent)) and abs(t - top1) <= 1e-6


def test_entropy_and_top1_cuda_nan_and_ties(cuda_ops):
    """NaN counts as -inf (all NaN: argmax 0, as the CPU op); a tie of the max between two threads'
    elements (indices 5000 and 3000 + 1024 k) and within one thread's elements: the first index wins."""
    lg = np.full(40000, -1.0, dtype=np.float32)
    lg[[3000 + 1024 * 7, 5000, 3000 + 1024 * 20]] = 4.0
    lg[[7, 900]] = np.nan
    ent, top1 = core.ops.entropy_and_top1(lg)
    e, t, a = cuda_ops.entropy_and_top1_cuda(lg)
    assert a == 5000 and abs(e - ent) <= 1e-5 * max(1.0, abs(ent)) and abs(t - top1) <= 1e-6
    lg[5000] = -1.0  # now the max sits only at two indices of one thread: the first of them wins
    e, t, a = cuda_ops.entropy_and_top1_cuda(lg)
    assert a == 3000 + 1024 * 7
    e, t, a = cuda_ops.entropy_and_top1_cuda(np.full(3000, np.nan, dtype=np.float32))
    assert a == 0


# The stand-in's own checks: kernels that break a rule on purpose must be stopped (a GPU would hang or
# pair the wrong lanes) or read the poison, else the stand-in's passes would mean less.

@pytest.mark.parametrize("name,message", [
    ("deadlock", "simt: deadlock in block (0, 0, 0): 32 threads wait forever"),
    ("mixed_collectives", "is at __ballot_sync while lane 0 is at __shfl_xor_sync"),
    ("partial_mma", "an .aligned mma with 16 live lanes (needs 32)"),
    ("wgmma_partial", "wgmma.fence: a .sync.aligned warpgroup instruction that threads of warpgroup 0 returned"),
    ("wgmma_touched", "plain code changed the accumulators of a wgmma in flight"),
    ("wgmma_smem_changed", "shared memory a wgmma in flight reads changed between its issue and its wait"),
    ("setmaxnreg_over", "simt: deadlock in block (0, 0, 0): 128 threads wait forever"),
    ("mbar_short", "simt: deadlock in block (0, 0, 0): 128 threads wait forever"),
])
def test_stand_in_stops_a_kernel_that_breaks_a_rule(simt_ops, name, message):
    rc, err, out = simt_ops.selftest(name)
    assert rc == 3 and message in err and out is None, (rc, err)


def test_stand_in_poisons_shared_memory_and_lands_cp_async_at_its_wait(simt_ops):
    rc, err, out = simt_ops.selftest("shared_poison")
    assert rc == 0, err
    np.testing.assert_array_equal(out[:32], 1.0)  # block 0 reads what it wrote
    assert np.isnan(out[32:]).all()  # block 1 wrote nothing: not block 0's values, the poison
    rc, err, out = simt_ops.selftest("cp_async")
    assert rc == 0, err
    assert np.isnan(out[:32]).all()  # read before cp.async.wait_group: not landed
    np.testing.assert_array_equal(out[32:], np.arange(32) * 4.0)  # after it: the source


def test_stand_in_wgmma_and_tma_give_the_matrix_product(simt_ops):
    """The stand-in's model of sm_90 (hopper.h) on its own: TMA boxes with the 128-byte swizzle (one
    reaching past its matrix: zeros there), read by four wgmma m64n128k32 steps through descriptors
    built from the ISA's fields, give A · Bᵀ in the ISA's accumulator layout, every element written
    (the first step overwrites what the registers held); a TMA destination read before its barrier's
    wait holds the poison, after it the data."""
    rc, err, out, f = simt_ops.selftest_files("wgmma")
    assert rc == 0, err
    a = np.zeros((64, 128), np.int64)
    a[:50] = f["a"].reshape(50, 128)
    b = f["b"].reshape(128, 128).astype(np.int64)
    np.testing.assert_array_equal(f["d"].reshape(64, 128), a @ b.T)
    rc, err, out, f = simt_ops.selftest_files("tma_early")
    assert rc == 0, err
    assert out[0] == -1.0 and out[1] == f["b"][0] == -128  # (0xff: the poison; B's first byte)


# The engine's launchers that have no host test entry point on the GPU (the whole-model GPU tests
# cover them there): on the stand-in only.

@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("H,Hkv,d", [(4, 2, 16), (9, 3, 64), (8, 2, 128)])
def test_rope_kv_store_on_the_stand_in(simt_ops, kv, H, Hkv, d):
    """rope_kv_store_launch (the decode step's RoPE fused with the KV-cache write): q and k rotated as
    the CPU op rotates them; row r's rotated k and its v land in cache row bases[r] + positions[r]
    (rounded to fp16 for an fp16 cache), and every other cache byte keeps its poison."""
    rng = np.random.default_rng([H, d, kv == "f16"])
    m, n_ctx = 5, 40
    dt = np.float32 if kv == "f32" else np.float16
    q = rng.standard_normal((m, H, d)).astype(np.float32)
    k = rng.standard_normal((m, Hkv, d)).astype(np.float32)
    v = rng.standard_normal((m, Hkv, d)).astype(np.float32)
    pos = rng.integers(0, n_ctx, m).astype(np.int64)
    bases = np.arange(m, dtype=np.int64) * n_ctx  # a batched step: one sequence per row
    kc = np.full((m * n_ctx, Hkv, d), np.nan, dtype=dt)
    vc = np.full((m * n_ctx, Hkv, d), np.nan, dtype=dt)
    inv = core.ops.rope_inv_freq(d, 10000.0)
    qr, kr, kc2, vc2 = simt_ops.rope_kv_store(inv, q, k, v, pos, bases, kc, vc)
    qc, kcpu = core.ops.rope(q, k, pos, 10000.0)
    assert rel_err(qr, qc) < 1e-6 and rel_err(kr, kcpu) < 1e-6
    rows = bases + pos
    np.testing.assert_array_equal(kc2[rows], kr.astype(dt))
    np.testing.assert_array_equal(vc2[rows], v.astype(dt))
    untouched = np.setdiff1d(np.arange(m * n_ctx), rows)
    assert np.isnan(kc2[untouched]).all() and np.isnan(vc2[untouched]).all()


@pytest.mark.parametrize("rows,vocab", [(3, 1025), (2, 49152)])
def test_step_signals_of_several_rows_on_the_stand_in(simt_ops, rows, vocab):
    """entropy_and_top1_launch over a batched step's rows (a block per row): each row's signals are
    the CPU op's of that row alone."""
    rng = np.random.default_rng([rows, vocab])
    lg = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    lg[1, vocab // 2] = np.nan
    out = simt_ops.step_signals(lg)
    for r in range(rows):
        ent, top1 = core.ops.entropy_and_top1(lg[r])
        assert out["argmax"][r] == int(np.nanargmax(lg[r]))
        assert abs(out["entropy"][r] - ent) <= 1e-5 * max(1.0, abs(ent)) and abs(out["top1"][r] - top1) <= 1e-6


# ---- GPU: whole models -------------------------------------------------------------------------------

def _steps(eng, ids, n_steps, masks=None):
    """Prefill `ids`, then n_steps greedy decode steps; the mask of step i is masks[i] (if given).
    Returns the logits of every step (n_steps + 1, vocab)."""
    out = [eng.forward(ids)[-1]]
    for i in range(n_steps):
        if masks is not None:
            eng.set_layer_bits(masks[i][0], lm_head_bits=masks[i][1])
        out.append(eng.decode(int(np.argmax(out[-1]))))
    return np.stack(out)


@gpu
@pytest.mark.parametrize("bits", [8, 6, 4, 3])
def test_engine_cuda_fp32_path_matches_cpu(tiny_fq, bits):
    cpu = Engine(tiny_fq, backend="cpu", kv_dtype="f32", cpu_activations="f32")
    gpu_eng = Engine(tiny_fq, backend="cuda")
    gpu_eng._eng = core.Engine(str(tiny_fq), backend="cuda", cuda_fp32_matmul=True)
    assert gpu_eng.backend == "cuda" and gpu_eng._eng.device_bytes > 0
    ids = np.random.default_rng(bits).integers(0, 320, 13)  # 13: a prompt of two slices (8 + 5)
    for e in (cpu, gpu_eng):
        e.set_layer_bits(bits, lm_head_bits=bits)
    np.testing.assert_allclose(gpu_eng.forward(ids), cpu.forward(ids), rtol=0, atol=1e-4 * np.abs(cpu.forward(ids)).max())
    a, b = _steps(gpu_eng, ids, 12), _steps(cpu, ids, 12)
    assert np.isfinite(a).all()
    assert rel_err(a, b) < 1e-4


@gpu
def test_engine_cuda_tc_path_matches_cpu_with_int8_activations(tiny_fq):
    """The default GEMV path quantizes activations to int8 per weight group: the CPU engine does the
    same with set_activation_bits(8) (tested against transformers in test_activation_bits.py), so
    the two must agree up to fp32 rounding and the rare rounding-boundary flip it causes (one flip
    moves the later positions by up to ~1e-2 on this tiny model through the KV cache: the budget
    of the CPU against transformers there)."""
    cpu = Engine(tiny_fq, backend="cpu", kv_dtype="f32", cpu_activations="f32")
    cpu.set_activation_bits(8)
    tc = Engine(tiny_fq, backend="cuda")
    ids = np.random.default_rng(1).integers(0, 320, 20)
    a, b = _steps(tc, ids, 16), _steps(cpu, ids, 16)
    assert rel_err(a, b) < 1e-2
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


@gpu
def test_engine_cuda_activation_bits_per_linear(tiny_fq):
    """On the GPU each linear runs int8 activations (8, the TC GEMV, the default) or fp32 (0, the
    fp32 GEMV): a mix matches the CPU engine running the same mix (int8 tolerance, as the TC test
    above), through forward() (8-row passes) and through eval() (one 70-row pass: the TC linears on
    the GEMM at cuda_gemm_min_rows=16, the fp32 ones kept off it); all fp32 is bit for bit the engine
    opened with cuda_fp32_matmul; widths other than 0, 8 and 16 are refused, changing nothing."""
    mix = np.full((2, 7), 8, dtype=np.int32)
    mix[1] = 0
    mix[0, 2] = 0  # one linear of the fused q/k/v launch on the other path
    ids = np.random.default_rng(2).integers(0, 320, 70)
    cpu = Engine(tiny_fq, backend="cpu", kv_dtype="f32", cpu_activations="f32")
    cpu.set_activation_bits(mix, lm_head_bits=0)
    gpu_eng = Engine(tiny_fq, backend="cuda", cuda_gemm_min_rows=16)
    assert (np.asarray(gpu_eng._eng.activation_bits) == 8).all()
    gpu_eng.set_activation_bits(mix, lm_head_bits=0)
    assert list(gpu_eng._eng.activation_bits) == list(np.append(mix.reshape(-1), 0))
    a, b = _steps(gpu_eng, ids, 12), _steps(cpu, ids, 12)
    assert rel_err(a, b) < 1e-2
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
    for e in (gpu_eng, cpu):  # the prompt as one pass (the GEMM for the int8 linears)
        e.reset()
        e._eng.eval(ids.astype(np.int32))
    assert rel_err(gpu_eng._eng.logits(), cpu._eng.logits()) < 1e-2
    with pytest.raises(FlexquantError, match=r"activation bits\[0\] \(layer 0, q\) = 6: the CUDA backend runs 8 .* or 0"):
        gpu_eng.set_activation_bits(6)
    assert list(gpu_eng._eng.activation_bits) == list(np.append(mix.reshape(-1), 0))
    fp32 = Engine(tiny_fq, backend="cuda", cuda_gemm_min_rows=16)
    fp32.set_activation_bits(0)
    ref = Engine(tiny_fq, backend="cuda")
    ref._eng = core.Engine(str(tiny_fq), backend="cuda", cuda_fp32_matmul=True)
    np.testing.assert_array_equal(_steps(fp32, ids, 6), _steps(ref, ids, 6))
    with pytest.raises(FlexquantError, match="cannot take int8 activations .*cuda_fp32_matmul"):
        ref.set_activation_bits(8)


@gpu
@pytest.mark.parametrize("which", ["tiny", "wide_head"])
def test_engine_cuda_fp16_activations_match_cpu(tiny_fq, wide_head_fq, which):
    """16 = fp16 activations on the f16 tensor cores (MMA_A16 GEMV, up to 16 rows a launch; the A16
    GEMM for prompt passes): all-fp16 matches the CPU engine's fp16 emulation to fp16 rounding of
    the activations (a value computed a little differently upstream may round to the neighbouring
    half), through decode steps (the graph) and one long pass; a mix of 16, 8 and 0 matches the CPU
    running that mix within the int8 tolerance."""
    path = tiny_fq if which == "tiny" else wide_head_fq
    ids = np.random.default_rng(5).integers(0, 320, 70)
    cpu = Engine(path, backend="cpu", kv_dtype="f32", cpu_activations="f32")
    gpu_eng = Engine(path, backend="cuda", cuda_gemm_min_rows=16)
    for e in (cpu, gpu_eng):
        e.set_activation_bits(16)
    assert (np.asarray(gpu_eng._eng.activation_bits) == 16).all()
    a, b = _steps(gpu_eng, ids, 12), _steps(cpu, ids, 12)
    assert np.isfinite(a).all()
    assert rel_err(a, b) < 1e-3
    fp32 = Engine(path, backend="cuda", cuda_gemm_min_rows=16)
    fp32.set_activation_bits(0)
    assert rel_err(a, _steps(fp32, ids, 12)) > 1e-5  # really fp16 (~1e-4 off fp32), not the fp32 GEMV
    for e in (gpu_eng, cpu):  # one 70-row pass: the A16 GEMM
        e.reset()
        e._eng.eval(ids.astype(np.int32))
    assert rel_err(gpu_eng._eng.logits(), cpu._eng.logits()) < 1e-3
    # a mix within q/k/v and gate/up: passes of 70 rows (GEMM A8 and A16 side by side), 12 rows (the
    # GEMV: 16-row fp16 launches beside 8-row int8 slices of one prepared input), then steps
    mix = np.full((2, 7), 16, dtype=np.int32)
    mix[0, 1] = 8
    mix[1, 4:] = 0
    mix[1, 5] = 8
    for e in (cpu, gpu_eng):
        e.set_activation_bits(mix, lm_head_bits=8)
    assert list(gpu_eng._eng.activation_bits) == list(np.append(mix.reshape(-1), 8))
    for n in (70, 12):
        for e in (gpu_eng, cpu):
            e.reset()
            e._eng.eval(ids[:n].astype(np.int32))
        assert rel_err(gpu_eng._eng.logits(), cpu._eng.logits()) < 1e-2, n
    a, b = _steps(gpu_eng, ids, 12), _steps(cpu, ids, 12)
    assert rel_err(a, b) < 1e-2
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


@gpu
def test_engine_cuda_fp16_activations_need_groups_of_128(tmp_path):
    from conftest import make_hf_llama
    from flexquant_rt.convert import HFSource, convert

    convert(HFSource(make_hf_llama(tmp_path / "hf")), tmp_path / "g64.fq", progress=False, group_size=64,
            method="plain")
    eng = Engine(tmp_path / "g64.fq", backend="cuda")
    with pytest.raises(FlexquantError, match="linear 0 cannot take fp16 activations \\(group size 64 is not one of 128"):
        eng.set_activation_bits(16)
    assert (np.asarray(eng._eng.activation_bits) == 8).all()


@gpu
def test_calibrate_on_the_gpu(tiny_fq):
    """calibrate() on a CUDA engine (tools/bench.py's controller row calibrates there on the fly):
    without the CPU-only input-energy statistics, int8 activation costs against fp32 ones, the
    engine's int8 default given back; widths other than 8 and 16 are refused before any pass."""
    from flexquant_rt.controller import calibrate

    rng = np.random.default_rng(6)
    chunks = [rng.integers(0, 320, 24).tolist() for _ in range(2)]
    eng = Engine(tiny_fq, backend="cuda")
    prof = calibrate(eng, chunks, levels=(4,), progress=False, activation_levels=(8,))
    assert "e_mean" not in prof.extra
    act_kl = np.asarray(prof.extra["act_kl"])
    assert act_kl.shape == (3, 1) and (act_kl > 0).all()
    assert (np.asarray(eng._eng.activation_bits) == 8).all()
    with pytest.raises(ValueError, match="a CUDA engine runs int8"):
        calibrate(eng, chunks, levels=(4,), progress=False, activation_levels=(8, 6))


@gpu
def test_mask_switching_equals_fresh_run_with_that_history(tiny_fq):
    """Per-token masks through the captured graph equal an uncaptured run with the same history,
    bit for bit, and the CPU engine within the fp32 tolerance."""
    rng = np.random.default_rng(5)
    masks = [(rng.integers(2, 9, (2, 7)).astype(np.int32), int(rng.integers(2, 9))) for _ in range(10)]
    ids = rng.integers(0, 320, 9)
    graph = Engine(tiny_fq, backend="cuda")
    graph._eng = core.Engine(str(tiny_fq), backend="cuda", cuda_fp32_matmul=True, cuda_graph=True)
    plain = Engine(tiny_fq, backend="cuda")
    plain._eng = core.Engine(str(tiny_fq), backend="cuda", cuda_fp32_matmul=True, cuda_graph=False)
    cpu = Engine(tiny_fq, backend="cpu", kv_dtype="f32", cpu_activations="f32")
    a = _steps(graph, ids, 10, masks)
    b = _steps(plain, ids, 10, masks)
    c = _steps(cpu, ids, 10, masks)
    np.testing.assert_array_equal(a, b)
    assert rel_err(a, c) < 1e-4


@gpu
def test_max_bits_uploads_fewer_planes(tiny_fq):
    e8 = core.Engine(str(tiny_fq), backend="cuda")
    e6 = core.Engine(str(tiny_fq), backend="cuda", max_bits=6)
    # 2 planes of every linear stay on the host: what a step at 8 bits reads beyond one at 6
    # (each buffer is padded to 256 bytes, so allow that much per linear)
    two_planes = e8.model.bytes_per_token(8) - e8.model.bytes_per_token(6)
    n_lin = 2 * 7 + 1
    assert abs((e8.device_bytes - e6.device_bytes) - two_planes) <= 256 * n_lin
    with pytest.raises(FlexquantError, match="outside 2..6"):
        e6.set_layer_bits(np.full(2, 7, dtype=np.int32))


@gpu
def test_cuda_backend_refuses_cpu_only_features(tiny_fq):
    eng = Engine(tiny_fq, backend="cuda")
    with pytest.raises(FlexquantError, match="CPU backend only"):
        eng._eng.collect_input_energy(True)


@gpu
def test_engine_cuda_smollm2_shape(tmp_path):
    """SmolLM2-135M's shapes (K = 576 and 1536: short last super-chunks; 9 heads of 64, 3 KV heads;
    a 49152 vocab) with synthetic weights, GPU (fp32 path) against CPU."""
    from flexquant_rt.convert import SyntheticSource, convert

    path = tmp_path / "smol.fq"
    convert(SyntheticSource("smollm2-135m", seed=3), path, progress=False)
    cpu = Engine(path, backend="cpu", kv_dtype="f32", cpu_activations="f32", n_ctx=256)
    gpu_eng = Engine(path, backend="cpu", kv_dtype="f32", cpu_activations="f32", n_ctx=256)
    gpu_eng._eng = core.Engine(str(path), n_ctx=256, backend="cuda", cuda_fp32_matmul=True)
    ids = np.random.default_rng(0).integers(0, 49152, 40)
    for bits in (8, 5):
        for e in (cpu, gpu_eng):
            e.set_layer_bits(bits, lm_head_bits=bits)
        assert rel_err(_steps(gpu_eng, ids, 6), _steps(cpu, ids, 6)) < 1e-4


# ---- the tensor-core GEMM in the prefill (issue 6) ----------------------------------------------------

def _core_steps(eng, ids, n_steps, masks=None, more=()):
    """Through the C++ engine directly: prefill `ids` keeping only the last logits (so that the
    prompt goes through in passes as long as the engine allows, not the 8-row passes that all-row
    logits need), then each chunk of `more` the same way, then n_steps greedy steps. Returns the
    logits after the prompt, after each chunk and after each step, stacked."""
    eng.reset()
    out = [eng.forward(np.asarray(ids, dtype=np.int32), False)[-1]]
    for chunk in more:
        out.append(eng.forward(np.asarray(chunk, dtype=np.int32), False)[-1])
    for i in range(n_steps):
        if masks is not None:
            eng.set_layer_bits(masks[i][0])
            eng.set_lm_head_bits(masks[i][1])
        out.append(eng.forward(np.asarray([int(np.argmax(out[-1]))], dtype=np.int32), False)[-1])
    return np.stack(out)


def test_gemm_min_rows_is_checked(tiny_fq):
    with pytest.raises(FlexquantError, match="cuda_gemm_min_rows = -1 must be >= 0"):
        core.Engine(str(tiny_fq), cuda_gemm_min_rows=-1)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=f"cuda_gemm_min_rows must be an int >= 0, got {bad!r}"):
            Engine(tiny_fq, backend="cpu", cuda_gemm_min_rows=bad)


def test_mma_min_rows_is_checked(tiny_fq):
    for bad in (-1, 17):
        with pytest.raises(FlexquantError, match=f"cuda_mma_min_rows = {bad} must be in 0..16"):
            core.Engine(str(tiny_fq), cuda_mma_min_rows=bad)
    for bad in (-1, 17, 2.5, True):
        with pytest.raises(ValueError, match=f"cuda_mma_min_rows must be an int in 0..16, got {bad!r}"):
            Engine(tiny_fq, backend="cpu", cuda_mma_min_rows=bad)
    Engine(tiny_fq, backend="cpu", cuda_mma_min_rows=2).close()  # ignored on the CPU


@gpu
@pytest.mark.parametrize("which", ["tiny", "wide_head"])
def test_engine_cuda_mma_gemv_matches_the_tc_gemv(tiny_fq, wide_head_fq, which):
    """cuda_mma_min_rows=1: every GEMV launch (prompt passes of 8 rows, the graph's one-token steps,
    batched steps) on the s8 tensor-core kernel. Same int8 activations and integer sums as the
    default binary-tensor-core kernel: the logits agree up to fp32 rounding and the rare int8
    rounding flip it causes; with the graph and without, bit for bit; per-token masks followed."""
    path = tiny_fq if which == "tiny" else wide_head_fq
    rng = np.random.default_rng(17)
    masks = [(rng.integers(2, 9, (2, 7)).astype(np.int32), int(rng.integers(2, 9))) for _ in range(8)]
    ids = rng.integers(0, 320, 21)
    mma = core.Engine(str(path), backend="cuda", n_ctx=128, cuda_gemm_min_rows=0, cuda_mma_min_rows=1)
    mma_plain = core.Engine(str(path), backend="cuda", n_ctx=128, cuda_gemm_min_rows=0, cuda_mma_min_rows=1,
                            cuda_graph=False)
    tc = core.Engine(str(path), backend="cuda", n_ctx=128, cuda_gemm_min_rows=0)
    a = _core_steps(mma, ids, 8, masks)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, _core_steps(mma_plain, ids, 8, masks))
    b = _core_steps(tc, ids, 8, masks)
    assert rel_err(a, b) < 1e-2
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
    # batched steps of 1..20 rows: one MMA launch takes up to 16 (the LM head too), the TC one 8
    prompts = [np.random.default_rng(200 + s).integers(0, 320, 2 + s) for s in range(20)]
    sched = [list(range(20)), [7, 3], list(range(12)), list(range(19, 2, -1)), [5]]
    batch_mma = core.Engine(str(path), backend="cuda", n_ctx=64, n_seq=20, cuda_gemm_min_rows=0, cuda_mma_min_rows=2)
    batch_tc = core.Engine(str(path), backend="cuda", n_ctx=64, n_seq=20, cuda_gemm_min_rows=0)
    for (la, _, _), (lb, _, _) in zip(_batch_run(batch_mma, prompts, sched), _batch_run(batch_tc, prompts, sched)):
        assert np.isfinite(la).all()
        assert rel_err(la, lb) < 1e-2


@gpu
def test_engine_cuda_gemm_prefill_matches_the_gemv_and_cpu(tiny_fq):
    """A 150-token prompt: one 150-row pass on the tensor-core GEMM (default) against 19 passes of
    8 rows on the GEMV (cuda_gemm_min_rows=0) and the CPU engine with int8 activations; then 30
    and 70 more tokens (under 64: GEMV passes of 8 and 6 rows; 70: the GEMM again). All three
    compute with the same int8 activations, so they agree up to fp32 rounding and the rare
    rounding-boundary flip it causes (see test_engine_cuda_tc_path_matches_cpu_with_int8_activations)."""
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 320, 150)
    more = (rng.integers(0, 320, 30), rng.integers(0, 320, 70))
    gemm = core.Engine(str(tiny_fq), backend="cuda", n_ctx=256)
    gemv = core.Engine(str(tiny_fq), backend="cuda", n_ctx=256, cuda_gemm_min_rows=0)
    cpu = Engine(tiny_fq, backend="cpu", kv_dtype="f32", cpu_activations="f32", n_ctx=256)
    cpu.set_activation_bits(8)
    assert gemm.backend == "cuda" and gemv.backend == "cuda"
    a, b = _core_steps(gemm, ids, 4, more=more), _core_steps(gemv, ids, 4, more=more)
    c = _core_steps(cpu._eng, ids, 4, more=more)
    assert np.isfinite(a).all()
    for other in (b, c):
        assert rel_err(a, other) < 1e-2
        assert (a.argmax(-1) == other.argmax(-1)).mean() >= 0.9


@gpu
def test_engine_cuda_wgmma_gemm_matches_the_a8_gemm(tiny_fq, monkeypatch):
    """FLEXQUANT_CUDA_WGMMA=1 moves the int8 GEMM (prompt passes of >= cuda_gemm_min_rows rows) to the
    wgmma kernel on a Hopper GPU: the same arithmetic as the mma.sync GEMM, so the logits of a
    150-token prompt, a 70-token chunk and greedy steps under changing masks agree (to fp32 rounding
    in the GEMM; downstream, as the GEMM/GEMV test allows)."""
    groups = {int(d["group_size"]) for d in Engine(tiny_fq, backend="cpu")._linear_shapes()}
    if not all(core.bitplane_gemm_wgmma_supported(g) for g in groups):
        pytest.skip(f"the wgmma GEMM does not run here at group sizes {sorted(groups)}")
    rng = np.random.default_rng(5)
    ids, more = rng.integers(0, 320, 150), (rng.integers(0, 320, 70),)
    masks = [(rng.integers(2, 9, (2, 7)).astype(np.int32), int(rng.integers(2, 9))) for _ in range(4)]
    monkeypatch.delenv("FLEXQUANT_CUDA_WGMMA", raising=False)
    a = _core_steps(core.Engine(str(tiny_fq), backend="cuda", n_ctx=256), ids, 4, masks, more)
    monkeypatch.setenv("FLEXQUANT_CUDA_WGMMA", "1")
    b = _core_steps(core.Engine(str(tiny_fq), backend="cuda", n_ctx=256), ids, 4, masks, more)
    assert np.isfinite(b).all()  # (bounds as the GEMM/GEMV test: an fp32 difference can move an int8
    assert rel_err(b, a) < 1e-2, rel_err(b, a)  # activation across a rounding boundary downstream)
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


@gpu
def test_engine_cuda_gemm_on_every_pass_follows_masks(tiny_fq):
    """cuda_gemm_min_rows=1: every pass, the one-token steps of the CUDA graph included, runs on the
    GEMM, whose k comes from device memory: per-token masks equal a run without the graph bit for bit,
    and the GEMV engine within the int8 tolerance."""
    rng = np.random.default_rng(7)
    masks = [(rng.integers(2, 9, (2, 7)).astype(np.int32), int(rng.integers(2, 9))) for _ in range(8)]
    ids = rng.integers(0, 320, 70)
    graph = core.Engine(str(tiny_fq), backend="cuda", n_ctx=128, cuda_gemm_min_rows=1)
    plain = core.Engine(str(tiny_fq), backend="cuda", n_ctx=128, cuda_gemm_min_rows=1, cuda_graph=False)
    gemv = core.Engine(str(tiny_fq), backend="cuda", n_ctx=128, cuda_gemm_min_rows=0)
    a = _core_steps(graph, ids, 8, masks)
    np.testing.assert_array_equal(a, _core_steps(plain, ids, 8, masks))
    b = _core_steps(gemv, ids, 8, masks)
    assert rel_err(a, b) < 1e-2


@gpu
def test_engine_cuda_graph_follows_a_table_that_differs_by_bit_width(tiny_fq):
    """A hand-made table may put the one-token step on the GEMM at some bit-widths only: the
    captured step is captured again whenever a mask changes that choice, so under random per-linear
    masks the graph's steps equal plain launches bit for bit (a stale capture would run the other
    kernel on some linears: the same numbers only to fp32 rounding)."""
    shapes = {(int(d["n"]), int(d["k"])) for d in Engine(tiny_fq, backend="cpu")._linear_shapes()[:-1]}
    table = [dict(n=n, k=k, bits=b, decode_max_m=0 if b <= 4 else 1000) for n, k in shapes for b in range(2, 9)]
    rng = np.random.default_rng(23)
    masks = [(rng.integers(2, 9, (2, 7)).astype(np.int32), int(rng.integers(2, 9))) for _ in range(8)]
    ids = rng.integers(0, 320, 40)
    graph = core.Engine(str(tiny_fq), backend="cuda", n_ctx=128)
    plain = core.Engine(str(tiny_fq), backend="cuda", n_ctx=128, cuda_graph=False)
    for e in (graph, plain):
        e.set_kernel_table(table)
    np.testing.assert_array_equal(_core_steps(graph, ids, 8, masks), _core_steps(plain, ids, 8, masks))


# ---- several sequences on the GPU: batched decode (issue 6) ---------------------------------------------

def _batch_run(eng, prompts, schedule, seed=0):
    """eval_seq each prompt into its sequence, then one decode_batch per entry of `schedule` (lists
    of sequences, in that row order), feeding random tokens. Returns [(logits, entropy, top1)]."""
    rng = np.random.default_rng(seed)
    for s in range(eng.n_seq):
        eng.reset_seq(s)
    for s, ids in enumerate(prompts):
        eng.eval_seq(s, np.asarray(ids, dtype=np.int32))
    out = []
    for seqs in schedule:
        toks = rng.integers(0, 320, len(seqs)).astype(np.int32)
        out.append(eng.decode_batch(np.asarray(seqs, dtype=np.int32), toks))
    return out


_PROMPTS = [np.random.default_rng(s).integers(0, 320, n) for s, n in enumerate((5, 12, 2, 30, 9, 17))]
_SCHEDULE = [[0, 1, 2, 3, 4, 5], [3, 1], [5], [2, 0, 4], [1, 2, 3, 4, 5, 0], [4, 5, 0, 1]]


@gpu
def test_engine_cuda_decode_batch_matches_cpu(tiny_fq):
    """Six sequences of different lengths on the GPU (fp32-activation GEMV: the accuracy reference),
    stepped in changing subsets and orders, against the CPU engine's decode_batch: logits within
    1e-4 (the fp32 tolerance of the single-sequence test), entropy and top-1 too."""
    gpu_eng = core.Engine(str(tiny_fq), backend="cuda", n_ctx=64, n_seq=6, cuda_fp32_matmul=True)
    cpu = core.Engine(str(tiny_fq), backend="cpu", kv_dtype="f32", n_ctx=64, n_seq=6, cpu_activations="f32")
    assert gpu_eng.backend == "cuda" and gpu_eng.backend_note == ""
    a, b = _batch_run(gpu_eng, _PROMPTS, _SCHEDULE), _batch_run(cpu, _PROMPTS, _SCHEDULE)
    for (la, ea, ta), (lb, eb, tb) in zip(a, b):
        assert np.isfinite(la).all()
        assert rel_err(la, lb) < 1e-4
        np.testing.assert_allclose(ea, eb, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(ta, tb, rtol=1e-3, atol=1e-5)
    assert [gpu_eng.n_past_seq(s) for s in range(6)] == [cpu.n_past_seq(s) for s in range(6)]


@gpu
def test_engine_cuda_batch_rows_equal_solo_steps(tiny_fq):
    """A row of a GPU batch equals the same step of that sequence alone on the GPU (the default int8
    path: every row's arithmetic is its own), and a 20-sequence batch on the GEMM
    (cuda_gemm_min_rows=16) agrees with the GEMV within the int8 tolerance."""
    prompts = [np.random.default_rng(100 + s).integers(0, 320, 3 + s) for s in range(20)]
    batch = core.Engine(str(tiny_fq), backend="cuda", n_ctx=64, n_seq=20, cuda_gemm_min_rows=16)
    gemv = core.Engine(str(tiny_fq), backend="cuda", n_ctx=64, n_seq=20, cuda_gemm_min_rows=0)
    solo = core.Engine(str(tiny_fq), backend="cuda", n_ctx=64)
    sched = [list(range(20)), [7, 3], list(range(19, -1, -1))]
    a, b = _batch_run(batch, prompts, sched, seed=3), _batch_run(gemv, prompts, sched, seed=3)
    for (la, _, _), (lb, _, _) in zip(a, b):
        assert rel_err(la, lb) < 1e-2
        assert (la.argmax(-1) == lb.argmax(-1)).mean() >= 0.9
    # row 1 of the 2-row step (sequence 3) against sequence 3 alone, same history
    rng = np.random.default_rng(3)
    first = rng.integers(0, 320, 20).astype(np.int32)
    second = rng.integers(0, 320, 2).astype(np.int32)
    solo.reset()
    solo.forward(np.asarray(prompts[3], dtype=np.int32), False)
    solo.forward(first[3:4], False)
    ref = solo.forward(second[1:2], False)[-1]
    assert rel_err(b[1][0][1], ref) < 1e-5


@pytest.fixture(scope="module")
def wide_head_fq(tmp_path_factory):
    """A tiny model with head_dim 128 (the real models' width), where attention takes its vector loads."""
    from conftest import make_hf_llama
    from flexquant_rt.convert import HFSource, convert

    d = tmp_path_factory.mktemp("wide_head")
    src = make_hf_llama(d / "hf", seed=11, hidden=256, heads=2, kv_heads=1, head_dim=128, ffn=512, vocab=320)
    convert(HFSource(src), d / "m.fq", progress=False, method="plain")
    return d / "m.fq"


@gpu
@pytest.mark.parametrize("kv_f16", [False, True])
def test_engine_cuda_head_dim_128_matches_cpu(wide_head_fq, kv_f16):
    """head_dim 128 (the vector-load attention) with an fp32 or fp16 cache (the fused RoPE + cache
    write stores it), over two attention spans (n_ctx 256), against the CPU engine with the same
    cache type: fp32-activation GEMV, 1e-4 as the other whole-model tests."""
    cpu = Engine(wide_head_fq, backend="cpu", n_ctx=256, kv_dtype="f16" if kv_f16 else "f32", cpu_activations="f32")
    gpu_eng = Engine(wide_head_fq, backend="cuda")
    gpu_eng._eng = core.Engine(str(wide_head_fq), n_ctx=256, kv_dtype="f16" if kv_f16 else "f32", backend="cuda", cuda_fp32_matmul=True)
    ids = np.random.default_rng(4).integers(0, 320, 200)
    a, b = _steps(gpu_eng, ids, 20), _steps(cpu, ids, 20)
    assert np.isfinite(a).all()
    assert rel_err(a, b) < 1e-4


@gpu
def test_pdl_launches_give_the_same_bits(tiny_fq, wide_head_fq, monkeypatch):
    """FLEXQUANT_CUDA_PDL=1 (programmatic dependent launch, sm_90+) changes when the kernels start,
    not what they compute: prompts on the GEMV and the GEMM, graph-replayed steps under changing
    masks, and batched steps give the same bits as plain launches."""
    rng = np.random.default_rng(9)
    masks = [(rng.integers(2, 9, (2, 7)).astype(np.int32), int(rng.integers(2, 9))) for _ in range(12)]

    def run(path, **kw):
        eng = Engine(path, backend="cuda")
        eng._eng = core.Engine(str(path), backend="cuda", n_ctx=128, **kw)
        ids = np.random.default_rng(1).integers(0, 320, 70)
        return _steps(eng, ids, 12, masks)

    def batch(path):
        eng = core.Engine(str(path), backend="cuda", n_ctx=64, n_seq=6, cuda_gemm_min_rows=4)
        return np.concatenate([r[0] for r in _batch_run(eng, _PROMPTS, _SCHEDULE)])

    cases = [(tiny_fq, {}), (tiny_fq, {"cuda_gemm_min_rows": 16}), (tiny_fq, {"cuda_fp32_matmul": True}),
             (wide_head_fq, {"kv_dtype": "f16"})]
    monkeypatch.delenv("FLEXQUANT_CUDA_PDL", raising=False)
    plain = [run(p, **kw) for p, kw in cases] + [batch(tiny_fq)]
    monkeypatch.setenv("FLEXQUANT_CUDA_PDL", "1")
    pdl = [run(p, **kw) for p, kw in cases] + [batch(tiny_fq)]
    for a, b in zip(pdl, plain):
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)


@gpu
def test_kv_q8_is_refused_on_cuda(tiny_fq):
    """The q8 KV cache is the CPU's: asked for on the CUDA backend, a clear error (no fallback that
    would quietly run elsewhere), and the explicit CUDA caches still open."""
    with pytest.raises(FlexquantError, match="kv_dtype q8: the CUDA backend has no int8 KV cache"):
        core.Engine(str(tiny_fq), backend="cuda", kv_dtype="q8")
    with pytest.raises(ValueError, match="kv_dtype q8: the CUDA backend has no int8 KV cache"):
        Engine(tiny_fq, backend="cuda", kv_dtype="q8")
    for kv in ("f16", "f32"):
        with Engine(tiny_fq, backend="cuda", kv_dtype=kv) as eng:
            assert (eng.backend, eng.kv_dtype) == ("cuda", kv)


@gpu
def test_generate_batch_on_cuda_equals_generate(tiny_fq):
    with Engine(tiny_fq, backend="cuda", n_seq=3) as eng, Engine(tiny_fq, backend="cuda") as one:
        assert eng.backend == "cuda"
        prompts = [[1, 2, 3], [7, 8, 9, 10, 11], [42], [5, 6]]
        got = eng.generate_batch(prompts, max_new_tokens=10)
        assert got == [one.generate(p, max_new_tokens=10) for p in prompts]


# ---- the measured dispatcher on the GPU (issue 6) ----------------------------------------------------

@gpu
def test_cuda_tune_kernels_measures_applies_and_saves(tiny_fq, tmp_path, monkeypatch):
    """tune_kernels on CUDA times the GEMV against the GEMM for every layer-linear shape and
    bit-width, applies the table (the GEMV for at least 8 rows), saves it under a GPU key and a new
    engine loads it; tables that force either kernel give the same logits within the int8 tolerance."""
    monkeypatch.setenv("FLEXQUANT_RT_CACHE", str(tmp_path))
    ids = np.random.default_rng(11).integers(0, 320, 120)
    with Engine(tiny_fq, backend="cuda", n_ctx=256, kernel_table=None) as eng:
        table = eng.tune_kernels(max_m=64, repeats=1)
        shapes = {(int(d["n"]), int(d["k"])) for d in eng._linear_shapes()[:-1]}
        assert {(d["n"], d["k"]) for d in table} == shapes
        assert sorted({d["bits"] for d in table}) == list(range(2, 9))
        assert all(8 <= d["decode_max_m"] <= 64 for d in table)
        assert eng.kernel_table() == table
    with Engine(tiny_fq, backend="cuda", n_ctx=256) as again, \
            Engine(tiny_fq, backend="cuda", n_ctx=256, cuda_gemm_min_rows=32) as explicit:
        assert again.kernel_table() == table
        assert explicit.kernel_table() == []  # an explicit threshold is not overridden by the saved table
    logits = {}
    for name, rows in (("gemm", 8), ("gemv", 10_000)):
        forced = [dict(n=n, k=k, bits=b, decode_max_m=rows) for n, k in shapes for b in range(2, 9)]
        with Engine(tiny_fq, backend="cuda", n_ctx=256, kernel_table=forced) as e:
            logits[name] = _core_steps(e._eng, ids, 4)
    assert rel_err(logits["gemm"], logits["gemv"]) < 1e-2
    assert (logits["gemm"].argmax(-1) == logits["gemv"].argmax(-1)).mean() >= 0.8


def _wgmma_runs(fq) -> bool:
    groups = {int(d["group_size"]) for d in Engine(fq, backend="cpu")._linear_shapes()}
    return all(core.bitplane_gemm_wgmma_supported(g) for g in groups)


@gpu
def test_cuda_tune_kernels_chooses_among_checked_kernels(tiny_fq, tmp_path, monkeypatch):
    """tune_kernels on CUDA also picks the GEMV kernel (TC, or MMA from mma_min_rows rows) and the
    int8 GEMM (a8, or a8_wg where it runs) per shape, among the kernels that agree with the reference
    GEMV here (none is left out on a correct build); a table forcing each choice gives the logits of
    the default kernels within the int8 tolerance, under changing masks."""
    monkeypatch.setenv("FLEXQUANT_RT_CACHE", str(tmp_path))
    wg = _wgmma_runs(tiny_fq)
    with Engine(tiny_fq, backend="cuda", n_ctx=256, kernel_table=None) as eng:
        table = eng.tune_kernels(max_m=64, repeats=1, save=False)
        shapes = {(int(d["n"]), int(d["k"])) for d in eng._linear_shapes()[:-1]}
    for d in table:
        assert d["act_bits"] == 8 and d["rejected"] == "", d
        assert 0 <= d["mma_min_rows"] <= 16
        assert d["gemm"] in (("a8", "a8_wg") if wg else ("a8",)), d
    rng = np.random.default_rng(12)
    # (the prompt and the chunk of 40 on the GEMM, the chunk of 6 and the steps on the GEMV)
    ids, more = rng.integers(0, 320, 120), (rng.integers(0, 320, 40), rng.integers(0, 320, 6))
    masks = [(rng.integers(2, 9, (2, 7)).astype(np.int32), int(rng.integers(2, 9))) for _ in range(4)]
    forced = {}
    for name, gemm, mma in (("default", "a8", 0), ("mma", "a8", 1), ("wgmma", "a8_wg", 0)):
        t = [dict(n=n, k=k, bits=b, decode_max_m=8, act_bits=8, mma_min_rows=mma, gemm=gemm, rejected="")
             for n, k in shapes for b in range(2, 9)]
        if gemm == "a8_wg" and not wg:
            with pytest.raises(FlexquantError, match=r"gemm 'a8_wg' cannot run linear \d+"):
                Engine(tiny_fq, backend="cuda", n_ctx=256, kernel_table=t)
            continue
        with Engine(tiny_fq, backend="cuda", n_ctx=256, kernel_table=t) as e:
            assert e.kernel_table() == t
            forced[name] = _core_steps(e._eng, ids, 4, masks, more)
    for name, got in forced.items():
        assert np.isfinite(got).all(), name
        assert rel_err(got, forced["default"]) < 1e-2, (name, rel_err(got, forced["default"]))
        assert (got.argmax(-1) == forced["default"].argmax(-1)).mean() >= 0.8, name


@gpu
def test_cuda_tune_leaves_out_a_kernel_that_disagrees(tiny_fq, monkeypatch):
    """The correctness check before the timings: with one output element of a kernel corrupted
    (FLEXQUANT_CUDA_TUNE_FAULT, the test hook) tune_kernels never chooses that kernel and names it,
    with the error, in every entry's `rejected`."""
    wg = _wgmma_runs(tiny_fq)
    monkeypatch.setenv("FLEXQUANT_CUDA_TUNE_FAULT", "a8")
    with Engine(tiny_fq, backend="cuda", n_ctx=256, kernel_table=None) as eng:
        with pytest.warns(RuntimeWarning, match="left out kernels .* a8: row error"):
            table = eng.tune_kernels(max_m=32, repeats=1, save=False)
        for d in table:
            assert "a8: row error" in d["rejected"], d
            if wg:
                assert d["gemm"] == "a8_wg", d
            else:  # no GEMM left: every pass on the GEMV
                assert d["gemm"] == "" and d["decode_max_m"] >= 4096, d
        assert eng.kernel_table() == table
    monkeypatch.setenv("FLEXQUANT_CUDA_TUNE_FAULT", "mma")
    with Engine(tiny_fq, backend="cuda", n_ctx=256, kernel_table=None) as eng:
        with pytest.warns(RuntimeWarning, match="mma: row error"):
            table = eng.tune_kernels(max_m=32, repeats=1, save=False)
        for d in table:
            assert d["mma_min_rows"] == 0 and "mma: row error" in d["rejected"], d
            assert d["gemm"] in ("a8", "a8_wg")


@pytest.mark.skipif(not core.built_with_cuda(), reason="built without CUDA")
def test_fused_and_accumulating_entry_points_check_their_arguments():
    """The bindings' argument checks run before any device work, so they hold without a GPU too."""
    from flexquant_rt import bitplane as bp

    rng = np.random.default_rng(0)
    n, k, g = 16, 128, 64
    codes, qp = bp.quantize(rng.standard_normal((n, k)).astype(np.float32), 8, g)
    planes = bp.pack_planes(codes, 8)
    x = rng.standard_normal((2, k)).astype(np.float32)
    with pytest.raises(ValueError, match="op: expected 'rms_norm' or 'swiglu', got 'gelu'"):
        core.bitplane_matmul_fused_cuda(planes, qp, n, k, 8, g, 4, x, op="gelu", aux=np.ones(k, np.float32))
    with pytest.raises(ValueError, match=r"aux: .*\(128,\)"):
        core.bitplane_matmul_fused_cuda(planes, qp, n, k, 8, g, 4, x, op="rms_norm", aux=np.ones(k + 1, np.float32))
    with pytest.raises(ValueError, match=r"aux: .*\(2, 128\)"):
        core.bitplane_matmul_fused_cuda(planes, qp, n, k, 8, g, 4, x, op="swiglu", aux=np.ones(k, np.float32))
    # the one-launch GEMV over several linears
    with pytest.raises(ValueError, match="one entry per linear, got 2, 2, 2, 1"):
        core.bitplane_matmul_multi_cuda([planes] * 2, [qp] * 2, [n, n], k, 8, g, [4], x)
    with pytest.raises(FlexquantError, match="count must be in 1..3, got 4"):
        core.bitplane_matmul_multi_cuda([planes] * 4, [qp] * 4, [n] * 4, k, 8, g, [4] * 4, x)
    with pytest.raises(FlexquantError, match=r"bitplane_matmul_multi_cuda \(linear 1\): bits must be in 2..8, got 1"):
        core.bitplane_matmul_multi_cuda([planes] * 2, [qp] * 2, [n, n], k, 8, g, [4, 1], x)
    with pytest.raises(TypeError, match=r"planes\[1\], qparams\[1\]: expected numpy arrays"):
        core.bitplane_matmul_multi_cuda([planes, [[0]]], [qp] * 2, [n, n], k, 8, g, [4, 4], x)
    with pytest.raises(FlexquantError, match="prefetch must be -1 \\(default\\), 0 or 1, got 2"):
        core.bitplane_matmul_cuda(planes, qp, n, k, 8, g, 4, x, prefetch=2)
    with pytest.raises(FlexquantError, match="m must be in 1..8 for this path, got 9"):
        core.bitplane_matmul_multi_cuda([planes], [qp], [n], k, 8, g, [4], np.ones((9, k), np.float32))
    for call in (core.bitplane_matmul_cuda, core.bitplane_gemm_cuda):
        with pytest.raises(ValueError, match=r"y0: expected shape \(2, 16\), got \(16,\)"):
            call(planes, qp, n, k, 8, g, 4, x, y0=np.zeros(n, np.float32))
        with pytest.raises(TypeError, match="y0: expected dtype float32, got float64"):
            call(planes, qp, n, k, 8, g, 4, x, y0=np.zeros((2, n)))
