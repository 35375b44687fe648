"""The C++ loader and dequantize op (flexquant_rt._core) against the gguf package and numpy.

Model files are written with the project's writer (flexquant_rt.model_file.write_model) into
tmp_path; corrupt variants are made by patching the bytes of a valid file, so every check of the
loader is hit by exactly the defect it is meant to catch. Every bad file must raise FlexquantError
whose message starts with the path: never a crash, never another exception type.
"""
from __future__ import annotations

import ast
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest

import flexquant_rt._core as core
from flexquant_rt import bitplane
from flexquant_rt import model_file as mf
from flexquant_rt._core import FlexquantError, LinearKind, ModelFile

# Deliberately awkward shapes: N % 8 != 0 for every linear (108, 36, 300, 77), K = 300 and 108
# (not multiples of 128) and 576 (a last super-chunk of 64 columns... padded to 128).
BASE = dict(hidden=300, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=36, ffn=576, vocab=77,
            context_length=256, rope_theta=10000.0, rms_eps=1e-5)
KINDS = [LinearKind.LINEAR_Q, LinearKind.LINEAR_K, LinearKind.LINEAR_V, LinearKind.LINEAR_O,
         LinearKind.LINEAR_GATE, LinearKind.LINEAR_UP, LinearKind.LINEAR_DOWN]


def hf_shapes(cfg: mf.LlamaConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (cfg.vocab, cfg.hidden), "model.norm.weight": (cfg.hidden,),
              "lm_head.weight": (cfg.vocab, cfg.hidden)}
    for i in range(cfg.n_layers):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (cfg.hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (cfg.hidden,)
    for name in mf.linear_names(cfg)[:-1]:
        shapes[mf.hf_name(cfg, name + ".")] = mf.linear_shape(cfg, name)
    return shapes


def make_model(path: Path, *, max_bits: int = 8, group_size: int = 64, embed_dtype: str = "f16",
               seed: int = 0, **overrides) -> mf.LlamaConfig:
    """Write a random model with the project's writer; returns its config."""
    cfg = mf.LlamaConfig(**{**BASE, **overrides})
    rng = np.random.default_rng(seed)
    shapes = hf_shapes(cfg)
    cache: dict[str, np.ndarray] = {}

    def load(name: str) -> np.ndarray:
        if name not in cache:
            w = (rng.standard_normal(shapes[name]) * 0.05).astype(np.float32)
            if w.ndim == 2:
                w[0, :group_size] = 0.25  # a constant group: scale 0
            cache[name] = w
        return cache[name]

    tok = mf.TokenizerData(model="gpt2", tokens=[f"<t{i}>" for i in range(cfg.vocab)],
                           token_types=[1] * cfg.vocab, bos_id=1, eos_id=2)
    mf.write_model(path, cfg, tok, load, max_bits=max_bits, group_size=group_size,
                   embed_dtype=embed_dtype, progress=False)
    return cfg


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cpp_loader") / "model.fq"
    make_model(p)
    return p


# ---- byte-level editing of a valid file ---------------------------------------------------------

def gguf_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def find_once(data: bytes, needle: bytes) -> int:
    i = data.find(needle)
    assert i >= 0 and data.find(needle, i + 1) < 0, needle
    return i


def kv_value_pos(data: bytes, key: str) -> int:
    """File offset of the value of metadata `key` (after its type code)."""
    return find_once(data, gguf_str(key)) + len(gguf_str(key)) + 4


def tensor_info_pos(data: bytes, name: str) -> dict[str, int]:
    """File offsets of the fields of tensor `name`'s info record."""
    p = find_once(data, gguf_str(name)) + len(gguf_str(name))
    n_dims = struct.unpack_from("<I", data, p)[0]
    return {"n_dims": p, "dims": p + 4, "type": p + 4 + 8 * n_dims, "offset": p + 4 + 8 * n_dims + 4}


def patched(src: Path, dst: Path, pos: int, fmt: str, value) -> Path:
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, pos, value)
    dst.write_bytes(bytes(data))
    return dst


# GGUF value types (docs: gguf.GGUFValueType)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
              U64: "<Q", I64: "<q", F64: "<d"}


