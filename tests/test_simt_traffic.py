"""The memory traffic of the CUDA kernels, measured without a GPU: the CPU stand-in for CUDA
(tests/cuda_host/simt) in its traffic-measuring build (traffic.cpp there: the compiler's hook at every
load and store of the kernels, no ThreadSanitizer).

A decode step's speed is bounded by the bytes it moves, and those bytes are a property of the kernels'
addresses, not of the GPU: which sectors of device memory a launch reads, how many 32-byte sectors each
warp request touches for the bytes it uses (coalescing), how many wavefronts each shared-memory request
takes (bank conflicts). Those are measured here, in CI, on the kernels' own code:

- the meter itself against patterns with known answers;
- the GEMV at every path: the planes are read whole, each sector by one request, fully coalesced;
- a whole decode step of the engine (the traffic-measuring package, tools/kernel_traffic.py): the GEMVs
  read the weights at the step's bit-width and nothing more (the engine's own count of planes and
  group params, which is the roofline's denominator in tools/bench.py), at 8, 6 and 4 bits;
- shared memory: the GEMMs' cp.async stores and ldmatrix reads, the GEMVs' split-K sums, the tiled
  and the per-token attention, the merge: conflict-free.

Time is not measured (the stand-in has no clock).
"""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexquant_rt import bitplane as bp

from conftest import host_cxx

ROOT = Path(__file__).resolve().parents[1]


def _gcc(cxx: str | None) -> bool:
    """traffic.cpp answers GCC's -fsanitize=thread hooks (clang's differ: it calls __tsan_memcpy and others)."""
    if cxx is None:
        return False
    r = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return r.returncode == 0 and ("g++" in r.stdout or "GCC" in r.stdout or "Free Software Foundation" in r.stdout) \
        and "clang" not in r.stdout


pytestmark = pytest.mark.skipif(platform.system() != "Linux" or not _gcc(host_cxx()) or shutil.which("addr2line") is None,
                                reason="the traffic-measuring build: GCC's -fsanitize=thread hooks, dladdr and addr2line, "
                                       "on Linux")


@pytest.fixture(scope="module")
def traffic_ops(tmp_path_factory):
    from simt_ops import SimtOps, build

    return SimtOps(build(host_cxx(), tmp_path_factory.mktemp("simt_traffic"), traffic=True), traffic=True)


def _linear(rng, n, k, max_bits=8, group_size=128):
    w = rng.standard_normal((n, k)).astype(np.float32)
    codes, qparams = bp.quantize(w, max_bits, group_size)
    return bp.pack_planes(codes, max_bits), qparams


def test_meter_known_answers(traffic_ops):
    """One warp, one access pattern per launch (tests/cuda_host/simt_ops.cpp, st_traffic): the sectors
    each global request touches, the wavefronts each shared request takes, and the kernel's results."""
    rc, err, out, _ = traffic_ops.selftest_files("traffic")
    assert rc == 0, err
    out = out.reshape(12, 32)
    t = np.arange(32)
    np.testing.assert_array_equal(out[0], t)
    np.testing.assert_array_equal(out[1], 8 * t)
    np.testing.assert_array_equal(out[6], 32 * t)
    np.testing.assert_array_equal(out[11], t)
    launches = traffic_ops.traffic.launches
    assert len(launches) == 12
    # the grouping's self-check: lanes that load in different iterations around a __syncwarp are
    # grouped into one request by count (a limit of the meter), and counted as grouped across it
    assert launches.pop().mixed == 16
    assert all(la.mixed == 0 for la in launches)
    # global reads: (requests, distinct bytes, sectors), from the source's array
    want_global = {0: (1, 128, 4), 1: (1, 128, 32), 2: (1, 4, 1), 3: (1, 512, 16), 4: (1, 64, 2)}
    # shared reads of the pattern (the fill loop writes conflict-free): (wavefronts, conflict-free ones)
    want_shared = {5: (1, 1), 6: (32, 1), 7: (2, 1), 8: (1, 1), 9: (4, 4), 10: (32, 4)}
    for mode, la in enumerate(launches):
        reads = [s for s in la.sites if s.space == "g" and not s.write]
        stores = [s for s in la.sites if s.space == "g" and s.write]
        assert [(s.requests, s.distinct, s.units) for s in stores] == [(1, 128, 4)], (mode, stores)  # out[32 mode + t]
        if mode in want_global:
            assert [(s.requests, s.distinct, s.units) for s in reads] == [want_global[mode]], (mode, reads)
        else:
            assert reads == [], (mode, reads)
            sh = [s for s in la.sites if s.space == "s" and not s.write]
            assert [(s.units, s.ideal) for s in sh] == [want_shared[mode]], (mode, sh)
            assert la.bank_conflict_factor([s for s in la.sites if s.space == "s" and s.write]) == 1.0
        src = [a.read_sectors for a in la.allocs.values() if a.size == 4096]  # (an allocation untouched: absent)
        assert src == ([{0: 4, 1: 32, 2: 1, 3: 16, 4: 2}[mode]] if mode in want_global else []), (mode, src)


