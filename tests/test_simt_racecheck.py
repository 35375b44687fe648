"""Race detection for the CUDA kernels without a GPU: the CPU stand-in for CUDA (tests/cuda_host/simt)
built with ThreadSanitizer.

Each thread of a block is a fiber; ThreadSanitizer sees each fiber as a thread of its own, the
switches between them order nothing, and the stand-in declares the orderings CUDA gives
(__syncthreads, __syncwarp, mbarrier arrive -> wait, a bulk copy's issue -> completion -> the waits on
its barrier, the launch -> the threads -> the host; cuda_runtime.h there). So two accesses to shared or
global memory by different threads of a block, at least one a write, that no such ordering separates
are reported, whatever order the fibers happened to run in: what compute-sanitizer's racecheck
reports on a GPU, in CI. Shuffles, ballots, mma and ldmatrix order no memory (CUDA's memory model), so
a kernel that relies on them to publish shared memory is reported too.

Every kernel family runs once here on small shapes that still take each code path (spans and the
merge, GQA, partial tiles, pipelines of several stages, the wgmma producer/consumer pipeline), and
must give the plain stand-in's result bit for bit, with no report. Blocks run one after the other
(ordered), so races between blocks of a launch are out of reach; so are the memory-model questions
a GPU's weaker ordering raises (the stand-in's fences are no-ops).
"""
from __future__ import annotations

import platform
import subprocess

import numpy as np
import pytest

from flexquant_rt import bitplane as bp

from conftest import host_cxx

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"),
                                reason="the race-checking build: ThreadSanitizer's fiber API on Linux x86-64")