def gguf_value(vtype: int, value) -> bytes:
    """Serialize a GGUF value (no type code). Arrays: value = (element type, [items])."""
    if vtype == STR:
        return gguf_str(value)
    if vtype == ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(gguf_value(etype, x) for x in items)
    return struct.pack(SCALAR_FMT[vtype], value)


def with_extra_kv(src: Path, dst: Path, entries: list[tuple[str, int, object]], raw: bytes = b"") -> Path:
    """Copy `src` with metadata entries (key, type, value) inserted before the others. The inserted
    bytes are padded (with one more string entry) to a multiple of the 64-byte alignment so the data
    section moves by whole alignment units and every tensor offset stays valid."""
    data = src.read_bytes()
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    body = b"".join(gguf_str(k) + struct.pack("<I", t) + gguf_value(t, v) for k, t, v in entries) + raw
    n_entries = len(entries) + (1 if raw else 0)
    pad_entry_len = len(gguf_str("test.pad")) + 4 + 8
    pad = (-(len(body) + pad_entry_len)) % mf.ALIGNMENT
    body += gguf_str("test.pad") + struct.pack("<I", STR) + gguf_str("x" * pad)
    header = data[:8] + struct.pack("<QQ", n_tensors, n_kv + n_entries + 1)
    dst.write_bytes(header + body + data[24:])
    return dst


def assert_error(path: Path, *needles: str) -> str:
    with pytest.raises(FlexquantError) as e:
        ModelFile(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    for n in needles:
        assert n in msg, msg
    return msg


# ---- a valid file -------------------------------------------------------------------------------

def test_config_and_sizes_match_the_python_reader(model_path):
    m = ModelFile(model_path)
    ref = mf.ModelReader(model_path)
    c = m.config
    for key, ref_key in [("hidden", "hidden"), ("n_layers", "n_layers"), ("n_heads", "n_heads"),
                         ("n_kv_heads", "n_kv_heads"), ("head_dim", "head_dim"), ("ffn", "ffn"),
                         ("vocab", "vocab"), ("context_length", "context_length")]:
        assert c[key] == getattr(ref.config, ref_key), key
    assert c["rms_norm_eps"] == np.float32(ref.config.rms_eps)
    assert c["rope_theta"] == np.float32(ref.config.rope_theta)
    assert c["rope_scaling"]["type"] == "none"
    assert (c["max_bits"], c["group_size"], c["format_version"]) == (8, 64, 1)
    assert (c["architecture"], c["plane_layout"], c["name"]) == ("llama", "tc8x512", "model")
    assert (c["bos_token_id"], c["eos_token_id"], c["tie_word_embeddings"]) == (1, 2, False)
    assert m.path == str(model_path)
    assert m.file_size == model_path.stat().st_size
    assert m.tensor_names() == ref.tensor_names()
    for bits in range(2, 9):
        assert m.bytes_per_token(bits) == ref.bytes_per_token(bits), bits
    for bad in (1, 9):
        with pytest.raises(FlexquantError, match=f"bit-width {bad} "):
            m.bytes_per_token(bad)


def test_tensors_are_zero_copy_views_equal_to_gguf(model_path):
    m = ModelFile(model_path)
    reader = gguf.GGUFReader(str(model_path))
    expected_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
                      gguf.GGMLQuantizationType.I8: np.uint8}
    for t in reader.tensors:
        a = m.tensor(t.name)
        ref = np.asarray(t.data).reshape(tuple(int(x) for x in reversed(t.shape)))
        assert a.dtype == expected_dtype[t.tensor_type], t.name
        assert a.shape == ref.shape, t.name
        assert a.tobytes() == ref.tobytes(), t.name
        assert not a.flags.writeable and not a.flags.owndata and a.flags.c_contiguous
    assert m.has_tensor("output.planes") and not m.has_tensor("nope")
    with pytest.raises(FlexquantError, match="no tensor named 'nope'"):
        m.tensor("nope")
    # The view keeps the mapping alive after the ModelFile is gone.
    planes = m.tensor("blk.1.ffn_down.planes")
    copy = planes.copy()
    del m
    import gc
    gc.collect()
    assert np.array_equal(planes, copy)
    with pytest.raises(ValueError):
        planes[0, 0] = 1  # read-only mapping: refused by numpy, not a crash


