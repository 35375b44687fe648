"""Conversion to the flexquant model file: one handler per source format.

    read (HF directory | GGUF file | synthetic preset) -> canonical tensors (Hugging Face names,
    float32, linears (out, in), Q/K rows in HF rotate-half order) -> quantize -> write

and the reverse for evaluation: `export_hf` writes the k-bit view of a model file as a Hugging
Face checkpoint, so any HF tool computes exactly what the engine computes at k bits.

Every heavy import (torch, safetensors, gguf, transformers) is lazy: the runtime does not need them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import bitplane
from .model_file import (LlamaConfig, ModelFileError, ModelReader, TokenizerData, hf_name, iter_hf_tensors,
                         write_model)


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

class Source:
    """A model to convert: its config, tokenizer and a lazy loader of canonical tensors."""

    config: LlamaConfig
    tokenizer: TokenizerData
    description: str
    #: load() may be called from several threads at once (the writer then quantizes in parallel)
    thread_safe: bool = False

    def load(self, hf_name: str) -> np.ndarray:
        raise NotImplementedError


def _tokenizer_from_hf_json(text: str, vocab: int, bos: int | None, eos: int | None,
                            chat_template: str | None, where: str) -> TokenizerData:
    """GGUF vocabulary keys (gpt2 family) from a tokenizer.json, padded to the model's vocabulary."""
    from tokenizers import Tokenizer

    try:
        tk = Tokenizer.from_str(text)
    except Exception as e:
        raise ModelFileError(f"{where}: cannot parse tokenizer.json: {e}") from None
    spec = json.loads(text)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ModelFileError(f"{where}: tokenizer model {model.get('type')!r} is not supported (BPE only)")
    v = tk.get_vocab(with_added_tokens=True)
    if v and max(v.values()) >= vocab:
        raise ModelFileError(f"{where}: tokenizer id {max(v.values())} exceeds the model vocabulary ({vocab})")
    tokens = [f"[PAD{i}]" for i in range(vocab)]
    types = [5] * vocab  # 5 = unused
    for t, i in v.items():
        tokens[i] = t
        types[i] = 1
    for a in spec.get("added_tokens", []):
        if a["id"] < vocab:  # control (special) or user-defined: both are matched in raw text
            types[a["id"]] = 3 if a.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return TokenizerData(model="gpt2", tokens=tokens, token_types=types, merges=merges, bos_id=bos,
                         eos_id=eos, chat_template=chat_template, hf_json=text)


