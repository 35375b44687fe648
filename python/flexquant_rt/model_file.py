"""The flexquant model file (docs/format.md): config, tokenizer data, writer and a Python reader.

The writer streams: it declares every tensor first (shapes follow from the config), writes the
GGUF header, then loads, quantizes and writes one tensor at a time, so converting a 7B model
holds one weight matrix in memory, not the model. It writes to a temporary name and renames at
the end, so a failed conversion leaves no partial file behind.

`gguf` is imported lazily: the runtime (the C++ engine) reads the file itself; only conversion,
export and tests need the Python reader.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from . import bitplane

FORMAT_VERSION = 1
PLANE_LAYOUT = "tc8x512"
ALIGNMENT = 64

#: The 7 linears of a decoder layer, in mask order (q, k, v, o, gate, up, down).
LAYER_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
#: Hugging Face parameter name of each layer linear.
HF_LINEAR_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ROPE_SCALING_TYPES = ("none", "linear", "llama3")


class ModelFileError(ValueError):
    """A model file or conversion source is malformed or unsupported."""


@dataclass
class LlamaConfig:
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    context_length: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    rope_scaling: dict = field(default_factory=lambda: {"type": "none"})
    tie_word_embeddings: bool = False
    bos_id: int | None = None
    eos_id: int | None = None
    name: str = "model"

    def validate(self, where: str = "config") -> None:
        for f in ("hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "context_length"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or v <= 0 or v > (1 << 24 if f == "vocab" else 1 << 20):
                raise ModelFileError(f"{where}: {f} = {v!r} is not a sane positive size")
        if self.n_heads % self.n_kv_heads:
            raise ModelFileError(f"{where}: n_heads = {self.n_heads} is not a multiple of n_kv_heads = {self.n_kv_heads}")
        if not self.rope_theta > 0 or not self.rms_eps > 0:
            raise ModelFileError(f"{where}: rope_theta = {self.rope_theta} and rms_eps = {self.rms_eps} must be > 0")
        t = self.rope_scaling.get("type", "none")
        if t not in ROPE_SCALING_TYPES:
            raise ModelFileError(f"{where}: unsupported rope scaling type {t!r} (supported: {ROPE_SCALING_TYPES})")
        for tok in ("bos_id", "eos_id"):
            v = getattr(self, tok)
            if v is not None and not 0 <= v < self.vocab:
                raise ModelFileError(f"{where}: {tok} = {v} is outside the vocabulary (size {self.vocab})")

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(N, K) of every layer linear kind and of the LM head ('output')."""
        d, h, hk, hd, f = self.hidden, self.n_heads, self.n_kv_heads, self.head_dim, self.ffn
        return {
            "attn_q": (h * hd, d), "attn_k": (hk * hd, d), "attn_v": (hk * hd, d),
            "attn_output": (d, h * hd), "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f),
            "output": (self.vocab, d),
        }

    # -- Hugging Face config.json ------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> "LlamaConfig":
        mt = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if mt not in ("llama", "mistral") and "LlamaForCausalLM" not in archs:
            raise ModelFileError(f"{where}: not a Llama-family model (model_type={mt!r}, architectures={archs})")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ModelFileError(f"{where}: {flag}=true is not supported (Llama without biases only)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelFileError(f"{where}: hidden_act={cfg.get('hidden_act')!r} is not supported (silu only)")
        try:
            hidden = int(cfg["hidden_size"])
            n_heads = int(cfg["num_attention_heads"])
            c = cls(
                hidden=hidden,
                n_layers=int(cfg["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                head_dim=int(cfg.get("head_dim") or hidden // n_heads),
                ffn=int(cfg["intermediate_size"]),
                vocab=int(cfg["vocab_size"]),
                context_length=int(cfg.get("max_position_embeddings", 2048)),
                rope_theta=float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_scaling=_rope_from_hf(cfg.get("rope_scaling") or cfg.get("rope_parameters"), where),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_id=_first_id(cfg.get("bos_token_id")),
                eos_id=_first_id(cfg.get("eos_token_id")),
                name=str(cfg.get("_name_or_path") or "model"),
            )
        except KeyError as e:
            raise ModelFileError(f"{where}: missing key {e.args[0]!r}") from None
        c.validate(where)
        return c

    def to_hf(self) -> dict:
        rs = self.rope_scaling
        if rs.get("type", "none") == "none":
            hf_rs = None
        elif rs["type"] == "linear":
            hf_rs = {"rope_type": "linear", "factor": rs["factor"]}
        else:
            hf_rs = {"rope_type": "llama3", "factor": rs["factor"], "low_freq_factor": rs["low_freq_factor"],
                     "high_freq_factor": rs["high_freq_factor"],
                     "original_max_position_embeddings": rs["original_context_length"]}
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "intermediate_size": self.ffn, "vocab_size": self.vocab,
            "max_position_embeddings": self.context_length, "rope_theta": self.rope_theta,
            "rope_scaling": hf_rs, "rms_norm_eps": self.rms_eps, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False,
            # The file quantizes the LM head as its own linear, so an export is never tied.
            "tie_word_embeddings": False,
            "bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "torch_dtype": "float32",
        }


def _first_id(v):
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return None if v is None else int(v)


def _rope_from_hf(rs: dict | None, where: str) -> dict:
    if not rs:
        return {"type": "none"}
    t = rs.get("rope_type", rs.get("type", "default"))
    if t in ("default", None):
        return {"type": "none"}
    if t == "linear":
        return {"type": "linear", "factor": float(rs["factor"])}
    if t == "llama3":
        return {"type": "llama3", "factor": float(rs["factor"]), "low_freq_factor": float(rs["low_freq_factor"]),
                "high_freq_factor": float(rs["high_freq_factor"]),
                "original_context_length": int(rs["original_max_position_embeddings"])}
    raise ModelFileError(f"{where}: unsupported rope scaling {t!r} (supported: default, linear, llama3)")


@dataclass
class TokenizerData:
    """What the file carries to rebuild the tokenizer."""

    model: str                         # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    token_types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    chat_template: str | None = None
    hf_json: str | None = None         # tokenizer.json, when the source had one or could build one
    sp_model: bytes | None = None      # SentencePiece model proto (llama family from tokenizer.model)


# GPT-2's pre-tokenizer regex, as `tokenizers`' ByteLevel(use_regex=True) runs it.
GPT2_PRE_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def native_tokenizer_meta(tok: TokenizerData) -> dict:
    """The keys the C++ tokenizer reads besides the GGUF vocabulary (docs/format.md).

    A tokenizer.json is a program for `tokenizers`; the C++ side runs the subset real byte-level
    BPE models use (ByteLevel / Split / Digits pre-tokenizers, no normalizer, ByteLevel decoder).
    Anything else is recorded as `flexquant.tokenizer.native_unsupported` so C++ says why.
    """
    import json

    if tok.model == "llama":
        return {"tokenizer.ggml.add_bos_token": True}  # the Llama-2 convention Python follows
    if tok.hf_json is None:
        return {}
    spec = json.loads(tok.hf_json)
    regexes: list[str] = []
    flags = {"flexquant.tokenizer.add_prefix_space": False}

    def unsupported(what: str) -> dict:
        return {"flexquant.tokenizer.native_unsupported": what}

    def pre(p) -> str | None:
        t = p.get("type")
        if t == "Sequence":
            return next((e for e in map(pre, p["pretokenizers"]) if e), None)
        if t == "ByteLevel":
            flags["flexquant.tokenizer.add_prefix_space"] = bool(p.get("add_prefix_space"))
            if p.get("use_regex", True):
                regexes.append(GPT2_PRE_REGEX)
            return None
        if t == "Split":
            pat = p["pattern"]
            if p.get("behavior") != "Isolated" or p.get("invert"):
                return f"Split pre-tokenizer with behavior {p.get('behavior')!r}, invert={p.get('invert')}"
            regexes.append(pat["Regex"] if "Regex" in pat else __import__("re").escape(pat["String"]))
            return None
        if t == "Digits":  # is_numeric() chars, one per piece or in runs
            regexes.append(r"\p{N}" if p.get("individual_digits") else r"\p{N}+")
            return None
        return f"pre-tokenizer {t!r}"

    if spec.get("normalizer") is not None:
        return unsupported(f"normalizer {spec['normalizer'].get('type')!r}")
    why = pre(spec.get("pre_tokenizer") or {"type": "none"})
    if why:
        return unsupported(why)
    model = spec.get("model", {})
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return unsupported("BPE byte_fallback / subword prefix or suffix")
    dec = spec.get("decoder") or {}
    if dec.get("type") != "ByteLevel":
        return unsupported(f"decoder {dec.get('type')!r}")
    for a in spec.get("added_tokens", []):
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            return unsupported(f"added token {a['content']!r} with lstrip/rstrip/single_word")
    add_bos = False
    procs = [spec.get("post_processor") or {}]
    while procs:
        pp = procs.pop()
        if pp.get("type") == "Sequence":
            procs += pp["processors"]
        elif pp.get("type") == "TemplateProcessing":
            first = pp["single"][0]
            add_bos = "SpecialToken" in first and tok.bos_id is not None and \
                pp["special_tokens"].get(first["SpecialToken"]["id"], {}).get("ids") == [tok.bos_id]
            if len(pp["single"]) != 1 + add_bos or "Sequence" not in pp["single"][-1]:
                return unsupported("a post-processor template other than [BOS] $A")
        elif pp.get("type") not in (None, "ByteLevel"):
            return unsupported(f"post-processor {pp.get('type')!r}")
    return {"flexquant.tokenizer.pre_regex": regexes, **flags,
            "flexquant.tokenizer.ignore_merges": bool(model.get("ignore_merges")),
            "tokenizer.ggml.add_bos_token": add_bos}


# ----------------------------------------------------------------------------------------------
# GGUF names
# ----------------------------------------------------------------------------------------------

def linear_names(cfg: LlamaConfig) -> list[str]:
    """Every bit-plane linear's base name, in file order."""
    names = [f"blk.{i}.{l}" for i in range(cfg.n_layers) for l in LAYER_LINEARS]
    return names + ["output"]


def linear_shape(cfg: LlamaConfig, name: str) -> tuple[int, int]:
    return cfg.linear_shapes()[name.split(".")[-1]]


def hf_name(cfg: LlamaConfig, gguf_name: str) -> str:
    """Hugging Face parameter name that feeds a file tensor (canonical names of the converter)."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name.startswith("output."):
        return "lm_head.weight"
    _, i, part = gguf_name.split(".", 2)
    if part.startswith("attn_norm"):
        return f"model.layers.{i}.input_layernorm.weight"
    if part.startswith("ffn_norm"):
        return f"model.layers.{i}.post_attention_layernorm.weight"
    return f"model.layers.{i}.{HF_LINEAR_NAMES[part.split('.')[0]]}.weight"


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------

@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]
    heavy: bool = False  # a linear's planes: made ahead on the worker threads when there are several


def write_model(path: str | os.PathLike, cfg: LlamaConfig, tok: TokenizerData,
                load: Callable[[str], np.ndarray], *, max_bits: int = 8, group_size: int = 128,
                embed_dtype: str = "f16", source: str = "", progress: bool = True,
                transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
                quantize: Callable[[str, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
                workers: int = 1) -> None:
    """Write a model file.

    `load(hf_name)` returns a float32 numpy array of the Hugging Face parameter (canonical
    orientation: linears (out, in)); `lm_head.weight` is only asked for when the model is untied.
    `transform(name, a)` (optional) rewrites a norm weight (file tensor name) or a linear weight
    (file base name, e.g. `blk.0.attn_q`) before it is stored or quantized.
    `quantize(name, w)` (optional) replaces `bitplane.quantize_to_planes` for the linear `name`:
    it returns (planes (max_bits, plane_bytes) uint8, qparams (N, n_groups, 2) float16).
    `workers` > 1 quantizes that many linears at once on threads (numpy releases the GIL in the
    heavy parts), written in file order; only for a `load` (and `transform`, `quantize`) that is
    safe to call from several threads at once.
    """
    import gguf  # lazy: conversion-only dependency

    cfg.validate(str(path))
    bitplane.LinearShape(1, 1, max_bits, group_size)  # validates bits and group size
    if embed_dtype not in ("f16", "f32"):
        raise ValueError(f"embed_dtype must be 'f16' or 'f32', got {embed_dtype!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")

    plan: list[_Planned] = []
    edt = np.dtype(np.float16 if embed_dtype == "f16" else np.float32)

    def vec(hfn: str, n: int, name: str) -> Callable[[], np.ndarray]:
        def make():
            a = _checked(load(hfn), (n,), hfn).astype(np.float32)
            return a if transform is None else transform(name, a)
        return make

    plan.append(_Planned("token_embd.weight", (cfg.vocab, cfg.hidden), edt,
                         lambda: _checked(load("model.embed_tokens.weight"), (cfg.vocab, cfg.hidden),
                                          "model.embed_tokens.weight").astype(edt)))
    plan.append(_Planned("output_norm.weight", (cfg.hidden,), np.dtype(np.float32),
                         vec("model.norm.weight", cfg.hidden, "output_norm.weight")))
    for i in range(cfg.n_layers):
        plan.append(_Planned(f"blk.{i}.attn_norm.weight", (cfg.hidden,), np.dtype(np.float32),
                             vec(f"model.layers.{i}.input_layernorm.weight", cfg.hidden,
                                 f"blk.{i}.attn_norm.weight")))
        plan.append(_Planned(f"blk.{i}.ffn_norm.weight", (cfg.hidden,), np.dtype(np.float32),
                             vec(f"model.layers.{i}.post_attention_layernorm.weight", cfg.hidden,
                                 f"blk.{i}.ffn_norm.weight")))
    quantized: dict[str, tuple] = {}
    for lname in linear_names(cfg):
        n, k = linear_shape(cfg, lname)
        ls = bitplane.LinearShape(n, k, max_bits, group_size)
        hfn = "model.embed_tokens.weight" if (lname == "output" and cfg.tie_word_embeddings) else hf_name(cfg, lname + ".")

        def make_planes(lname=lname, hfn=hfn, n=n, k=k, ls=ls):
            w = _checked(load(hfn), (n, k), hfn)
            if transform is not None:
                w = transform(lname, w)
            if quantize is None:
                planes, qp = bitplane.quantize_to_planes(w, max_bits, group_size)
            else:
                planes, qp = quantize(lname, w)
                if planes.shape != (max_bits, ls.plane_bytes) or qp.shape != (n, ls.n_groups, 2):
                    raise ValueError(f"quantize({lname}) returned shapes {planes.shape}, {qp.shape}; expected "
                                     f"{(max_bits, ls.plane_bytes)}, {(n, ls.n_groups, 2)}")
            quantized[lname] = qp
            return planes.view(np.int8)

        plan.append(_Planned(f"{lname}.planes", (max_bits, ls.plane_bytes), np.dtype(np.int8), make_planes, heavy=True))
        plan.append(_Planned(f"{lname}.qparams", (n, ls.n_groups, 2), np.dtype(np.float16),
                             lambda lname=lname: quantized.pop(lname)))

    w = gguf.GGUFWriter(None, "llama")
    w.data_alignment = ALIGNMENT
    _add_metadata(w, cfg, tok, max_bits, group_size, source)
    for p in plan:
        w.add_tensor_info(p.name, p.shape, p.dtype, int(np.prod(p.shape)) * p.dtype.itemsize)

    bar = _progress(len(plan), f"writing {path.name}", progress)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    ahead: dict[int, Future] = {}  # plan index -> its planes being made on a worker thread
    heavy = [i for i, p in enumerate(plan) if p.heavy]  # submitted in this order: heavy[:submitted]
    submitted = 0
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, p in enumerate(plan):
            if pool is not None:
                # keep `workers + 1` linears in flight from the one being written on; a qparams
                # entry (made here) follows its planes, whose worker has stored it by then
                while submitted < len(heavy) and len(ahead) <= workers:
                    ahead[heavy[submitted]] = pool.submit(plan[heavy[submitted]].make)
                    submitted += 1
            arr = np.ascontiguousarray(ahead.pop(i).result() if i in ahead else p.make())
            if arr.shape != p.shape or arr.dtype != p.dtype:
                raise ModelFileError(f"internal: tensor {p.name} is {arr.shape} {arr.dtype}, planned {p.shape} {p.dtype}")
            w.write_tensor_data(arr)
            bar.update(1)
        w.close()
        os.replace(tmp, path)
    except BaseException:
        for f in ahead.values():
            f.cancel()
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _checked(a, shape: tuple[int, ...], name: str) -> np.ndarray:
    a = np.asarray(a)
    if tuple(a.shape) != tuple(shape):
        raise ModelFileError(f"tensor {name} has shape {tuple(a.shape)}, the config implies {tuple(shape)}")
    return a.astype(np.float32, copy=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor")


def _add_metadata(w, cfg: LlamaConfig, tok: TokenizerData, max_bits: int, group_size: int, source: str) -> None:
    import gguf

    w.add_name(cfg.name)
    w.add_custom_alignment(ALIGNMENT)
    w.add_uint32("flexquant.format_version", FORMAT_VERSION)
    w.add_uint32("flexquant.max_bits", max_bits)
    w.add_uint32("flexquant.group_size", group_size)
    w.add_string("flexquant.plane_layout", PLANE_LAYOUT)
    w.add_string("flexquant.source", source or "unknown")
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.hidden)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab)
    rs = cfg.rope_scaling
    w.add_string("flexquant.rope_scaling.type", rs.get("type", "none"))
    if rs.get("type") in ("linear", "llama3"):
        w.add_float32("flexquant.rope_scaling.factor", rs["factor"])
    if rs.get("type") == "llama3":
        w.add_float32("flexquant.rope_scaling.low_freq_factor", rs["low_freq_factor"])
        w.add_float32("flexquant.rope_scaling.high_freq_factor", rs["high_freq_factor"])
        w.add_uint32("flexquant.rope_scaling.original_context_length", rs["original_context_length"])
    w.add_bool("flexquant.tie_word_embeddings", cfg.tie_word_embeddings)

    if len(tok.tokens) != cfg.vocab:
        raise ModelFileError(f"tokenizer has {len(tok.tokens)} tokens, the model's vocabulary is {cfg.vocab}")
    w.add_tokenizer_model(tok.model)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types)
    if tok.merges:
        w.add_token_merges(tok.merges)
    if tok.scores is not None:
        w.add_token_scores(tok.scores)
    bos = tok.bos_id if tok.bos_id is not None else cfg.bos_id
    eos = tok.eos_id if tok.eos_id is not None else cfg.eos_id
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    if tok.hf_json is not None:
        w.add_string("flexquant.tokenizer.hf_json", tok.hf_json)
    if tok.sp_model is not None:
        w.add_array("flexquant.tokenizer.sp_model", bytes(tok.sp_model))
    for key, value in native_tokenizer_meta(tok).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    _ = gguf  # keep the import local to conversion


# ----------------------------------------------------------------------------------------------
# Python reader (conversion, export and tests; the engine uses the C++ loader)
# ----------------------------------------------------------------------------------------------

class ModelReader:
    """Reads a model file with the `gguf` package. Tensors are views of a memory map."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        try:
            self._r = gguf.GGUFReader(str(path), "r")
        except Exception as e:  # gguf raises ValueError/struct.error/IndexError on bad files
            raise ModelFileError(f"{path}: not a readable GGUF file: {e}") from None
        ver = self.field("flexquant.format_version")
        if ver is None:
            raise ModelFileError(f"{path}: not a flexquant model file (no flexquant.format_version)")
        if ver != FORMAT_VERSION:
            raise ModelFileError(f"{path}: unsupported flexquant format version {ver} (this reader knows {FORMAT_VERSION})")
        self.max_bits = int(self.field("flexquant.max_bits"))
        self.group_size = int(self.field("flexquant.group_size"))
        self._tensors = {t.name: t for t in self._r.tensors}
        self.config = self._config()

    def field(self, key: str):
        f = self._r.get_field(key)
        if f is None:
            return None
        v = f.contents()
        if isinstance(v, list) and f.types and f.types[-1].name == "UINT8" and key.endswith("sp_model"):
            return bytes(v)
        return v

    def _config(self) -> LlamaConfig:
        g = self.field
        rs_type = g("flexquant.rope_scaling.type") or "none"
        rs: dict = {"type": rs_type}
        if rs_type in ("linear", "llama3"):
            rs["factor"] = float(g("flexquant.rope_scaling.factor"))
        if rs_type == "llama3":
            rs["low_freq_factor"] = float(g("flexquant.rope_scaling.low_freq_factor"))
            rs["high_freq_factor"] = float(g("flexquant.rope_scaling.high_freq_factor"))
            rs["original_context_length"] = int(g("flexquant.rope_scaling.original_context_length"))
        cfg = LlamaConfig(
            hidden=int(g("llama.embedding_length")), n_layers=int(g("llama.block_count")),
            n_heads=int(g("llama.attention.head_count")), n_kv_heads=int(g("llama.attention.head_count_kv")),
            head_dim=int(g("llama.attention.key_length")), ffn=int(g("llama.feed_forward_length")),
            vocab=int(g("llama.vocab_size")), context_length=int(g("llama.context_length")),
            rope_theta=float(g("llama.rope.freq_base")), rms_eps=float(g("llama.attention.layer_norm_rms_epsilon")),
            rope_scaling=rs, tie_word_embeddings=bool(g("flexquant.tie_word_embeddings")),
            bos_id=g("tokenizer.ggml.bos_token_id"), eos_id=g("tokenizer.ggml.eos_token_id"),
            name=str(g("general.name") or "model"),
        )
        cfg.validate(str(self.path))
        return cfg

    def tokenizer(self) -> TokenizerData:
        g = self.field
        return TokenizerData(
            model=g("tokenizer.ggml.model"), tokens=list(g("tokenizer.ggml.tokens")),
            token_types=list(g("tokenizer.ggml.token_type")), merges=list(g("tokenizer.ggml.merges") or []),
            scores=g("tokenizer.ggml.scores"), bos_id=g("tokenizer.ggml.bos_token_id"),
            eos_id=g("tokenizer.ggml.eos_token_id"), chat_template=g("tokenizer.chat_template"),
            hf_json=g("flexquant.tokenizer.hf_json"), sp_model=g("flexquant.tokenizer.sp_model"),
        )

    def tensor(self, name: str) -> np.ndarray:
        t = self._tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path}: missing tensor {name!r}")
        a = t.data
        if a.dtype == np.int8:
            a = a.view(np.uint8)
        return a.reshape(tuple(int(x) for x in reversed(t.shape)))

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def linear(self, name: str):
        """(planes (B, plane_bytes) uint8, qparams (N, G, 2) f16, N, K) of a linear base name."""
        n, k = linear_shape(self.config, name)
        return self.tensor(f"{name}.planes"), self.tensor(f"{name}.qparams"), n, k

    def dequantize(self, name: str, bits: int) -> np.ndarray:
        planes, qp, n, k = self.linear(name)
        return bitplane.dequantize_planes(planes, qp, n, k, bits, self.max_bits, self.group_size)

    def bytes_per_token(self, bits: int) -> int:
        """Weight bytes one decoded token reads at k bits: every linear's first k planes and its
        group parameters, one embedding row and the norms."""
        total = 0
        for name in linear_names(self.config):
            n, k = linear_shape(self.config, name)
            total += bitplane.LinearShape(n, k, self.max_bits, self.group_size).bytes_at(bits)
        emb = self.tensor("token_embd.weight")
        total += emb.shape[1] * emb.dtype.itemsize
        total += (2 * self.config.n_layers + 1) * self.config.hidden * 4
        return total


def iter_hf_tensors(reader: ModelReader, bits: int) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, float32 array) of the k-bit view of a model file, tensor by tensor."""
    cfg = reader.config
    yield "model.embed_tokens.weight", reader.tensor("token_embd.weight").astype(np.float32)
    yield "model.norm.weight", reader.tensor("output_norm.weight").astype(np.float32)
    for i in range(cfg.n_layers):
        yield f"model.layers.{i}.input_layernorm.weight", reader.tensor(f"blk.{i}.attn_norm.weight").astype(np.float32)
        yield f"model.layers.{i}.post_attention_layernorm.weight", reader.tensor(f"blk.{i}.ffn_norm.weight").astype(np.float32)
        for l in LAYER_LINEARS:
            yield hf_name(cfg, f"blk.{i}.{l}."), reader.dequantize(f"blk.{i}.{l}", bits)
    yield "lm_head.weight", reader.dequantize("output", bits)


__all__: Sequence[str] = [
    "FORMAT_VERSION", "LAYER_LINEARS", "LlamaConfig", "TokenizerData", "ModelFileError", "ModelReader",
    "write_model", "linear_names", "linear_shape", "iter_hf_tensors",
]


def set_metadata(path: str | os.PathLike, values: dict[str, str]) -> None:
    """Add or replace string metadata (e.g. the calibration section) of a model file.

    GGUF keeps metadata before the tensor data, so the file is rewritten: streamed tensor by
    tensor into a temporary file (gguf's own copy routine), then renamed over the original.
    """
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    path = Path(path)
    reader = ModelReader(path)._r  # validates that this is a flexquant file
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.data_alignment = ALIGNMENT
    new = {k: MetadataDetails(gguf.GGUFValueType.STRING, v) for k, v in values.items()}
    try:
        copy_with_new_metadata(reader, writer, new, [])
        del reader
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