@pytest.mark.parametrize("max_bits,group_size", [(8, 32), (8, 64), (8, 128), (5, 64), (3, 128), (2, 32)])
def test_dequantize_matches_numpy_exactly(tmp_path, max_bits, group_size):
    path = tmp_path / "m.fq"
    cfg = make_model(path, max_bits=max_bits, group_size=group_size, seed=max_bits * 1000 + group_size,
                     n_layers=1)
    m = ModelFile(path)
    ref = mf.ModelReader(path)
    for name in mf.linear_names(cfg):
        planes, qparams, n, k = ref.linear(name)
        for bits in range(2, max_bits + 1):
            want = bitplane.dequantize_planes(planes, qparams, n, k, bits, max_bits, group_size)
            got = m.dequantize(name, bits)
            assert got.dtype == np.float32 and got.shape == (n, k)
            assert np.array_equal(got, want), (name, bits, np.abs(got - want).max())
    for kind, stem in zip(KINDS, mf.LAYER_LINEARS):
        assert np.array_equal(m.dequantize(0, kind, 2), m.dequantize(f"blk.0.{stem}", 2))


def test_dequantize_bits_out_of_range(model_path):
    m = ModelFile(model_path)
    for bad in (0, 1, 9):
        with pytest.raises(FlexquantError, match=f"blk.0.attn_q: bit-width {bad} is outside 2..8"):
            m.dequantize("blk.0.attn_q", bad)
    with pytest.raises(FlexquantError, match="layer 2 is outside 0..1"):
        m.dequantize(2, LinearKind.LINEAR_Q, 4)
    with pytest.raises(FlexquantError, match="no linear named 'blk.0.attn'"):
        m.dequantize("blk.0.attn", 4)


def test_linear_info(model_path):
    m = ModelFile(model_path)
    for layer in range(2):
        for kind, stem in zip(KINDS, mf.LAYER_LINEARS):
            info = m.linear_info(layer, kind)
            assert info == m.linear_info(f"blk.{layer}.{stem}")
            n, k = mf.linear_shape(mf.LlamaConfig(**BASE), stem)
            ls = bitplane.LinearShape(n, k, 8, 64)
            assert info["name"] == f"blk.{layer}.{stem}"
            assert (info["n"], info["k"], info["n_pad"], info["k_pad"], info["n_groups"]) == \
                (n, k, ls.n_pad, ls.k_pad, ls.n_groups)
            assert info["plane_bytes"] == ls.plane_bytes
            assert info["bytes_at"] == {b: ls.bytes_at(b) for b in range(2, 9)}
    head = m.lm_head_info()
    assert head == m.linear_info("output")
    assert (head["n"], head["k"]) == (77, 300)