class HFSource(Source):
    """A Hugging Face Llama-family directory: config.json, safetensors (single or sharded with an
    index) or pytorch_model.bin, tokenizer.json or tokenizer.model, tokenizer_config.json."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        cfg_path = self.root / "config.json"
        if not cfg_path.is_file():
            raise ModelFileError(f"{root}: not a Hugging Face model directory (no config.json)")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{cfg_path}: invalid JSON: {e}") from None
        self.config = LlamaConfig.from_hf(raw, str(cfg_path))
        self.description = f"hf:{self.root.name}"
        self._index = self._tensor_index()
        self.tokenizer = self._tokenizer()
        self._open: dict[str, object] = {}

    def _tensor_index(self) -> dict[str, Path]:
        st = self.root / "model.safetensors"
        idx = self.root / "model.safetensors.index.json"
        if st.is_file():
            from safetensors import safe_open
            with safe_open(str(st), framework="pt") as f:
                return {k: st for k in f.keys()}
        if idx.is_file():
            wm = json.loads(idx.read_text())["weight_map"]
            return {k: self.root / v for k, v in wm.items()}
        bins = sorted(self.root.glob("pytorch_model*.bin"))
        if bins:
            import torch
            out = {}
            self._bin_cache = {}
            for b in bins:
                sd = torch.load(str(b), map_location="cpu", weights_only=True, mmap=True)
                self._bin_cache[b] = sd
                out.update({k: b for k in sd})
            return out
        raise ModelFileError(f"{self.root}: no model.safetensors, model.safetensors.index.json or pytorch_model*.bin")

    def load(self, hf_name: str) -> np.ndarray:
        path = self._index.get(hf_name)
        if path is None:
            raise ModelFileError(f"{self.root}: missing tensor {hf_name!r}")
        if path.suffix == ".bin":
            t = self._bin_cache[path][hf_name]
        else:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                t = f.get_tensor(hf_name)
        return t.float().numpy()

    def _tokenizer(self) -> TokenizerData:
        tc_path = self.root / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
        tmpl = tc.get("chat_template")
        jt = self.root / "chat_template.jinja"
        if tmpl is None and jt.is_file():
            tmpl = jt.read_text()
        if isinstance(tmpl, list):  # named templates: keep the default one
            tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), tmpl[0]["template"])
        cfg = self.config
        tj = self.root / "tokenizer.json"
        if tj.is_file():
            tok = _tokenizer_from_hf_json(tj.read_text(), cfg.vocab, cfg.bos_id, cfg.eos_id, tmpl, str(tj))
        elif (self.root / "tokenizer.model").is_file():
            tok = _tokenizer_from_sp((self.root / "tokenizer.model").read_bytes(), cfg, tmpl,
                                     str(self.root / "tokenizer.model"))
        else:
            raise ModelFileError(f"{self.root}: no tokenizer.json or tokenizer.model")
        return tok


def _tokenizer_from_sp(proto: bytes, cfg: LlamaConfig, tmpl: str | None, where: str) -> TokenizerData:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except Exception as e:
        raise ModelFileError(f"{where}: cannot load the SentencePiece model: {e}") from None
    n = sp.GetPieceSize()
    if n > cfg.vocab:
        raise ModelFileError(f"{where}: SentencePiece has {n} pieces, the model's vocabulary is {cfg.vocab}")
    tokens, scores, types = [], [], []
    for i in range(cfg.vocab):
        if i < n:
            tokens.append(sp.IdToPiece(i))
            scores.append(float(sp.GetScore(i)))
            types.append(2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else 1)
        else:
            tokens.append(f"[PAD{i}]")
            scores.append(-1e9)
            types.append(5)
    bos = cfg.bos_id if cfg.bos_id is not None else (sp.bos_id() if sp.bos_id() >= 0 else None)
    eos = cfg.eos_id if cfg.eos_id is not None else (sp.eos_id() if sp.eos_id() >= 0 else None)
    return TokenizerData(model="llama", tokens=tokens, token_types=types, scores=scores, bos_id=bos,
                         eos_id=eos, chat_template=tmpl, sp_model=proto)


# GGUF element types the `gguf` package dequantizes for us.
_GGUF_OK_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                  "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


class GGUFSource(Source):
    """A llama-architecture GGUF file (any quant type the gguf package dequantizes)."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        try:
            self.r = gguf.GGUFReader(str(path), "r")
        except Exception as e:
            raise ModelFileError(f"{path}: not a readable GGUF file: {e}") from None
        arch = self._field("general.architecture")
        if arch != "llama":
            raise ModelFileError(f"{path}: architecture {arch!r} is not supported (llama only)")
        if self._field("flexquant.format_version") is not None:
            raise ModelFileError(f"{path}: this is already a flexquant model file")
        self.tensors = {t.name: t for t in self.r.tensors}
        for t in self.tensors.values():
            if t.tensor_type.name not in _GGUF_OK_TYPES:
                raise ModelFileError(f"{path}: tensor {t.name} has unsupported GGUF quant type "
                                     f"{t.tensor_type.name} (supported: {', '.join(_GGUF_OK_TYPES)})")
        g = self._field
        n_heads = int(g("llama.attention.head_count"))
        hidden = int(g("llama.embedding_length"))
        emb = self.tensors.get("token_embd.weight")
        if emb is None:
            raise ModelFileError(f"{path}: missing tensor 'token_embd.weight'")
        vocab = int(g("llama.vocab_size") or int(emb.shape[1]))
        rs = {"type": "none"}
        st = g("llama.rope.scaling.type")
        if st == "linear":
            rs = {"type": "linear", "factor": float(g("llama.rope.scaling.factor"))}
        elif st not in (None, "none"):
            raise ModelFileError(f"{path}: unsupported rope scaling {st!r}")
        if "rope_freqs.weight" in self.tensors:
            raise ModelFileError(f"{path}: Llama-3 rope scaling via rope_freqs.weight is not supported from GGUF; "
                                 "convert the Hugging Face checkpoint instead")
        self.config = LlamaConfig(
            hidden=hidden, n_layers=int(g("llama.block_count")), n_heads=n_heads,
            n_kv_heads=int(g("llama.attention.head_count_kv") or n_heads),
            head_dim=int(g("llama.attention.key_length") or hidden // n_heads),
            ffn=int(g("llama.feed_forward_length")), vocab=vocab,
            context_length=int(g("llama.context_length") or 2048),
            rope_theta=float(g("llama.rope.freq_base") or 10000.0),
            rms_eps=float(g("llama.attention.layer_norm_rms_epsilon") or 1e-5), rope_scaling=rs,
            tie_word_embeddings="output.weight" not in self.tensors,
            bos_id=g("tokenizer.ggml.bos_token_id"), eos_id=g("tokenizer.ggml.eos_token_id"),
            name=str(g("general.name") or self.path.stem),
        )
        self.config.validate(str(path))
        self.description = f"gguf:{self.path.name}"
        self.tokenizer = self._tokenizer()

    def _field(self, key: str):
        f = self.r.get_field(key)
        return None if f is None else f.contents()

    _GGUF_OF_HF = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    _HF_PART = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }

    def load(self, hf_name: str) -> np.ndarray:
        import gguf

        name = self._GGUF_OF_HF.get(hf_name)
        if name is None:
            _, _, i, rest = hf_name.split(".", 3)
            part = self._HF_PART[rest.rsplit(".", 1)[0]]
            name = f"blk.{i}.{part}.weight"
        t = self.tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path}: missing tensor {name!r}")
        shape = tuple(int(x) for x in reversed(t.shape))
        a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        # llama.cpp stores Q and K rows permuted for its interleaved RoPE; undo it (HF order).
        if name.endswith("attn_q.weight"):
            a = _unpermute(a, self.config.n_heads)
        elif name.endswith("attn_k.weight"):
            a = _unpermute(a, self.config.n_kv_heads)
        return a

    def _tokenizer(self) -> TokenizerData:
        g = self._field
        model = g("tokenizer.ggml.model")
        tmpl = g("tokenizer.chat_template")
        cfg = self.config
        if model not in ("gpt2", "llama"):
            raise ModelFileError(f"{self.path}: tokenizer model {model!r} is not supported (gpt2, llama)")
        # transformers rebuilds a fast tokenizer (tokenizer.json) from the GGUF vocabulary keys.
        from transformers import AutoTokenizer
        tk = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        hf_json = tk.backend_tokenizer.to_str()
        tokens = list(g("tokenizer.ggml.tokens"))
        types = [int(x) for x in g("tokenizer.ggml.token_type")]
        if len(tokens) != cfg.vocab:
            raise ModelFileError(f"{self.path}: {len(tokens)} tokens, vocabulary {cfg.vocab}")
        scores = g("tokenizer.ggml.scores")
        return TokenizerData(model=model, tokens=tokens, token_types=types,
                             merges=list(g("tokenizer.ggml.merges") or []),
                             scores=[float(s) for s in scores] if scores is not None else None,
                             bos_id=cfg.bos_id, eos_id=cfg.eos_id, chat_template=tmpl, hf_json=hf_json)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permute (interleaved RoPE rows -> HF rotate-half rows)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------