@pytest.mark.parametrize("path,m", [("tc", 1), ("tc", 5), ("fp32", 3), ("mma", 1), ("mma", 11), ("mma_a16", 4)])
@pytest.mark.parametrize("bits", [8, 5, 3])
def test_gemv_reads_every_plane_sector_once_coalesced(traffic_ops, path, m, bits):
    """The GEMV kernel reads the planes it is given (the first `bits`: the test entry uploads no more)
    whole, each 32-byte sector by one warp request that uses all of it, and every group param; its
    shared memory (the preparation's warp maxima, the split-K partial sums) is conflict-free."""
    rng = np.random.default_rng(bits * 10 + m)
    n, k, G = 200, 1152, 128  # K: two super-chunks and a short one; n: a partial row tile
    planes, qparams = _linear(rng, n, k, group_size=G)
    x = rng.standard_normal((m, k)).astype(np.float32)
    traffic_ops.bitplane_matmul_cuda(planes, qparams, n, k, 8, G, bits, x, path=path)
    assert all(la.mixed == 0 for la in traffic_ops.traffic.launches)
    gemv = [la for la in traffic_ops.traffic.launches if la.kernel.startswith("bitplane_matmul_")]
    assert gemv, [la.kernel for la in traffic_ops.traffic.launches]
    plane_size, qp_size = bits * planes.shape[1], qparams.size * 2
    for la in traffic_ops.traffic.launches:
        bad = [(s.where, s.units, s.ideal) for s in la.sites if s.space == "s" and s.units > s.ideal]
        assert not bad, f"{la.kernel}: bank conflicts (site, wavefronts, conflict-free): {bad}"
    assert any(s.space == "s" for la in gemv for s in la.sites), "the split-K sums go through shared memory"
    for la in gemv:
        pl = [a for a in la.allocs.values() if a.size == plane_size]
        qp = [a for a in la.allocs.values() if a.size == qp_size]
        assert len(pl) == 1 and len(qp) == 1, (la.kernel, plane_size, qp_size, list(la.allocs.values()))
        pl, qp = pl[0], qp[0]
        sectors = (plane_size + 31) // 32
        assert pl.read_ranges == [(0, sectors)], (la.kernel, pl.read_ranges[:4])
        assert pl.req_sectors == sectors, f"{la.kernel}: {pl.req_sectors} sector fetches for {sectors} sectors"
        assert pl.efficiency == 1.0, (la.kernel, pl.efficiency)
        assert pl.written_sectors == 0 and qp.written_sectors == 0
        assert qp.read_ranges == [(0, (qp_size + 31) // 32)], (la.kernel, qp.read_ranges[:4])


@pytest.mark.parametrize("kind", ["a8", "a16", "b1", "a8_wg"])
def test_gemm_shared_memory_is_conflict_free(traffic_ops, kind):
    """The GEMMs' shared memory: cp.async tile stores (a lane-to-row order that spreads each 8-lane
    phase over the 32 banks: chunk_row in bitplane_matmul_gemm.cu), ldmatrix and fragment reads, the
    wgmma GEMM's epilogue: every request in its conflict-free wavefronts. (The b1 GEMM and the
    preparation kernels use none, or little.)"""
    rng = np.random.default_rng(3)
    n, k, G, m = 256, 640, 128, 70
    planes, qparams = _linear(rng, n, k, group_size=G)
    x = rng.standard_normal((m, k)).astype(np.float32)
    traffic_ops.bitplane_gemm_cuda(planes, qparams, n, k, 8, G, 6, x, kind=kind, act_bits=8 if kind == "b1" else 0)
    launches = traffic_ops.traffic.launches
    gemm = [la for la in launches if la.kernel.startswith(("gemm_kernel", "wg_gemm_kernel", "gemm_b1_kernel"))]
    assert len(gemm) == 1, [la.kernel for la in launches]
    lane_shared = [s for s in gemm[0].sites if s.space == "s" and s.ideal]
    assert bool(lane_shared) == (kind != "b1"), (kind, lane_shared[:3])
    for la in launches:
        assert la.mixed == 0, la.kernel
        bad = [(s.where, s.units, s.ideal) for s in la.sites if s.space == "s" and s.units > s.ideal]
        assert not bad, f"{la.kernel}: bank conflicts (site, wavefronts, conflict-free): {bad}"


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("prefill", [False, True])
def test_attention_traffic(traffic_ops, f16, prefill):
    """Attention: the KV rows it needs read once per launch in fully coalesced requests (the cache rows
    past the last position untouched), shared memory conflict-free (the tiled kernel's padded K tile,
    the merge)."""
    rng = np.random.default_rng(5)
    H, Hkv, d, p0 = 4, 2, 64, 100
    m = 70 if prefill else 1
    t_max = p0 + m + 30
    dt = np.float16 if f16 else np.float32
    q = rng.standard_normal((m, H, d)).astype(np.float32)
    kc = rng.standard_normal((t_max, Hkv, d)).astype(dt)
    vc = rng.standard_normal((t_max, Hkv, d)).astype(dt)
    traffic_ops.attention_cuda(q, kc, vc, p0, n_splits=1 if prefill else 3, prefill=prefill)
    row = Hkv * d * np.dtype(dt).itemsize
    used_sectors = ((p0 + m) * row + 31) // 32
    names = [la.kernel for la in traffic_ops.traffic.launches]
    assert any(k.startswith("attention_prefill" if prefill else "attention_kernel") for k in names), names
    if not prefill:
        assert any(k.startswith("attention_merge") for k in names), names
    for la in traffic_ops.traffic.launches:
        assert la.mixed == 0, la.kernel
        bad = [(s.where, s.units, s.ideal) for s in la.sites if s.space == "s" and s.units > s.ideal]
        assert not bad, f"{la.kernel}: bank conflicts {bad}"
        if la.kernel.startswith("attention_kernel") or la.kernel.startswith("attention_prefill"):
            caches = [a for a in la.allocs.values() if a.size == t_max * row]
            assert len(caches) == 2, la.allocs
            for c in caches:
                assert c.read_ranges == [(0, used_sectors)], (la.kernel, c.read_ranges)
                assert c.written_sectors == 0
            kv_sites = [s for s in la.sites if s.space == "g" and not s.write and s.distinct >= (p0 + m) * row // 2]
            assert kv_sites and all(s.efficiency == 1.0 for s in kv_sites), [(s.where, s.efficiency) for s in kv_sites]


@pytest.fixture(scope="module")
def traffic_package(tmp_path_factory):
    pytest.importorskip("pybind11", reason="pybind11 builds the stand-in's extension (pip install '.[test]')")
    sys.path.insert(0, str(ROOT / "tools"))
    import kernel_traffic

    return kernel_traffic, kernel_traffic.build(tmp_path_factory.mktemp("traffic_pkg"), host_cxx())


def test_decode_step_reads_the_k_bit_weights_once(traffic_package, tmp_path):
    """A whole decode step of the CUDA engine (a synthetic SmolLM2-135M with 2 layers, random codes):
    the GEMV kernels read, in distinct sectors of device memory, the engine's own count of weight
    bytes at the step's bit-width (planes and group params, the roofline's denominator) plus the
    activations: within 0.5%, at 8, 6 and 4 bits. So the planes past k stay unread, and the bit-plane
    store's bytes per token are what the kernels move. The plane loads are whole sectors (the GEMVs'
    largest site: efficiency 1.0), and all their requests together use >= 0.85 of the sector bytes
    they touch (measured 0.90-0.94; the shortfall is the group params' loads and the bit-width's
    broadcast). Shared memory: conflict-free, and used (the split-K sums, attention)."""
    from flexquant_rt.convert import SyntheticSource, convert

    kt, package = traffic_package
    model = tmp_path / "smollm2-2.fq"
    convert(SyntheticSource("smollm2-135m", n_layers=2, random_codes=True), model, progress=False)
    bits = [8, 6, 4]
    traffic, engine = kt.measure(package, model, bits)
    assert engine[8] > engine[6] > engine[4] > 0
    for b in bits:
        launches = traffic.after_mark(f"step {b}")
        gemv = [la for la in launches if la.kernel.startswith("bitplane_matmul_")]
        assert gemv, [la.kernel for la in launches]
        read = sum(la.dram_bytes() for la in gemv)
        assert engine[b] <= read <= engine[b] * 1.005, f"{b} bits: GEMVs read {read} bytes, engine counts {engine[b]}"
        used = sum(s.distinct for la in gemv for s in la.sites if s.space == "g")
        touched = sum(32 * s.units for la in gemv for s in la.sites if s.space == "g")
        assert used / touched >= 0.85, f"{b} bits: GEMV sector efficiency {used / touched:.3f}"
        planes = max((s for la in gemv for s in la.sites if s.space == "g"), key=lambda s: s.distinct)
        assert planes.distinct >= 0.5 * engine[b] and planes.efficiency == 1.0, (planes.where, planes.efficiency)
        assert any(s.space == "s" and s.ideal for la in launches for s in la.sites)
        for la in launches:
            assert la.mixed == 0, la.kernel
            bad = [(s.where, s.units, s.ideal) for s in la.sites if s.space == "s" and s.units > s.ideal]
            assert not bad, f"{la.kernel}: bank conflicts {bad}"
