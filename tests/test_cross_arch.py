"""Kernels of other architectures, built with a cross compiler and run under qemu-user where this
machine has both (Debian: `apt-get install g++-aarch64-linux-gnu qemu-user`, which .ci/run tries);
skipped otherwise.

AArch64: the 128-bit kernels compile to NEON there and to SSE2 on x86-64, where test_ops_cpu.py tests
them as the 'vec128' family: the int16 decode (cpp/src/ops/bitplane_matmul_vec128.cpp: smull, addp,
bsl), the fp32 GEMM of prompts (fmla; 4 activation rows per tile there, 2 on x86-64) and attention's
spans and prompt blocks (cpp/src/ops/attention.cpp: fcvtl widens an fp16 cache, which SSE2 does in
integer ops). tests/cross/vec128_check.cpp runs the NEON forms against the portable kernels on random
planes, scales, mins and activations (files stored at 8, 6 and 4 bits, every bit-width below, 1 to 34
activation rows, K with full and short last super-chunks, groups that split them) and on fp32, fp16
and q8 KV caches (decode steps and prompts, group sizes 1 to 17, head_dim 8 to 200). Emulated:
correctness only, never speed."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["tests/cross/vec128_check.cpp", "cpp/src/ops/bitplane_matmul.cpp", "cpp/src/ops/bitplane_matmul_vec128.cpp",
           "cpp/src/ops/bitplane_matmul_avx2.cpp", "cpp/src/ops/bitplane_matmul_avx2_i16.cpp",
           "cpp/src/ops/bitplane_matmul_avx512.cpp", "cpp/src/ops/attention.cpp", "cpp/src/ops/sampling.cpp",
           "cpp/src/cpu_features.cpp", "cpp/src/thread_pool.cpp"]


def test_vec128_kernels_on_aarch64_neon(tmp_path):
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    sysroot = Path("/usr/aarch64-linux-gnu")
    if not (cxx and qemu and sysroot.is_dir()):
        # .ci/run sets FLEXQUANT_REQUIRE_CROSS=1 where it installed them: then a skip would hide a
        # missing tool, so it fails instead
        if os.environ.get("FLEXQUANT_REQUIRE_CROSS") == "1":
            pytest.fail("FLEXQUANT_REQUIRE_CROSS=1 but aarch64-linux-gnu-g++ / qemu-aarch64 are missing")
        pytest.skip("no AArch64 cross compiler (aarch64-linux-gnu-g++) and qemu-aarch64 here")
    exe = tmp_path / "vec128_check"
    # -O3 as the package builds (CMAKE_BUILD_TYPE Release); the x86 kernel files compile to nothing
    subprocess.run([cxx, "-std=c++17", "-O3", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'cpp/include'}",
                    f"-I{ROOT / 'cpp/src'}", *[str(ROOT / s) for s in SOURCES], "-o", str(exe), "-pthread"],
                   check=True, capture_output=True, text=True)
    res = subprocess.run([qemu, "-L", str(sysroot), str(exe)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "vec128 1"  # NEON is part of AArch64: the kernel ran, not the portable fallback
    worst = {line.split()[0]: float(line.split()[-1]) for line in lines if " worst " in line}
    assert set(worst) == {"decode", "gemm", "attention"}, res.stdout
    assert all(0 < w < 1e-5 for w in worst.values()), res.stdout
