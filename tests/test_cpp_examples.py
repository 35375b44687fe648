"""The C++ API from a C++ program: CMake builds examples/ (CPU backend) and they run on a model."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import greedy_by_full_forward
from flexquant_rt import Engine

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example_bin(tmp_path_factory) -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    if not (REPO / "CMakeLists.txt").is_file():
        pytest.skip("the source tree is not beside the tests")
    build = tmp_path_factory.mktemp("cpp_build")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), "-DFLEXQUANT_CUDA=OFF",
                    "-DCMAKE_BUILD_TYPE=Release", *gen], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2", "--target", "fq_generate", "fq_inspect"],
                   check=True, capture_output=True)
    return build


def test_cpp_generate_matches_python_greedy(example_bin, tiny_fq):
    prompt = [5, 17, 42, 7]
    for bits in (8, 4):
        p = subprocess.run([str(example_bin / "fq_generate"), str(tiny_fq), "12", str(bits), *map(str, prompt)],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        ids = [int(t) for t in p.stdout.splitlines()[0].split()[1:]]
        with Engine(tiny_fq) as eng:
            eng.set_layer_bits(bits, lm_head_bits=bits)
            assert ids == greedy_by_full_forward(eng, prompt, 12)
            assert f"bytes/token: {eng.bytes_per_token()}" in p.stdout


def test_cpp_inspect_and_errors(example_bin, tiny_fq, tmp_path):
    p = subprocess.run([str(example_bin / "fq_inspect"), str(tiny_fq)], capture_output=True, text=True)
    assert p.returncode == 0 and "hidden" in p.stdout
    bad = tmp_path / "bad.fq"
    bad.write_bytes(b"GGUF" + bytes(20))
    p = subprocess.run([str(example_bin / "fq_generate"), str(bad), "4", "8", "1"], capture_output=True, text=True)
    assert p.returncode == 1 and "bad.fq" in p.stderr
    p = subprocess.run([str(example_bin / "fq_generate"), str(tiny_fq), "4", "9", "1"], capture_output=True, text=True)
    assert p.returncode == 1 and "= 9 is outside 2..8" in p.stderr
