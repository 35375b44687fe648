"""The tiling and fp32 steps of the wgmma GEMM (A8_WG, cuda/bitplane_wgmma.cuh), checked on the CPU:
tests/cuda_host/wgmma_layout.cpp emulates every block, warp, lane and accumulator register of a launch
with the header's own helpers (the 128-byte swizzle TMA writes, the stage -> group map, the group
ends, the accumulator fragment, the fp32 step of a stage) and the wgmma read through its descriptor as the
PTX ISA describes it. It must give W_k · x̂ = Σ_g a_s·s_k·Σ x̃·ĉ + a_z·z_k. Runs without a GPU (a C++
compiler suffices), so CI checks the index arithmetic that the GPU tests (tests/test_cuda_ops.py,
kind 'a8_wg') check end to end on a Hopper GPU.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from conftest import build_host_emulator, host_cxx

pytestmark = pytest.mark.skipif(host_cxx() is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return build_host_emulator(tmp_path_factory.mktemp("wgmma"), "wgmma_layout")


def _run(emulator, tmp_path, codes, q, aparams, wterms, group_size):
    n, k = codes.shape
    m = q.shape[0]
    (tmp_path / "meta.txt").write_text(f"{n} {k} {group_size} {m}\n")
    codes.astype(np.int8).tofile(tmp_path / "codes.bin")
    q.astype(np.int8).tofile(tmp_path / "q.bin")
    aparams.astype(np.float32).tofile(tmp_path / "aparams.bin")
    wterms.astype(np.float32).tofile(tmp_path / "wterms.bin")
    subprocess.run([str(emulator), str(tmp_path)], check=True)
    y = np.fromfile(tmp_path / "y.bin", dtype=np.float32).reshape(m, n)
    flushes = np.loadtxt(tmp_path / "flushes.txt", dtype=np.int64, ndmin=1).reshape(-1, 2)
    return y, flushes


def _groups(a, group_size):
    k = a.shape[-1]
    ng = -(-k // group_size)
    out = np.zeros(a.shape[:-1] + (ng * group_size,), dtype=np.int64)
    out[..., :k] = a
    return out.reshape(a.shape[:-1] + (ng, group_size))


@pytest.mark.parametrize("n,k,group_size,m", [(7, 600, 128, 1), (130, 1000, 128, 130), (129, 1536, 256, 3),
                                              (40, 640, 384, 129), (131, 4096 + 384, 512, 17), (300, 256, 128, 257)])
def test_emulated_launch_gives_w_times_x(emulator, tmp_path, n, k, group_size, m):
    """Random int8 codes and activations over their whole range (the extremes included), random group
    terms; K padding, a short last group, partial row and column tiles. The result is W_k · x̂ to fp32
    rounding, and every thread takes one fp32 step per 128-column stage and adds each group's zero
    term once."""
    rng = np.random.default_rng([n, k, group_size, m])
    n_groups = -(-k // group_size)
    codes = rng.integers(-128, 128, (n, k))
    codes[:, :3] = (-128, 127, -128)
    q = rng.integers(-127, 128, (m, k))
    q[:, :3] = (-127, 127, 127)
    a_s = rng.uniform(0.01, 0.1, (m, n_groups))
    a_z = a_s * _groups(q, group_size).sum(-1)
    aparams = np.stack([a_s, a_z], -1).astype(np.float32)
    wterms = np.stack([rng.uniform(1e-3, 1e-2, (n, n_groups)), rng.uniform(-0.5, 0.5, (n, n_groups))], -1).astype(np.float32)
    y, flushes = _run(emulator, tmp_path, codes, q, aparams, wterms, group_size)

    sums = np.einsum("rgi,cgi->rcg", _groups(q, group_size), _groups(codes, group_size))  # exact int64
    ap, wt = aparams.astype(np.float64), wterms.astype(np.float64)
    want = (ap[:, None, :, 0] * wt[None, :, :, 0] * sums + ap[:, None, :, 1] * wt[None, :, :, 1]).sum(-1)
    err = np.abs(y - want).max() / np.abs(want).max()
    assert err < 1e-5, err

    assert (flushes[:, 0] == -(-k // 128)).all() and (flushes[:, 1] == n_groups).all()


def test_one_code_lands_on_its_output(emulator, tmp_path):
    """One nonzero code and one nonzero activation at a time, in several rows, columns and K bytes
    (both halves of a 16-byte swizzle chunk, every 32-byte step): exactly one output moves, by
    exactly a_s · s_k · x̃ · ĉ."""
    n, k, m, group_size = 200, 512, 140, 128
    aparams = np.zeros((m, k // group_size, 2), np.float32)
    aparams[..., 0] = 1.0
    wterms = np.zeros((n, k // group_size, 2), np.float32)
    wterms[..., 0] = 1.0
    for r, c, i in ((0, 0, 0), (139, 199, 511), (63, 64, 37), (64, 127, 200), (77, 130, 301), (8, 9, 100)):
        codes = np.zeros((n, k), np.int64)
        q = np.zeros((m, k), np.int64)
        codes[c, i] = 5
        q[r, i] = -3
        y, _ = _run(emulator, tmp_path, codes, q, aparams, wterms, group_size)
        want = np.zeros((m, n), np.float32)
        want[r, c] = -15.0
        np.testing.assert_array_equal(y, want, err_msg=f"row {r} column {c} K {i}")