def test_metadata_values(model_path, tmp_path):
    sp = bytes(range(256)) * 3
    entries = [
        ("t.u8", U8, 250), ("t.i8", I8, -5), ("t.u16", U16, 65000), ("t.i16", I16, -30000),
        ("t.u32", U32, 4_000_000_000), ("t.i32", I32, -2_000_000_000), ("t.f32", F32, 0.5),
        ("t.bool", BOOL, 1), ("t.str", STR, "héllo"), ("t.u64", U64, 2**63 + 5), ("t.i64", I64, -(2**62)),
        ("t.f64", F64, 1e300), ("t.bad_utf8", STR, b"a\xffb"),
        ("t.sp", ARR, (U8, list(sp))), ("t.i32s", ARR, (I32, [1, -2, 3])), ("t.bools", ARR, (BOOL, [1, 0])),
        ("t.f64s", ARR, (F64, [0.25, -1.5])), ("t.strs", ARR, (STR, ["a", "", "ccc"])),
        ("t.nested", ARR, (ARR, [(U16, [1, 2]), (STR, ["x"]), (ARR, [(I8, [-1])])])),
        ("t.empty", ARR, (U32, [])),
    ]
    m = ModelFile(with_extra_kv(model_path, tmp_path / "meta.fq", entries))
    assert m.meta("t.u8") == 250 and m.meta("t.i8") == -5 and m.meta("t.u16") == 65000
    assert m.meta("t.i16") == -30000 and m.meta("t.u32") == 4_000_000_000
    assert m.meta("t.i32") == -2_000_000_000 and m.meta("t.f32") == 0.5 and m.meta("t.bool") is True
    assert m.meta("t.str") == "héllo" and m.meta("t.u64") == 2**63 + 5 and m.meta("t.i64") == -(2**62)
    assert m.meta("t.f64") == 1e300
    assert m.meta("t.bad_utf8").encode("utf-8", "surrogateescape") == b"a\xffb"
    a = m.meta("t.sp")
    assert a.dtype == np.uint8 and a.tobytes() == sp
    assert m.meta("t.i32s").tolist() == [1, -2, 3] and m.meta("t.i32s").dtype == np.int32
    assert m.meta("t.bools").tolist() == [True, False]
    assert m.meta("t.f64s").tolist() == [0.25, -1.5]
    assert m.meta("t.strs") == ["a", "", "ccc"]
    nested = m.meta("t.nested")
    assert nested[0].tolist() == [1, 2] and nested[1] == ["x"] and nested[2][0].tolist() == [-1]
    assert m.meta("t.empty").size == 0
    assert m.meta("absent") is None
    # the writer's own keys
    assert m.meta("tokenizer.ggml.tokens") == [f"<t{i}>" for i in range(77)]
    assert m.meta("flexquant.max_bits") == 8 and m.meta("general.alignment") == 64
    keys = m.meta_keys()
    assert keys[0] == "t.u8" and "flexquant.format_version" in keys
    assert m.config["hidden"] == 300  # the shifted data section still lines up


def test_real_writer_options(tmp_path):
    """llama3 rope scaling, tied embeddings, F32 embedding: the config and shapes the writer emits."""
    rs = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_context_length": 8192}
    path = tmp_path / "m.fq"
    make_model(path, embed_dtype="f32", rope_scaling=rs, tie_word_embeddings=True, n_layers=1)
    m = ModelFile(path)
    assert m.config["rope_scaling"] == rs
    assert m.config["tie_word_embeddings"] is True
    assert m.tensor("token_embd.weight").dtype == np.float32
    ref = mf.ModelReader(path)
    assert all(m.bytes_per_token(b) == ref.bytes_per_token(b) for b in range(2, 9))


def test_converted_smollm2(smollm2_fq):
    """A real conversion (SmolLM2-135M, real tokenizer): the C++ view agrees with the Python reader."""
    m = ModelFile(smollm2_fq)
    ref = mf.ModelReader(smollm2_fq)
    c = m.config
    assert (c["n_layers"], c["hidden"], c["vocab"], c["tie_word_embeddings"]) == (30, 576, 49152, True)
    assert (c["bos_token_id"], c["eos_token_id"]) == (ref.config.bos_id, ref.config.eos_id)
    assert m.meta("tokenizer.ggml.tokens") == list(ref.field("tokenizer.ggml.tokens"))
    assert m.meta("flexquant.tokenizer.hf_json") == ref.field("flexquant.tokenizer.hf_json")
    assert all(m.bytes_per_token(b) == ref.bytes_per_token(b) for b in range(2, 9))
    for name in ("blk.0.attn_q", "blk.29.ffn_down", "output"):
        for bits in (2, 5, 8):
            assert np.array_equal(m.dequantize(name, bits), ref.dequantize(name, bits)), (name, bits)


# ---- bad files: each defect raises FlexquantError naming the file and the problem -----------------

def test_missing_and_non_regular_files(tmp_path):
    with pytest.raises(FlexquantError, match="cannot open"):
        ModelFile(tmp_path / "absent.fq")
    with pytest.raises(FlexquantError, match="not a regular file"):
        ModelFile(tmp_path)
    (tmp_path / "empty.fq").write_bytes(b"")
    assert_error(tmp_path / "empty.fq", "empty")


