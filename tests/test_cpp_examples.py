"""The C++ API from a C++ application: build and install the library as a CMake package, build
examples/ as a separate project against it (find_package(flexquant_rt)), run its ctest, and check
the programs' output against the Python package: token ids, and text in -> text out."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import greedy_by_full_forward
from flexquant_rt import Engine, _core

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def examples(tmp_path_factory, tiny_fq) -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    if not (REPO / "CMakeLists.txt").is_file():
        pytest.skip("the source tree is not beside the tests")
    if not _core.native_tokenizer_available():
        pytest.skip("built without ICU: the text examples need the native tokenizer")
    tmp = tmp_path_factory.mktemp("cpp")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    # the library alone (no examples in-tree, no Python module), installed to a prefix ...
    _run(["cmake", "-S", REPO, "-B", tmp / "lib", "-DFLEXQUANT_CUDA=OFF", "-DFLEXQUANT_BUILD_PYTHON=OFF",
          "-DFLEXQUANT_BUILD_EXAMPLES=OFF", "-DCMAKE_BUILD_TYPE=Release", *gen])
    _run(["cmake", "--build", tmp / "lib", "-j2"])
    _run(["cmake", "--install", tmp / "lib", "--prefix", tmp / "prefix"])
    assert (tmp / "prefix" / "include" / "flexquant" / "text_engine.h").is_file()
    # ... then examples/ as an application would build it
    _run(["cmake", "-S", REPO / "examples", "-B", tmp / "app", f"-DCMAKE_PREFIX_PATH={tmp / 'prefix'}",
          f"-DFQ_TEST_MODEL={tiny_fq}", "-DCMAKE_BUILD_TYPE=Release", *gen])
    _run(["cmake", "--build", tmp / "app", "-j2"])
    return tmp / "app"


def test_ctest_on_installed_package(examples):
    p = _run(["ctest", "--output-on-failure"], cwd=examples)
    assert "100% tests passed" in p.stdout


def _answer(stdout: str) -> str:
    m = re.fullmatch(r"<answer>(.*)</answer>\n", stdout, re.S)
    assert m, stdout
    return m.group(1)


def test_text_in_text_out_matches_python(examples, tiny_fq):
    with Engine(tiny_fq) as eng:
        for args, want in (
            (["--raw", "--max-new", "20", "the theme"], eng.generate("the theme", max_new_tokens=20)),
            (["--max-new", "12", "hello"], eng.chat([{"role": "user", "content": "hello"}], max_new_tokens=12)),
            (["--raw", "--max-new", "20", "--temperature", "0.9", "--seed", "7", "x"],
             eng.generate("x", max_new_tokens=20, temperature=0.9, seed=7)),
            # last: bits= stays set on the Python engine
            (["--raw", "--max-new", "12", "--bits", "3", "the"], eng.generate("the", max_new_tokens=12, bits=3)),
        ):
            p = _run([examples / "fq_chat", tiny_fq, *args])
            assert _answer(p.stdout) == want, args


def test_smollm2_answers_a_question(examples, smollm2_fq):
    q = "What is the capital of Japan?"  # a clear margin at every token (France is a near-tie)
    p = _run([examples / "fq_chat", smollm2_fq, "--max-new", "40", q])
    text = _answer(p.stdout)
    assert "Tokyo" in text
    with Engine(smollm2_fq, n_ctx=512) as eng:
        assert text == eng.chat([{"role": "user", "content": q}], max_new_tokens=40)


def test_cpp_generate_matches_python_greedy(examples, tiny_fq):
    prompt = [5, 17, 42, 7]
    for bits in (8, 4):
        p = _run([examples / "fq_generate", tiny_fq, "12", str(bits), *map(str, prompt)])
        ids = [int(t) for t in p.stdout.splitlines()[0].split()[1:]]
        with Engine(tiny_fq) as eng:
            eng.set_layer_bits(bits, lm_head_bits=bits)
            assert ids == greedy_by_full_forward(eng, prompt, 12)
            assert f"bytes/token: {eng.bytes_per_token()}" in p.stdout


def test_cpp_batch_matches_python_greedy(examples, tiny_fq):
    """fq_batch: several prompts decoded together through the C++ API give each prompt's greedy ids."""
    prompts = [[5, 17, 42, 7], [9], [100, 3, 8, 8, 200, 31, 2], [44, 45]]
    p = _run([examples / "fq_batch", tiny_fq, "10", *(",".join(map(str, q)) for q in prompts)])
    lines = p.stdout.splitlines()
    with Engine(tiny_fq) as eng:
        for i, q in enumerate(prompts):
            assert lines[i].startswith(f"ids {i}:")
            assert [int(t) for t in lines[i].split(":")[1].split()] == greedy_by_full_forward(eng, q, 10)


def test_cpp_inspect_and_errors(examples, tiny_fq, tmp_path):
    p = _run([examples / "fq_inspect", tiny_fq])
    assert "hidden" in p.stdout
    bad = tmp_path / "bad.fq"
    bad.write_bytes(b"GGUF" + bytes(20))
    for cmd, msg in (([examples / "fq_generate", bad, "4", "8", "1"], "bad.fq"),
                     ([examples / "fq_generate", tiny_fq, "4", "9", "1"], "= 9 is outside 2..8"),
                     ([examples / "fq_chat", bad, "hi"], "bad.fq"),
                     ([examples / "fq_chat", tiny_fq, "--bits", "1", "hi"], "= 1 is outside 2..8")):
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        assert p.returncode == 1 and msg in p.stderr, (cmd, p.stderr)