# Synthetic models of real shapes (benchmarks where the real weights are not at hand)
# ----------------------------------------------------------------------------------------------

SYNTHETIC_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn=176, vocab=320,
                 context_length=256, rope_theta=10000.0, rms_eps=1e-5),
    "smollm2-135m": dict(hidden=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152,
                         context_length=8192, rope_theta=100000.0, rms_eps=1e-5, tie_word_embeddings=True),
    "llama2-7b": dict(hidden=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, ffn=11008, vocab=32000,
                      context_length=4096, rope_theta=10000.0, rms_eps=1e-5),
    "llama3-8b": dict(hidden=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn=14336, vocab=128256,
                      context_length=131072, rope_theta=500000.0, rms_eps=1e-5,
                      rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_context_length": 8192}),
}


def byte_level_tokenizer(vocab: int) -> TokenizerData:
    """A byte-level BPE tokenizer with the 256 byte tokens, a few merges and <|endoftext|>, padded
    to `vocab` entries: enough to run synthetic models end to end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if vocab < 260:
        raise ValueError(f"synthetic vocabulary must hold at least 260 tokens, got {vocab}")
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(byte_chars)
    voc = {c: i for i, c in enumerate(byte_chars)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        voc[a + b] = len(voc)
    eos = len(voc)
    tk = Tokenizer(models.BPE(vocab=voc, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|endoftext|>"])
    text = tk.to_str()
    tmpl = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return _tokenizer_from_hf_json(text, vocab, eos, eos, tmpl, "synthetic")


class SyntheticSource(Source):
    """Random weights of realistic scale for a named real shape: linears N(0, 0.02) with a few
    outlier input channels (x8), norms near 1, embedding N(0, 0.02). Deterministic per seed.

    random_codes: the linears skip the float weights and their quantization: uniformly random codes
    (random bit planes) with group params of the same scale, written straight to the file
    (quantize_hook). For speed measurements, where the values do not matter: a 7B file in seconds
    of random bytes instead of minutes of quantization (tools/gpu_check.sh --e2e)."""

    thread_safe = True  # every load() draws from its own generator

    def __init__(self, name: str, seed: int = 0, n_layers: int | None = None, random_codes: bool = False):
        """n_layers: fewer (or more) layers of the same shapes than the preset, e.g. to profile
        one layer's kernels without writing a whole 7B file."""
        if name not in SYNTHETIC_PRESETS:
            raise ModelFileError(f"unknown synthetic model {name!r} (known: {', '.join(SYNTHETIC_PRESETS)})")
        preset = dict(SYNTHETIC_PRESETS[name])
        if n_layers is not None:
            if not 1 <= n_layers <= 1024:
                raise ValueError(f"n_layers must be in 1..1024, got {n_layers}")
            preset["n_layers"] = n_layers
        self.config = LlamaConfig(name=f"synthetic-{name}", **preset)
        tok = byte_level_tokenizer(self.config.vocab)
        self.config.bos_id = tok.bos_id
        self.config.eos_id = tok.eos_id
        self.tokenizer = tok
        self.description = (f"synthetic:{name}:seed={seed}" + (f":layers={n_layers}" if n_layers is not None else "")
                            + (":random-codes" if random_codes else ""))
        self.seed = seed
        self.random_codes = random_codes

    def quantize_hook(self, max_bits: int, group_size: int):
        """With random_codes: write_model's `quantize(name, w)` (w is a placeholder) -> random planes
        (max_bits, plane_bytes) uint8 (padding codes 0) and qparams (n, n_groups, 2) float16: scale
        s ~ 0.16 / 2^B (x 0.8..1.2 per group), min = -s (2^B - 1) / 2, i.e. weights uniform over about
        ±0.08, the range of N(0, 0.02) with outliers. None without random_codes (the converter quantizes)."""
        if not self.random_codes:
            return None
        import zlib

        masks: dict[tuple[int, int], np.ndarray] = {}  # per shape: the bits of real (row, column) codes

        def quantize(name: str, w) -> tuple[np.ndarray, np.ndarray]:
            n, k = w.shape
            ls = bitplane.LinearShape(n, k, max_bits, group_size)
            if (n, k) not in masks:  # padding codes are 0 (docs/format.md): random bits only inside
                masks[(n, k)] = bitplane.pack_planes(np.full((n, k), 3, dtype=np.uint8), 2)[0]
            rng = np.random.default_rng([self.seed, zlib.crc32(name.encode()), 1])
            raw = np.frombuffer(rng.bytes(max_bits * ls.plane_bytes), dtype=np.uint8).reshape(max_bits, ls.plane_bytes)
            planes = raw & masks[(n, k)][None, :]
            scale = (0.16 / (1 << max_bits)) * rng.uniform(0.8, 1.2, (n, ls.n_groups)).astype(np.float32)
            qp = np.stack([scale, -scale * ((1 << max_bits) - 1) / 2], axis=-1).astype(np.float16)
            return planes, qp

        return quantize

    def load(self, hf_name: str) -> np.ndarray:
        import zlib

        rng = np.random.default_rng([self.seed, zlib.crc32(hf_name.encode())])
        cfg = self.config
        if hf_name.endswith("norm.weight"):
            return (1.0 + 0.1 * rng.standard_normal(cfg.hidden, dtype=np.float32)).astype(np.float32)
        if hf_name == "model.embed_tokens.weight":
            return 0.02 * rng.standard_normal((cfg.vocab, cfg.hidden), dtype=np.float32)
        n, k = _hf_linear_shape(cfg, hf_name)
        if self.random_codes:  # quantize_hook makes the codes: a zero-cost placeholder of the shape
            return np.broadcast_to(np.float32(0.0), (n, k))
        w = rng.standard_normal((n, k), dtype=np.float32)
        w *= np.float32(0.02)
        outliers = rng.choice(k, size=max(1, k // 512), replace=False)
        w[:, outliers] *= np.float32(8.0)
        return w


def _hf_linear_shape(cfg: LlamaConfig, hf_name: str) -> tuple[int, int]:
    shapes = cfg.linear_shapes()
    if hf_name == "lm_head.weight":
        return shapes["output"]
    for part, hfp in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj"),
                      ("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
        if f".{hfp}." in hf_name:
            return shapes[part]
    raise ModelFileError(f"unknown tensor {hf_name!r}")


def open_source(src: str | os.PathLike) -> Source:
    p = Path(src)
    if p.is_dir():
        return HFSource(p)
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return GGUFSource(p)
        raise ModelFileError(f"{src}: neither a Hugging Face model directory nor a GGUF file (magic {magic!r})")
    raise ModelFileError(f"{src}: no such file or directory")


# ----------------------------------------------------------------------------------------------
# Calibration: activation-aware scales folded into the model before quantization (issue 9)
# ----------------------------------------------------------------------------------------------

#: Exponent of the folded input scales s = mean|x|^AWQ_ALPHA (AWQ); measured on SmolLM2 (docs/quantization.md).
AWQ_ALPHA = 0.3
#: The scales are clipped to [1/S, S] around their geometric mean (keeps the fp16 group params sane).
AWQ_MAX_SCALE = 100.0


#: The default converter calibrates automatically only up to this many parameters: calibration
#: holds the whole fp32 model in memory (transformers), the conversion itself streams.
AUTO_CALIBRATE_MAX_PARAMS = 2_000_000_000


def _n_params(cfg: LlamaConfig) -> int:
    per_layer = sum(n * k for name, (n, k) in cfg.linear_shapes().items() if name != "output")
    return cfg.n_layers * per_layer + 2 * cfg.vocab * cfg.hidden


@dataclass
class ActivationStats:
    """Per input column of every bit-plane linear (file names): mean |x| and mean x^2."""

    mean_abs: dict[str, np.ndarray]
    mean_sq: dict[str, np.ndarray]
    tokens: int
    #: E[x x^T] (K x K) of each fold site's input (its first linear), when collected (`gram=True`)
    gram: dict[str, np.ndarray] | None = None


#: The first linear of each fold site (the linears sharing an input): the output search's Grams.
GRAM_SITES = ("attn_q", "attn_output", "ffn_gate", "ffn_down")


def calibration_stats(src: Source, n_chunks: int = 4, chunk_len: int = 512, gram: bool = False) -> ActivationStats:
    """Run the unquantized source model (transformers, fp32) on the calibration half of Python's
    docs (`controller.calibration_text`, disjoint from the evaluation text) and record the input
    statistics of every linear. Needs transformers and ~4 bytes per parameter of memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .controller import calibration_text
    from .model_file import HF_LINEAR_NAMES

    if isinstance(src, GGUFSource):
        where, kw = str(src.path.parent), {"gguf_file": src.path.name}
    elif isinstance(src, HFSource):
        where, kw = str(src.root), {}
    else:
        raise ModelFileError(f"calibration needs a Hugging Face or GGUF source, not {src.description}")
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw)
    model.eval()
    tok = AutoTokenizer.from_pretrained(where, **kw)
    ids = tok(calibration_text("calibration"), add_special_tokens=False)["input_ids"]
    n_chunks = max(1, min(n_chunks, len(ids) // chunk_len))
    file_name = {f"model.layers.{i}.{hfp}": f"blk.{i}.{l}" for i in range(src.config.n_layers)
                 for l, hfp in HF_LINEAR_NAMES.items()}
    file_name["lm_head"] = "output"
    sums: dict[str, list] = {}
    grams: dict[str, "torch.Tensor"] = {}
    want_gram = {f for f in file_name.values() if f == "output" or f.split(".")[-1] in GRAM_SITES} if gram else set()
    hooks = []
    for name, mod in model.named_modules():
        if name in file_name:
            def hook(_m, inp, _out, fname=file_name[name]):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                acc = sums.setdefault(fname, [0.0, 0.0])
                acc[0] = acc[0] + x.abs().sum(0).numpy()
                acc[1] = acc[1] + (x * x).sum(0).numpy()
                if fname in want_gram:
                    xf = x.float()
                    grams[fname] = grams[fname] + xf.T @ xf if fname in grams else xf.T @ xf
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(n_chunks):
            model(torch.tensor([ids[i * chunk_len:(i + 1) * chunk_len]]))
    for h in hooks:
        h.remove()
    n = n_chunks * chunk_len
    missing = set(file_name.values()) - set(sums)
    if missing:
        raise ModelFileError(f"calibration saw no input for {sorted(missing)[:3]}")
    return ActivationStats({k: (v[0] / n).astype(np.float32) for k, v in sums.items()},
                           {k: (v[1] / n).astype(np.float32) for k, v in sums.items()}, n,
                           {k: (v / n).numpy() for k, v in grams.items()} if gram else None)


#: Exponents tried per site by the searched fold; rows of a linear sampled for the search;
#: weight of each view k in the search's objective (times 4^k, which puts each view's error on
#: the scale of its own step).
ALPHA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5)
SEARCH_MAX_ROWS = 4096
SEARCH_VIEW_USE = {3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0, 7: 1.0, 8: 1.0}


def _multiview_error(w: np.ndarray, s: np.ndarray, msq: np.ndarray, group: int) -> float:
    """Σ_k use_k 4^k Σ (W_k - W)^2 E[x^2] over the views of w folded by column scales s."""
    codes, qp = bitplane.quantize(w * s, 8, group)
    cw = msq / (s * s)
    tot = 0.0
    for k, use in SEARCH_VIEW_USE.items():
        d = bitplane.dequantize(codes, qp, k, 8, group) - w * s
        tot += use * 4.0 ** k * float(((d * d) @ cw).sum())
    return tot


#: The output search (`ScaleFold(objective="output")`, AWQ's per-layer search): exponents tried per
#: site, and the weight of each view k in its objective (times 4^k).
OUTPUT_ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
OUTPUT_VIEW_USE = {4: 1.0}
#: Exponents beta of the weight term of the output search's scales: s = mean|x|^alpha / max|W|^beta
#: per input column (not for o_proj, whose scale is shared by query heads).
OUTPUT_BETA_GRID = (0.0,)


def _output_error(w: np.ndarray, s: np.ndarray, gram: np.ndarray, group: int) -> float:
    """Σ_k use_k 4^k Σ_tokens ||(W_k - W) x||^2 / tokens: the output error of the views of w folded
    by column scales s (the k-bit view of W·diag(s), applied to x / s), from E[x x^T] = gram."""
    ws = w * s
    codes, qp = bitplane.quantize(ws, 8, group)
    tot = 0.0
    for k, use in OUTPUT_VIEW_USE.items():
        d = (bitplane.dequantize(codes, qp, k, 8, group) - ws) / s
        tot += use * 4.0 ** k * float(np.einsum("ij,ij->", d @ gram, d))
    return tot


def fold_scale(mean_abs: np.ndarray, alpha: float = AWQ_ALPHA) -> np.ndarray:
    """Input-column scale s = mean|x|^alpha, geometric mean 1, clipped to [1/S, S]."""
    a = np.maximum(np.asarray(mean_abs, np.float64), 1e-12) ** alpha
    a /= np.exp(np.log(a).mean())
    return np.clip(a, 1 / AWQ_MAX_SCALE, AWQ_MAX_SCALE).astype(np.float32)


class ScaleFold:
    """AWQ-style equivalent transform of the model: each linear's input columns are multiplied by
    s = mean|x|^alpha (geometric mean 1) and the op that produces that input divided by s:
    the RMSNorm weight for q/k/v, gate/up and the LM head, v_proj's rows for o_proj (one scale
    per v row: the query heads that share a KV head share it), up_proj's rows for down_proj.
    The unquantized model computes the same function (up to float rounding); the quantization
    error moves off the channels with large activations.

    With `search=(load, group_size)` (load(name) -> the linear's source weight), alpha is chosen
    per site (the linears sharing an input) from ALPHA_GRID to minimise the multi-view error
    Σ_k 4^k Σ (W_k - W)^2 E[x^2] (views k = 3..8, each on the scale of its own step, squared
    errors weighted by the mean squared input of their column); otherwise alpha is fixed."""

    def __init__(self, cfg: LlamaConfig, stats: ActivationStats, alpha: float = AWQ_ALPHA,
                 search: tuple[Callable[[str], np.ndarray], int] | None = None, objective: str = "weight"):
        if objective not in ("weight", "output"):
            raise ValueError(f"objective must be 'weight' or 'output', got {objective!r}")
        if search is not None and objective == "output" and stats.gram is None:
            raise ValueError("the output search needs the calibration Grams (calibration_stats(gram=True))")
        self.objective = objective
        self.cfg = cfg
        self.stats = stats
        self.alpha = alpha
        self.search = search
        self.alphas: dict[str, float] = {}  # site (its first linear) -> chosen alpha
        self.betas: dict[str, float] = {}  # site -> chosen beta (output search)
        self.col: dict[str, np.ndarray] = {}  # file linear -> column scale
        self.row: dict[str, np.ndarray] = {}  # file linear -> row divisor
        self.vec: dict[str, np.ndarray] = {}  # file norm tensor -> divisor
        rep = cfg.n_heads // cfg.n_kv_heads
        for i in range(cfg.n_layers):
            b = f"blk.{i}."
            sa = self._site([b + "attn_q", b + "attn_k", b + "attn_v"],
                            lambda a, b=b: fold_scale(stats.mean_abs[b + "attn_q"], a))
            sm = self._site([b + "ffn_gate", b + "ffn_up"],
                            lambda a, b=b: fold_scale(stats.mean_abs[b + "ffn_gate"], a))
            ao = np.maximum(stats.mean_abs[b + "attn_output"].astype(np.float64), 1e-12)
            ao_kv = np.exp(np.log(ao.reshape(cfg.n_kv_heads, rep, cfg.head_dim)).mean(1)).reshape(-1)

            def o_cols(a, ao_kv=ao_kv):  # one scale per v row, repeated over the query heads sharing it
                sv = fold_scale(ao_kv, a)
                return np.repeat(sv.reshape(cfg.n_kv_heads, 1, cfg.head_dim), rep, 1).reshape(-1)
            so = self._site([b + "attn_output"], o_cols)
            sd = self._site([b + "ffn_down"], lambda a, b=b: fold_scale(stats.mean_abs[b + "ffn_down"], a))
            self.vec[b + "attn_norm.weight"] = sa
            self.vec[b + "ffn_norm.weight"] = sm
            for l in ("attn_q", "attn_k", "attn_v"):
                self.col[b + l] = sa
            for l in ("ffn_gate", "ffn_up"):
                self.col[b + l] = sm
            self.row[b + "attn_v"] = so.reshape(cfg.n_kv_heads, rep, cfg.head_dim)[:, 0].reshape(-1)
            self.col[b + "attn_output"] = so
            self.row[b + "ffn_up"] = sd
            self.col[b + "ffn_down"] = sd
        self.vec["output_norm.weight"] = self.col["output"] = self._site(
            ["output"], lambda a: fold_scale(stats.mean_abs["output"], a))

    def _site(self, names: list[str], scale_of: Callable[[float], np.ndarray]) -> np.ndarray:
        """The column scale of the linears `names` (which share their input)."""
        if self.search is None:
            return scale_of(self.alpha)
        load, group = self.search
        ws = []
        for n in names:
            w = np.asarray(load(n), np.float32)
            ws.append(w[::-(-w.shape[0] // SEARCH_MAX_ROWS)])  # a row sample of the big LM head
        if self.objective == "output":
            gram = np.asarray(self.stats.gram[names[0]], np.float32)
            grid, err = OUTPUT_ALPHA_GRID, lambda w, s: _output_error(w, s, gram, group)
        else:
            msq = self.stats.mean_sq[names[0]].astype(np.float32)
            grid, err = ALPHA_GRID, lambda w, s: _multiview_error(w, s, msq, group)
        betas = OUTPUT_BETA_GRID if self.objective == "output" and not names[0].endswith("attn_output") else (0.0,)
        wmax = np.maximum(np.max([np.abs(w).max(0) for w in ws], 0).astype(np.float64), 1e-12)
        best = None
        for a in grid:
            for b in betas:
                s = scale_of(a) if b == 0 else fold_scale(1.0 / wmax, b) * scale_of(a)
                if b != 0:
                    s = np.clip(s / np.exp(np.log(s).mean()), 1 / AWQ_MAX_SCALE, AWQ_MAX_SCALE).astype(np.float32)
                e = sum(err(w, s) for w in ws)
                if best is None or e < best[0]:
                    best = (e, a, s, b)
        self.alphas[names[0]] = best[1]
        self.betas[names[0]] = best[3]
        return best[2]

    def tensor(self, name: str, a: np.ndarray) -> np.ndarray:
        """The folded version of file tensor `name` (a linear's base name or a norm's name)."""
        if name in self.vec:
            return (a / self.vec[name]).astype(np.float32)
        out = a
        if name in self.row:
            out = out / self.row[name][:, None]
        if name in self.col:
            out = out * self.col[name][None, :]
        return np.asarray(out, np.float32)


# ----------------------------------------------------------------------------------------------
# Conversion and export
# ----------------------------------------------------------------------------------------------

def make_fold(src: Source, stats: ActivationStats, group_size: int, alpha_search: bool = False,
              objective: str = "weight") -> ScaleFold:
    """The converter's fold of `src`: exponents searched per site on its weights, or fixed."""
    cfg = src.config

    def load_linear(name: str) -> np.ndarray:
        tied = name == "output" and cfg.tie_word_embeddings
        return src.load("model.embed_tokens.weight" if tied else hf_name(cfg, name + "."))
    return ScaleFold(cfg, stats, search=(load_linear, group_size) if alpha_search else None, objective=objective)


#: The default method quantizes with view-aware GPTQ only if the calibration Grams (E[x xᵀ] of
#: every fold site's input, float32) fit in this many bytes; above it, it falls back to "folded".
GPTQ_MAX_GRAM_BYTES = 4 << 30

#: Calibration chunks (of 512 tokens) for the default method: GPTQ's Hessians want more tokens than
#: the fold's mean |x| (4 chunks); measured on SmolLM2 (docs/quantization.md).
GPTQ_CALIBRATION_CHUNKS = 16

#: The linear whose input (and so whose Gram) each linear shares.
_GRAM_SITE_OF = {"attn_q": "attn_q", "attn_k": "attn_q", "attn_v": "attn_q", "attn_output": "attn_output",
                 "ffn_gate": "ffn_gate", "ffn_up": "ffn_gate", "ffn_down": "ffn_down"}


def gram_bytes(cfg: LlamaConfig) -> int:
    """Bytes of the calibration Grams `calibration_stats(gram=True)` collects (float32)."""
    shapes = cfg.linear_shapes()
    per_layer = sum(shapes[s][1] ** 2 for s in GRAM_SITES)
    return 4 * (cfg.n_layers * per_layer + shapes["output"][1] ** 2)


def gptq_quantizer(stats: ActivationStats, fold: ScaleFold | None, max_bits: int,
                   group_size: int) -> Callable[[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`write_model`'s quantize(name, w) for view-aware GPTQ (nested_gptq.py): the Hessian of each
    linear is the calibration Gram of its input, in the folded model's coordinates (the input of a
    folded linear is x / s, so H' = H / (s sᵀ))."""
    from . import nested_gptq

    if stats.gram is None:
        raise ValueError("GPTQ needs the calibration Grams (calibration_stats(gram=True))")

    def quantize(name: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if name == "output":
            site = "output"
        else:
            blk, lin = name.rsplit(".", 1)
            site = f"{blk}.{_GRAM_SITE_OF[lin]}"
        h = np.asarray(stats.gram[site], np.float64)
        if fold is not None and name in fold.col:
            s = fold.col[name].astype(np.float64)
            h = h / np.outer(s, s)
        return nested_gptq.quantize_to_planes(w, h, max_bits, group_size)
    return quantize


def convert(src: Source, out: str | os.PathLike, *, max_bits: int = 8, group_size: int = 128,
            embed_dtype: str = "f16", progress: bool = True, method: str = "gptq",
            calibrate: bool | None = None, stats: ActivationStats | None = None,
            alpha_search: bool = False, scale_search: str | None = None) -> None:
    """Convert `src` to a model file.

    method "gptq" (default): "folded", then the codes are chosen by view-aware GPTQ
    (nested_gptq.py) on the calibration activations' Grams, for every k-bit view at once; without
    calibration statistics it is the same as "plain", and with Grams too large for memory
    (> GPTQ_MAX_GRAM_BYTES) the same as "folded" (docs/quantization.md).
    method "folded": fold activation-aware input scales into the model (`ScaleFold`, from
    calibration statistics) before the min-max quantization, which makes every k-bit view a
    better quantizer; without statistics it is the same as "plain".
    method "plain": min-max quantization of the source weights as they are.
    calibrate: run the source model on calibration text (None: try it when the source is a
    Hugging Face directory or a GGUF file of at most AUTO_CALIBRATE_MAX_PARAMS parameters);
    `stats` gives precomputed statistics instead (with Grams for "gptq"). alpha_search: choose the
    fold's exponent per site (`ScaleFold` search) instead of the fixed AWQ_ALPHA; the same as
    scale_search="weight". scale_search="output": AWQ's per-layer search, the exponent per site
    minimising the output error of the site's linears at the 4-bit view on the calibration
    activations (needs their Grams, which the converter collects itself).
    """
    random_codes = getattr(src, "random_codes", False)
    if random_codes:
        # the codes are made directly: nothing to calibrate, fold or search on (the linears' float
        # weights are placeholders)
        if stats is not None or calibrate or alpha_search or scale_search:
            raise ValueError("a random-codes synthetic source takes no calibration, stats or scale search")
        method = "plain"
    if alpha_search:
        scale_search = scale_search or "weight"
    if scale_search not in (None, "weight", "output"):
        raise ValueError(f"scale_search must be 'weight' or 'output', got {scale_search!r}")
    if method not in ("gptq", "folded", "plain"):
        raise ValueError(f"method must be 'gptq', 'folded' or 'plain', got {method!r}")
    if method == "gptq" and gram_bytes(src.config) > GPTQ_MAX_GRAM_BYTES:
        print(f"warning: the calibration Grams of {src.description} would take "
              f"{gram_bytes(src.config) / 2**30:.1f} GiB (> {GPTQ_MAX_GRAM_BYTES / 2**30:.0f} GiB); "
              "quantizing with --method folded instead of gptq", file=sys.stderr)
        method = "folded"
    if method == "gptq" and stats is not None and stats.gram is None:
        raise ValueError("method 'gptq' needs calibration statistics with Grams (calibration_stats(gram=True))")
    gram = scale_search == "output" or method == "gptq"
    transform = quantize = None
    description = src.description
    if method in ("folded", "gptq"):
        chunks = GPTQ_CALIBRATION_CHUNKS if method == "gptq" else 4
        if stats is None and calibrate:
            stats = calibration_stats(src, n_chunks=chunks, gram=gram)
        elif stats is None and calibrate is None and isinstance(src, (HFSource, GGUFSource)) \
                and _n_params(src.config) <= AUTO_CALIBRATE_MAX_PARAMS:
            try:
                stats = calibration_stats(src, n_chunks=chunks, gram=gram)
            except Exception as e:  # noqa: BLE001  (best effort: the writer names real source defects)
                print(f"warning: calibration of {src.description} failed ({type(e).__name__}: {e}); "
                      "converting without folded scales", file=sys.stderr)
        if stats is not None:
            fold = make_fold(src, stats, group_size, scale_search is not None, scale_search or "weight")
            transform = fold.tensor
            grid = OUTPUT_ALPHA_GRID if scale_search == "output" else ALPHA_GRID
            alpha = (f"alpha per site from {grid[0]}..{grid[-1]}, {scale_search} search "
                     f"(mean {np.mean(list(fold.alphas.values())):.2f})" if scale_search else f"alpha={fold.alpha}")
            if method == "gptq":
                from .nested_gptq import VIEW_USE
                quantize = gptq_quantizer(stats, fold, max_bits, group_size)
                views = [k for k in sorted(VIEW_USE) if k <= max_bits]
                alpha += f", view-aware GPTQ for views {views[0]}..{views[-1]}"
            description += f" [folded input scales, {alpha}, {stats.tokens} calibration tokens]"
    if random_codes:  # (method "plain": no transform, no other quantizer)
        quantize = src.quantize_hook(max_bits, group_size)
    # a 7B synthetic model takes minutes on one core; the GPTQ quantizer runs torch's own threads
    workers = min(16, os.cpu_count() or 1) if src.thread_safe and (quantize is None or random_codes) else 1
    write_model(out, src.config, src.tokenizer, src.load, max_bits=max_bits, group_size=group_size,
                embed_dtype=embed_dtype, source=description, progress=progress, transform=transform,
                quantize=quantize, workers=workers)


def export_hf(model: str | os.PathLike, out_dir: str | os.PathLike, bits: int, progress: bool = True) -> None:
    """Write the k-bit view of a model file as a Hugging Face checkpoint (fp32 safetensors)."""
    import torch
    from safetensors.torch import save_file

    r = ModelReader(model)
    bitplane.check_bits(bits, r.max_bits)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    names = list(iter_hf_tensors(r, bits))
    for name, a in names:
        tensors[name] = torch.from_numpy(np.ascontiguousarray(a))
    tmp = out / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "flexquant_bits": str(bits)})
    os.replace(tmp, out / "model.safetensors")
    cfg = r.config.to_hf()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = r.tokenizer()
    tc: dict = {"model_max_length": r.config.context_length}
    if tok.hf_json is not None:
        (out / "tokenizer.json").write_text(tok.hf_json)
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    elif tok.sp_model is not None:
        (out / "tokenizer.model").write_bytes(tok.sp_model)
        tc["tokenizer_class"] = "LlamaTokenizer"
    for key, tid in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        if tid is not None:
            tc[key] = tok.tokens[tid]
    if tok.chat_template:
        tc["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))


def size_report(path: str | os.PathLike) -> str:
    r = ModelReader(path)
    lines = [f"{path}: {os.path.getsize(path) / 1e6:.1f} MB, max_bits={r.max_bits}, group_size={r.group_size}",
             "bytes read per token:"]
    for k in range(r.max_bits, 1, -1):
        lines.append(f"  k={k}: {r.bytes_per_token(k) / 1e6:9.2f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert a Hugging Face Llama directory or a llama GGUF file to a flexquant model file, "
                    "write a synthetic model of a real shape, or export a k-bit view as a HF checkpoint.")
    ap.add_argument("src", nargs="?", help="HF model directory or GGUF file (with --export-hf: a .fq file)")
    ap.add_argument("out", nargs="?", help="output .fq file")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--max-bits", type=int, default=8)
    ap.add_argument("--embed-dtype", choices=("f16", "f32"), default="f16")
    ap.add_argument("--method", choices=("gptq", "folded", "plain"), default="gptq",
                    help="gptq: folded, then codes chosen by view-aware GPTQ on the calibration activations "
                         "for every k-bit view at once (default); folded: fold calibrated input scales into the "
                         "model, then round to nearest; plain: quantize the source weights as they are "
                         "(docs/quantization.md)")
    ap.add_argument("--alpha-search", action="store_true",
                    help="folded: choose the scales' exponent per site instead of the fixed one (slower); "
                         "the same as --scale-search weight")
    ap.add_argument("--scale-search", choices=("weight", "output"),
                    help="folded: choose the exponent per site by a weight-space objective (weight) or by the "
                         "4-bit output error of the site's linears on the calibration activations (output, AWQ's search)")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="skip the calibration run of the source model (then gptq = folded = plain)")
    ap.add_argument("--synthetic", metavar="NAME", help=f"random weights of a real shape: {', '.join(SYNTHETIC_PRESETS)}")
    ap.add_argument("--seed", type=int, default=0, help="seed of --synthetic")
    ap.add_argument("--random-codes", action="store_true",
                    help="--synthetic: uniformly random codes written directly, no float weights to quantize "
                         "(seconds instead of minutes for a 7B file; for speed measurements)")
    ap.add_argument("--export-hf", metavar="DIR", help="export the k-bit view of SRC (.fq) to DIR")
    ap.add_argument("--bits", type=int, help="bit-width of --export-hf")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    try:
        if a.export_hf:
            if a.src is None or a.bits is None:
                ap.error("--export-hf needs SRC (a .fq file) and --bits")
            export_hf(a.src, a.export_hf, a.bits, progress=not a.quiet)
            print(f"wrote the {a.bits}-bit view of {a.src} to {a.export_hf}")
            return 0
        if a.synthetic:
            out = a.out or a.src
            if out is None or (a.out and a.src):
                ap.error("--synthetic NAME takes exactly one positional argument: OUT.fq")
            src: Source = SyntheticSource(a.synthetic, a.seed, random_codes=a.random_codes)
        else:
            if a.src is None or a.out is None:
                ap.error("SRC and OUT are required")
            out = a.out
            src = open_source(a.src)
        convert(src, out, max_bits=a.max_bits, group_size=a.group_size, embed_dtype=a.embed_dtype,
                progress=not a.quiet, method=a.method, calibrate=False if a.no_calibrate else None,
                alpha_search=a.alpha_search, scale_search=a.scale_search)
        print(size_report(out))
        return 0
    except (ModelFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