def test_truncated_files(model_path, tmp_path):
    data = model_path.read_bytes()
    first_tensor = tensor_info_pos(data, "token_embd.weight")["n_dims"]
    data_end = max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(str(model_path)).tensors)
    cuts = [1, 3, 4, 7, 8, 15, 23, 24, 30, 100, first_tensor - 3, first_tensor + 5,
            first_tensor + 300, len(data) // 2, data_end - 1]
    for cut in cuts:
        p = tmp_path / f"cut{cut}.fq"
        p.write_bytes(data[:cut])
        msg = assert_error(p)
        assert any(w in msg for w in ("truncated", "exceeds the file", "not a GGUF file")), msg


def test_bad_magic_and_versions(model_path, tmp_path):
    data = model_path.read_bytes()
    (tmp_path / "magic.fq").write_bytes(b"GGUX" + data[4:])
    assert_error(tmp_path / "magic.fq", "not a GGUF file", "'GGUX'")
    assert_error(patched(model_path, tmp_path / "v2.fq", 4, "<I", 2), "GGUF version 2")
    pos = kv_value_pos(data, "flexquant.format_version")
    assert_error(patched(model_path, tmp_path / "fq2.fq", pos, "<I", 2), "flexquant.format_version 2")
    # a GGUF file that is not a flexquant file at all
    w = gguf.GGUFWriter(str(tmp_path / "plain.gguf"), "llama")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_error(tmp_path / "plain.gguf", "not a flexquant model file")


def test_bad_tensor_infos(model_path, tmp_path):
    data = model_path.read_bytes()
    size = len(data)
    q = tensor_info_pos(data, "blk.0.attn_q.planes")
    norm = tensor_info_pos(data, "output_norm.weight")
    cases = [
        (q["offset"], "<Q", 1 << 40, ["'blk.0.attn_q.planes'", "exceeds the file", f"({size} bytes)"]),
        (q["offset"], "<Q", 2**64 - 64, ["'blk.0.attn_q.planes'", "exceeds the file"]),
        (q["offset"], "<Q", 64 * 3 + 1, ["'blk.0.attn_q.planes'", "not a multiple of the alignment 64"]),
        (q["dims"], "<Q", 2**62, ["'blk.0.attn_q.planes'", "overflows"]),
        (q["dims"] + 8, "<Q", 2**62, ["'blk.0.attn_q.planes'", "overflows"]),
        (norm["dims"], "<Q", 2**62, ["'output_norm.weight'", "overflows"]),
        (norm["dims"], "<Q", 0, ["'output_norm.weight'", "zero dimension"]),
        (norm["dims"], "<Q", 299, ["'output_norm.weight' has shape (299,), expected (300,)"]),
        (norm["n_dims"], "<I", 5, ["'output_norm.weight' has 5 dimensions"]),
        (norm["n_dims"], "<I", 0, ["'output_norm.weight' has 0 dimensions"]),
        (norm["type"], "<I", 1, ["'output_norm.weight' has type F16, expected F32"]),
        (norm["type"], "<I", 2, ["'output_norm.weight' has unsupported type 2"]),
        (q["type"], "<I", 0, ["'blk.0.attn_q.planes'"]),  # F32: 4x the bytes, or the wrong type
    ]
    for i, (pos, fmt, value, needles) in enumerate(cases):
        assert_error(patched(model_path, tmp_path / f"t{i}.fq", pos, fmt, value), *needles)


def test_missing_duplicate_and_mistyped_tensors(model_path, tmp_path):
    data = model_path.read_bytes()
    for old, new, needle in [
        (b"blk.1.ffn_norm.weight", b"blk.1.ffn_norX.weight", "missing tensor 'blk.1.ffn_norm.weight'"),
        (b"blk.1.attn_norm.weight", b"blk.0.attn_norm.weight", "duplicate tensor name 'blk.0.attn_norm.weight'"),
        (b"output.qparams", b"output.qparamz", "missing tensor 'output.qparams'"),
        (b"output.qparams", b"output.qparam\xc0", "tensor 'output.qparam\\xc0' name is not valid UTF-8"),
    ]:
        p = tmp_path / "renamed.fq"
        p.write_bytes(data.replace(gguf_str(old), gguf_str(new)))
        assert_error(p, needle)


def test_bad_config_values(model_path, tmp_path):
    data = model_path.read_bytes()
    cases = [
        ("flexquant.max_bits", "<I", 9, "'flexquant.max_bits' is 9, expected 2..8"),
        ("flexquant.max_bits", "<I", 1, "'flexquant.max_bits' is 1"),
        ("flexquant.group_size", "<I", 48, "flexquant.group_size 48 is not a multiple of 32"),
        ("flexquant.group_size", "<I", 0, "'flexquant.group_size' is 0"),
        ("llama.attention.head_count_kv", "<I", 2, "head_count 3 is not a multiple of head_count_kv 2"),
        ("llama.attention.head_count_kv", "<I", 0, "'llama.attention.head_count_kv' is 0"),
        ("llama.embedding_length", "<I", 1 << 21, "'llama.embedding_length' is 2097152"),
        ("llama.vocab_size", "<I", 1 << 24 | 1, "'llama.vocab_size' is 16777217"),
        ("llama.block_count", "<I", 3, "missing tensor 'blk.2.attn_norm.weight'"),
        ("llama.feed_forward_length", "<I", 577, "'blk.0.ffn_gate.planes' has shape"),
        ("llama.attention.layer_norm_rms_epsilon", "<f", 0.0, "layer_norm_rms_epsilon' is 0"),
        ("llama.rope.freq_base", "<f", float("nan"), "'llama.rope.freq_base' is nan"),
        ("llama.rope.freq_base", "<f", -1.0, "'llama.rope.freq_base' is -1"),
        ("tokenizer.ggml.bos_token_id", "<I", 77, "'tokenizer.ggml.bos_token_id' is 77, expected 0..76"),
        ("general.alignment", "<I", 48, "general.alignment 48 is not a power of two"),
        ("general.alignment", "<I", 0, "general.alignment 0 is not a power of two"),
        ("flexquant.tie_word_embeddings", "<B", 2, "is a bool of value 2"),
    ]
    for i, (key, fmt, value, needle) in enumerate(cases):
        assert_error(patched(model_path, tmp_path / f"c{i}.fq", kv_value_pos(data, key), fmt, value), needle)
    # string values: same length replacements
    for i, (old, new, needle) in enumerate([
        (gguf_str("tc8x512"), gguf_str("tc8x999"), "unknown flexquant.plane_layout 'tc8x999'"),
        (struct.pack("<I", STR) + gguf_str("none"), struct.pack("<I", STR) + gguf_str("nope"),
         "unknown flexquant.rope_scaling.type 'nope'"),
        (gguf_str("general.architecture") + struct.pack("<I", STR) + gguf_str("llama"),
         gguf_str("general.architecture") + struct.pack("<I", STR) + gguf_str("gemma"),
         "general.architecture is 'gemma', expected 'llama'"),
        (gguf_str("flexquant.group_size") + struct.pack("<I", U32),
         gguf_str("flexquant.group_size") + struct.pack("<I", F32), "'flexquant.group_size' has type f32"),
    ]):
        p = tmp_path / f"s{i}.fq"
        assert data.count(old) == 1, old
        p.write_bytes(data.replace(old, new))
        assert_error(p, needle)


def test_bad_metadata_entries(model_path, tmp_path):
    def deep(depth: int):
        v = (U8, [1])
        for _ in range(depth):
            v = (ARR, [v])
        return v

    cases = [
        ([("flexquant.max_bits", U32, 8)], b"", "duplicate metadata key 'flexquant.max_bits'"),
        ([("t.bool", BOOL, 2)], b"", "metadata key 't.bool' is a bool of value 2"),
        ([("t.bools", ARR, (BOOL, [0, 1, 7]))], b"", "element 2 is a bool of value 7"),
        ([("t.deep", ARR, deep(20))], b"", "nests arrays deeper than"),
        ([], gguf_str("t.unknown") + struct.pack("<I", 13), "metadata key 't.unknown' has unknown value type 13"),
        ([], gguf_str("t.arr") + struct.pack("<IIQ", ARR, 99, 1), "array of unknown value type 99"),
        ([], gguf_str("t.str") + struct.pack("<IQ", STR, 2**63), "truncated file: metadata key 't.str'"),
        ([], gguf_str("t.arr") + struct.pack("<IIQ", ARR, U64, 2**61 + 1), "truncated file: metadata key 't.arr'"),
        ([], gguf_str("t.arr") + struct.pack("<IIQ", ARR, STR, 2**60), "truncated file: metadata key 't.arr'"),
        ([], gguf_str("t.arr") + struct.pack("<IIQ", ARR, ARR, 2**62), "truncated file: metadata key 't.arr'"),
        ([], struct.pack("<Q", 2**64 - 1), "truncated file: metadata entry"),
        ([(b"t.\xff", U8, 1)], b"", "metadata key 't.\\xff' is not valid UTF-8"),
    ]
    for i, (entries, raw, needle) in enumerate(cases):
        assert_error(with_extra_kv(model_path, tmp_path / f"m{i}.fq", entries, raw), needle)
    # counts in the header that the file cannot hold
    for i, (pos, value, needle) in enumerate([(16, 2**63, "metadata entries"), (8, 2**40, "tensors")]):
        assert_error(patched(model_path, tmp_path / f"h{i}.fq", pos, "<Q", value), needle)


def test_random_corruption_never_crashes(model_path, tmp_path):
    """Byte flips and truncations across the header, metadata and tensor infos: every variant must
    load or raise FlexquantError. Run in a child process so that a crash fails this test loudly
    instead of killing the test session."""
    data = model_path.read_bytes()
    header_end = tensor_info_pos(data, "output.qparams")["offset"] + 8
    code = textwrap.dedent(f"""
        import random, sys
        from flexquant_rt._core import ModelFile, FlexquantError
        data = open({str(model_path)!r}, "rb").read()
        rng = random.Random(1234)
        path = {str(tmp_path / "fuzz.fq")!r}
        outcomes = {{"ok": 0, "error": 0}}
        for i in range(1500):
            b = bytearray(data)
            for _ in range(rng.choice([1, 1, 2, 4, 8])):
                pos = rng.randrange({header_end})
                b[pos] = rng.choice([0, 1, 0x7f, 0x80, 0xff, rng.randrange(256)])
            if i % 7 == 0:
                b = b[:rng.randrange(len(b))]
            open(path, "wb").write(bytes(b))
            try:
                m = ModelFile(path)
                # whatever loads must be usable: every key, value and tensor
                for key in m.meta_keys():
                    m.meta(key)
                for name in m.tensor_names():
                    m.tensor(name).sum()
                m.bytes_per_token(2)
                outcomes["ok"] += 1
            except FlexquantError as e:
                assert str(e).startswith(path + ": "), str(e)
                outcomes["error"] += 1
        print(outcomes)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    outcomes = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    assert outcomes["ok"] > 0 and outcomes["error"] > 0, outcomes  # both paths were exercised


# ---- CUDA ---------------------------------------------------------------------------------------

def test_cuda_flags_are_consistent():
    assert isinstance(core.built_with_cuda(), bool) and isinstance(core.cuda_available(), bool)
    assert not core.cuda_available() or core.built_with_cuda()
    assert hasattr(core, "dequantize_cuda") == core.built_with_cuda()


@pytest.mark.skipif(not core.built_with_cuda() or core.cuda_available(),
                    reason="needs a CUDA build on a machine without a usable GPU")
def test_cuda_without_gpu_raises(model_path):
    m = ModelFile(model_path)
    with pytest.raises(FlexquantError, match="CUDA error"):
        core.dequantize_cuda(m, "blk.0.attn_q", 4)


@pytest.mark.skipif(not core.cuda_available(), reason="no CUDA device (or built without CUDA)")
@pytest.mark.parametrize("max_bits,group_size", [(8, 32), (8, 128), (5, 64), (2, 32)])
def test_cuda_dequantize_matches_cpu_exactly(tmp_path, max_bits, group_size):
    path = tmp_path / "m.fq"
    cfg = make_model(path, max_bits=max_bits, group_size=group_size, seed=7, n_layers=1)
    m = ModelFile(path)
    for name in mf.linear_names(cfg):
        for bits in range(2, max_bits + 1):
            assert np.array_equal(core.dequantize_cuda(m, name, bits), m.dequantize(name, bits)), (name, bits)
    assert np.array_equal(core.dequantize_cuda(m, 0, LinearKind.LINEAR_DOWN, 2), m.dequantize("blk.0.ffn_down", 2))
    with pytest.raises(FlexquantError, match="bit-width 9"):
        core.dequantize_cuda(m, "output", 9)
