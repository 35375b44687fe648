"""The data layout of the s8 tensor-core GEMV (the MMA path, cuda/bitplane_mma.cuh), checked on the
CPU: tests/cuda_host/mma_layout.cpp emulates every lane of a launch with the header's own helpers
(plane words -> int8 codes, the activations' K order, the epilogue) and the mma computed from the
fragment registers as the PTX ISA lays them out. It must give the exact integer group sums
Σ q · ĉ8 and, through the epilogue, W_k · x̂. Runs without a GPU (a C++ compiler suffices), so CI
checks the index arithmetic that the GPU tests (tests/test_cuda_ops.py, path 'mma') check end to end.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from flexquant_rt import bitplane as bp

from conftest import build_host_emulator, host_cxx

pytestmark = pytest.mark.skipif(host_cxx() is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return build_host_emulator(tmp_path_factory.mktemp("mma"), "mma_layout")


def test_transposition_helpers_alone(emulator, tmp_path):
    """One word of every plane, bits set one at a time: each lands in the code byte of its column."""
    n, k, g, max_bits = 8, 128, 128, 8
    for bit in (0, 7, 13, 31):
        for plane in (0, 3, 7):
            codes = np.zeros((n, k), dtype=np.uint8)
            codes[5, 32 * 2 + bit] = 1 << (max_bits - 1 - plane)  # row 5 -> lane 4·5 + 2
            i8 = _run(emulator, tmp_path, codes, max_bits, g, max_bits, m=1, q=np.ones((1, k), np.int8))[0]
            want = (codes.astype(np.int64) - 128).sum(-1)  # ĉ8 = c − 128 at 8 bits, q = 1
            np.testing.assert_array_equal(i8[0, :, 0], want)


def _run(emulator, tmp_path, codes, max_bits, group_size, bits, m, q=None, rng=None):
    n, k = codes.shape
    n_groups = -(-k // group_size)
    planes = bp.pack_planes(codes, max_bits)[:bits]
    if q is None:
        q = rng.integers(-127, 128, size=(m, k)).astype(np.int8)
    sm = np.stack([rng.uniform(0.001, 0.01, (n, n_groups)), rng.uniform(-0.5, 0.5, (n, n_groups))], -1) \
        if rng is not None else np.ones((n, n_groups, 2))
    sm = sm.astype(np.float16).astype(np.float32)
    qs = np.zeros((m, n_groups * group_size), dtype=np.int64)
    qs[:, :k] = q
    qsum = qs.reshape(m, n_groups, group_size).sum(-1)
    a_s = (rng.uniform(0.01, 0.1, (m, n_groups)) if rng is not None else np.ones((m, n_groups))).astype(np.float32)
    ap = np.stack([a_s, (a_s * qsum).astype(np.float32)], -1).astype(np.float32)
    (tmp_path / "meta.txt").write_text(f"{n} {k} {group_size} {max_bits} {bits} {m}\n")
    np.ascontiguousarray(planes).tofile(tmp_path / "planes.bin")
    np.ascontiguousarray(q).tofile(tmp_path / "q.bin")
    np.ascontiguousarray(sm).tofile(tmp_path / "sm.bin")
    np.ascontiguousarray(ap).tofile(tmp_path / "aparams.bin")
    subprocess.run([str(emulator), str(tmp_path)], check=True)
    i8 = np.fromfile(tmp_path / "sums.bin", dtype=np.float64).reshape(m, n, n_groups)
    y = np.fromfile(tmp_path / "y.bin", dtype=np.float32).reshape(m, n)
    return i8, y, sm, ap, qs


@pytest.mark.parametrize("n,k,group_size", [(13, 300, 128), (20, 1536, 256), (9, 4096 + 384, 512), (16, 640, 128)])
@pytest.mark.parametrize("m", [1, 3, 8, 11, 16])
def test_emulated_warp_gives_the_exact_group_sums(emulator, tmp_path, n, k, group_size, m):
    rng = np.random.default_rng([n, k, group_size, m])
    max_bits = 8 if (k + m) % 2 else 7
    codes = rng.integers(0, 1 << max_bits, size=(n, k)).astype(np.uint8)
    for bits in range(2, max_bits + 1):
        i8, y, sm, ap, qs = _run(emulator, tmp_path, codes, max_bits, group_size, bits, m, rng=rng)
        n_groups = i8.shape[-1]
        ck = np.zeros((n, n_groups * group_size), dtype=np.int64)
        ck[:, :k] = codes.astype(np.int64) >> (max_bits - bits)
        c8 = (ck - (1 << (bits - 1))) << (8 - bits)
        c8[:, k:] = 0  # padding columns meet q = 0; their codes never matter
        want = np.einsum("ngi,rgi->rng", c8.reshape(n, n_groups, group_size),
                         qs.reshape(m, n_groups, group_size))
        np.testing.assert_array_equal(i8, want, err_msg=f"bits={bits}")
        # the epilogue: y = Σ_g s_k a_s Σ c_k q + m_k a_z, in fp64 from the same inputs
        s, mn = sm[..., 0].astype(np.float64), sm[..., 1].astype(np.float64)
        s_k = s * 2.0 ** (max_bits - bits)
        m_k = mn + s * (2.0 ** (max_bits - bits) - 1) / 2
        dots = np.einsum("ngi,rgi->rng", ck.reshape(n, n_groups, group_size), qs.reshape(m, n_groups, group_size))
        exact = (dots * s_k[None] * ap[:, None, :, 0] + m_k[None] * ap[:, None, :, 1]).sum(-1)
        err = np.abs(y - exact).max() / np.abs(exact).max()
        assert err < 1e-5, (bits, err)


@pytest.mark.parametrize("n,k,group_size", [(13, 300, 128), (20, 1536, 256), (9, 4096 + 384, 512)])
@pytest.mark.parametrize("m", [1, 8, 11, 16])
def test_emulated_f16_warp_gives_the_group_sums(emulator, tmp_path, n, k, group_size, m):
    """The f16 kernel (W{k}A16): codes through codes_to_half2_biased and the bias, fp16 activations
    in xa16's order, the m16n8k16 fragments. Group sums in float64 equal Σ ĉ8 · fp16(x) (each product
    and these sums exact in float64), and the epilogue gives W_k · fp16(x)."""
    rng = np.random.default_rng([n, k, group_size, m, 16])
    max_bits = 8
    codes = rng.integers(0, 1 << max_bits, size=(n, k)).astype(np.uint8)
    n_groups = -(-k // group_size)
    x = (rng.standard_normal((m, k)) * 2).astype(np.float16)
    xs = np.zeros((m, n_groups * group_size))
    xs[:, :k] = x.astype(np.float64)
    sm = np.stack([rng.uniform(0.001, 0.01, (n, n_groups)), rng.uniform(-0.5, 0.5, (n, n_groups))], -1)
    sm = sm.astype(np.float16).astype(np.float32)
    ap = np.stack([np.ones((m, n_groups)), xs.reshape(m, n_groups, group_size).sum(-1)], -1).astype(np.float32)
    for bits in (8, 5, 2):
        planes = bp.pack_planes(codes, max_bits)[:bits]
        (tmp_path / "meta.txt").write_text(f"{n} {k} {group_size} {max_bits} {bits} {m}\n")
        np.ascontiguousarray(planes).tofile(tmp_path / "planes.bin")
        np.ascontiguousarray(x.view(np.uint16)).tofile(tmp_path / "xh.bin")
        np.ascontiguousarray(sm).tofile(tmp_path / "sm.bin")
        np.ascontiguousarray(ap).tofile(tmp_path / "aparams.bin")
        subprocess.run([str(emulator), str(tmp_path), "a16"], check=True)
        dots = np.fromfile(tmp_path / "sums.bin", dtype=np.float64).reshape(m, n, n_groups)
        y = np.fromfile(tmp_path / "y.bin", dtype=np.float32).reshape(m, n)
        ck = np.zeros((n, n_groups * group_size), dtype=np.int64)
        ck[:, :k] = codes.astype(np.int64) >> (max_bits - bits)
        c8 = (ck - (1 << (bits - 1))) << (8 - bits)
        c8[:, k:] = 0
        want = np.einsum("ngi,rgi->rng", c8.reshape(n, n_groups, group_size).astype(np.float64),
                         xs.reshape(m, n_groups, group_size))
        np.testing.assert_allclose(dots, want, rtol=1e-12, atol=1e-9, err_msg=f"bits={bits}")
        s, mn = sm[..., 0].astype(np.float64), sm[..., 1].astype(np.float64)
        s_k = s * 2.0 ** (max_bits - bits)
        m_k = mn + s * (2.0 ** (max_bits - bits) - 1) / 2
        exact = (np.einsum("ngi,rgi->rng", ck.reshape(n, n_groups, group_size).astype(np.float64),
                           xs.reshape(m, n_groups, group_size)) * s_k[None]
                 + m_k[None] * ap[:, None, :, 1]).sum(-1)
        err = np.abs(y - exact).max() / np.abs(exact).max()
        assert err < 1e-5, (bits, err)