def _tsan_works(cxx: str, tmp) -> bool:
    """Whether this compiler's ThreadSanitizer builds and runs a program here (some Linux kernels'
    mmap/ASLR layouts defeat it)."""
    src = tmp / "t.cpp"
    src.write_text("#include <sanitizer/tsan_interface.h>\nint main() { __tsan_destroy_fiber(__tsan_create_fiber(0)); }\n")
    exe = tmp / "t"
    if subprocess.run([cxx, "-fsanitize=thread", str(src), "-o", str(exe)], capture_output=True).returncode:
        return False
    return subprocess.run([str(exe)], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def race_ops(tmp_path_factory):
    from simt_ops import SimtOps, build

    cxx = host_cxx()
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA stand-in")
    out = tmp_path_factory.mktemp("simt_race")
    if not _tsan_works(cxx, out):
        pytest.skip(f"{cxx} has no working ThreadSanitizer (-fsanitize=thread) here")
    return SimtOps(build(cxx, out, race_check=True), race_check=True)


def test_race_check_reports_races_and_only_races(race_ops):
    """A kernel that reads another thread's shared-memory write with no __syncthreads between, one
    that relies on a shuffle to publish shared memory within a warp, and one that reads a bulk copy's
    destination before waiting on its barrier (the copy may land any time until then) are reported
    (with the line of the racing access); the same exchanges ordered by __syncthreads, __syncwarp and
    atomics are not."""
    from simt_ops import RaceReport

    rc, err, out, _ = race_ops.selftest_files("race_free")
    assert rc == 0, err
    assert out[0] == 1.0 and out[33] == 64.0  # (thread 0's write seen; 64 atomic increments)
    np.testing.assert_array_equal(out[1:33], (np.arange(32) + 1) % 32)
    for name in ("race_block", "race_warp", "race_copy"):
        with pytest.raises(RaceReport, match=r"(?s)WARNING: ThreadSanitizer: data race.*st_race.*simt_ops\.cpp:\d+"):
            race_ops.selftest_files(name)


def test_race_check_of_the_sm90_model(race_ops):
    """The wgmma self-test (TMA through an mbarrier, then wgmma from shared memory) has no race: the
    barrier orders the copies before the threads that wait on it."""
    rc, err, out, f = race_ops.selftest_files("wgmma")
    assert rc == 0, err
    a = np.zeros((64, 128), np.int64)
    a[:50] = f["a"].reshape(50, 128)
    np.testing.assert_array_equal(f["d"].reshape(64, 128), a @ f["b"].reshape(128, 128).astype(np.int64).T)


def _linear(rng, n, k, max_bits, group_size):
    w = rng.standard_normal((n, k)) * rng.uniform(0.01, 0.1, (n, 1)) + rng.uniform(-0.05, 0.05, (n, 1))
    codes, qparams = bp.quantize(w.astype(np.float32), max_bits, group_size)
    return bp.pack_planes(codes, max_bits), qparams


def _cases():
    """(name, call(ops, rng) -> array or tuple of arrays): one run of every kernel family."""
    def attention(m, p0, H, Hkv, d, splits, kv, prefill=False):
        def run(ops, rng):
            dt = np.float16 if kv == "f16" else np.float32
            t_max = p0 + m + 3
            q = rng.standard_normal((m, H, d)).astype(np.float32)
            kc = rng.standard_normal((t_max, Hkv, d)).astype(dt)
            vc = rng.standard_normal((t_max, Hkv, d)).astype(dt)
            return ops.attention_cuda(q, kc, vc, p0, splits, prefill=prefill)
        return run

    def gemv(path, m, n, k, g, bits, warps=0, prefetch=-1):
        def run(ops, rng):
            planes, qp = _linear(rng, n, k, 8, g)
            x = rng.standard_normal((m, k)).astype(np.float32)
            return ops.bitplane_matmul_cuda(planes, qp, n, k, 8, g, bits, x, path=path, warps=warps, prefetch=prefetch)
        return run

    def fused(op, m, n, k, path):
        def run(ops, rng):
            planes, qp = _linear(rng, n, k, 8, 128)
            x = rng.standard_normal((m, k)).astype(np.float32)
            aux = (1.0 + 0.1 * rng.standard_normal(k) if op == "rms_norm" else rng.standard_normal((m, k))).astype(np.float32)
            return ops.bitplane_matmul_fused_cuda(planes, qp, n, k, 8, 128, 6, x, op=op, aux=aux, path=path)
        return run

    def multi(path, m):
        def run(ops, rng):
            lins = [_linear(rng, n, 512, 8, 128) for n in (40, 24)]
            x = rng.standard_normal((m, 512)).astype(np.float32)
            return tuple(ops.bitplane_matmul_multi_cuda([p for p, _ in lins], [q for _, q in lins], [40, 24], 512, 8, 128,
                                                        [7, 4], x, path=path))
        return run

    def gemm(kind, m, n, k, g, act_bits=0):
        def run(ops, rng):
            planes, qp = _linear(rng, n, k, 8, g)
            x = rng.standard_normal((m, k)).astype(np.float32)
            return ops.bitplane_gemm_cuda(planes, qp, n, k, 8, g, 6, x, kind=kind, act_bits=act_bits)
        return run

    def simple(fn):
        return fn

    return [
        ("rms_norm", simple(lambda ops, rng: ops.rms_norm_cuda(rng.standard_normal((3, 300)).astype(np.float32),
                                                               rng.standard_normal(300).astype(np.float32), 1e-5))),
        ("rope", simple(lambda ops, rng: ops.rope_cuda(
            (1.0 / 10000 ** (np.arange(32) / 32)).astype(np.float32), rng.standard_normal((3, 4, 64)).astype(np.float32),
            rng.standard_normal((3, 2, 64)).astype(np.float32), np.array([0, 5, 9])))),
        ("rope_kv_store", simple(lambda ops, rng: ops.rope_kv_store(
            (1.0 / 10000 ** (np.arange(32) / 32)).astype(np.float32), rng.standard_normal((3, 4, 64)).astype(np.float32),
            rng.standard_normal((3, 2, 64)).astype(np.float32), rng.standard_normal((3, 2, 64)).astype(np.float32),
            np.array([0, 5, 9]), np.array([0, 0, 16]), np.zeros((32, 2, 64), np.float16), np.zeros((32, 2, 64), np.float16)))),
        ("swiglu", simple(lambda ops, rng: ops.swiglu_cuda(rng.standard_normal(1000).astype(np.float32),
                                                           rng.standard_normal(1000).astype(np.float32)))),
        ("step_signals", simple(lambda ops, rng: ops.step_signals(rng.standard_normal((3, 5000)).astype(np.float32)))),
        ("attention_spans_f16", attention(1, 300, 8, 2, 128, 5, "f16")),
        ("attention_merge_f32", attention(2, 200, 4, 1, 64, 70, "f32")),
        ("attention_prefill", attention(40, 33, 4, 2, 64, 1, "f16", prefill=True)),
        ("gemv_tc", gemv("tc", 3, 40, 1000, 128, 6, warps=4)),
        ("gemv_tc_prefetch", gemv("tc", 1, 24, 4096, 128, 5, prefetch=1)),
        ("gemv_fp32", gemv("fp32", 2, 24, 600, 64, 5)),
        ("gemv_mma", gemv("mma", 9, 40, 1000, 128, 7)),
        ("gemv_mma_a16", gemv("mma_a16", 16, 24, 512, 128, 4)),
        ("fused_rms_norm", fused("rms_norm", 1, 24, 512, "tc")),
        ("fused_swiglu", fused("swiglu", 2, 24, 512, "tc")),
        ("multi_tc", multi("tc", 2)),
        ("multi_mma", multi("mma", 9)),
        ("gemm_a8", gemm("a8", 20, 40, 600, 128)),
        ("gemm_a16", gemm("a16", 20, 40, 600, 64)),
        ("gemm_b1", gemm("b1", 20, 24, 600, 128, act_bits=6)),
        ("gemm_a8_wg", gemm("a8_wg", 130, 40, 1000, 128)),
    ]


CASES = _cases()


@pytest.mark.parametrize("name,run", CASES, ids=[c[0] for c in CASES])
def test_kernel_has_no_race(race_ops, simt_ops, name, run):
    """The kernel under ThreadSanitizer: no report, and the plain stand-in's result bit for bit."""
    seed = sum(map(ord, name))
    got = run(race_ops, np.random.default_rng(seed))  # (a race raises RaceReport with the report)
    want = run(simt_ops, np.random.default_rng(seed))
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        np.testing.assert_array_equal(g, w)
