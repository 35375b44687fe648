"""The GPU tooling that runs only on a lent GPU machine (tools/gpu_check.sh and the scripts it
calls), checked here so that a device call is not lost to a syntax error: the shell scripts parse,
every Python program embedded in gpu_check.sh compiles, the Python tools start (--help), and the
prebuilt archive's source hash is stable and follows the sources."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


@pytest.mark.parametrize("script", ["gpu_check.sh", "prebuild_cuda.sh", "cuda_src_hash.sh"])
def test_shell_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(TOOLS / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_gpu_check_embedded_python_compiles():
    text = (TOOLS / "gpu_check.sh").read_text()
    blocks = re.findall(r"<<'EOF'[^\n]*\n(.*?)\nEOF\n", text, flags=re.S)
    assert len(blocks) >= 4  # conversion, sanitizer script, GEMV and GEMM benchmarks
    for i, src in enumerate(blocks):
        compile(src, f"gpu_check.sh heredoc {i}", "exec")


@pytest.mark.parametrize("tool", ["bench.py", "gpu_profile.py", "protect_activations_eval.py", "bench_activations.py"])
def test_python_tools_start(tool):
    r = subprocess.run([sys.executable, str(TOOLS / tool), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="the hash includes nvcc's version")
def test_cuda_source_hash_follows_the_sources(tmp_path):
    copy = tmp_path / "repo"
    for part in ("cuda", "cpp", "tools"):
        shutil.copytree(ROOT / part, copy / part)
    shutil.copy(ROOT / "CMakeLists.txt", copy / "CMakeLists.txt")

    def h():
        return subprocess.run(["bash", str(copy / "tools" / "cuda_src_hash.sh")], capture_output=True, text=True,
                              check=True).stdout.strip()

    first = h()
    assert re.fullmatch(r"[0-9a-f]{64}", first) and h() == first
    with open(copy / "cuda" / "rope.cu", "a") as f:
        f.write("\n// edited\n")
    assert h() != first
