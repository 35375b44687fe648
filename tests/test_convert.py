"""The bit-plane store's numpy reference, the converter, the export and their bad-input errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_hf_llama
from flexquant_rt import bitplane
from flexquant_rt.convert import (ALPHA_GRID, AWQ_ALPHA, GGUFSource, HFSource, ScaleFold, SyntheticSource,
                                  SYNTHETIC_PRESETS, calibration_stats, convert, export_hf, fold_scale, make_fold, open_source)
from flexquant_rt.model_file import LAYER_LINEARS, ModelFileError, ModelReader, hf_name, linear_names

REPO = Path(__file__).resolve().parents[1]


# ---- the reference quantizer ------------------------------------------------------------------

@pytest.mark.parametrize("n,k,g", [(8, 128, 32), (13, 576, 128), (24, 1536, 64), (5, 300, 128), (40, 1000, 64)])
def test_every_view_is_a_valid_k_bit_quantizer(n, k, g):
    rng = np.random.default_rng(n * 1000 + k)
    w = (rng.standard_normal((n, k)) * 0.05 + rng.standard_normal((n, 1)) * 0.01).astype(np.float32)
    w[0, :7] = 0.3  # a constant run and an outlier inside the first group
    w[1, 3] = -2.0
    codes, qp = bitplane.quantize(w, 8, g)
    planes = bitplane.pack_planes(codes, 8)
    for bits in range(2, 9):
        view = bitplane.dequantize_planes(planes, qp, n, k, bits, 8, g)
        assert np.array_equal(view, bitplane.dequantize(codes, qp, bits, 8, g))
        s_k, _ = bitplane.view_params(qp, bits, 8)
        half_step = s_k[:, np.arange(k) // g] / 2
        # fp32 arithmetic of the dequantization: a few ulps of the weight magnitude
        slack = 4 * np.finfo(np.float32).eps * (np.abs(w) + half_step)
        assert np.all(np.abs(view - w) <= half_step + slack), f"k={bits}"
        # the k-bit codes are the top bits of the B-bit codes
        assert np.array_equal(bitplane.unpack_planes(planes, n, k, 8, bits), codes >> (8 - bits))


def test_nearest_code_truncates_to_the_nearest_view_code():
    """For fixed (s, m), the nearest B-bit code's top k bits are the nearest k-bit view code: view
    -aware rounding of individual weights has nothing to gain (docs/quantization.md)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    codes, qp = bitplane.quantize(w, 8, 128)
    for bits in range(2, 9):
        s_k, m_k = bitplane.view_params(qp, bits, 8)
        cols = np.arange(256) // 128
        levels = np.arange(1 << bits, dtype=np.float32)
        grid = levels[None, None, :] * s_k[:, cols, None] + m_k[:, cols, None]
        best = np.abs(grid - w[..., None]).min(-1)
        got = np.abs(bitplane.dequantize(codes, qp, bits, 8, 128) - w)
        assert np.all(got <= best + 1e-6 * (1 + np.abs(w))), bits


def test_constant_group_is_exact():
    w = np.full((8, 128), 0.25, dtype=np.float32)
    codes, qp = bitplane.quantize(w, 8, 128)
    for bits in range(2, 9):
        assert np.array_equal(bitplane.dequantize(codes, qp, bits, 8, 128), w)


@pytest.mark.parametrize("max_bits", [8, 6, 4])
def test_plane_bytes_are_k_over_max_bits_of_the_codes(max_bits):
    shape = bitplane.LinearShape(576, 1536, max_bits, 128)
    assert shape.plane_bytes * 8 == shape.n_pad * shape.k_pad
    for bits in range(2, max_bits + 1):
        assert shape.bytes_at(bits) - shape.qparams_bytes == bits * shape.plane_bytes
        assert (bits * shape.plane_bytes) * max_bits == bits * (max_bits * shape.plane_bytes)


def test_layout_places_each_bit_where_the_doc_says():
    """One set bit per position: its storage location must follow docs/format.md."""
    n, k = 16, 640  # one full super-chunk and a 128-wide tail
    rng = np.random.default_rng(1)
    for _ in range(40):
        r, c = int(rng.integers(n)), int(rng.integers(k))
        codes = np.zeros((n, k), dtype=np.uint8)
        codes[r, c] = 1 << 7  # MSB: plane 0
        planes = bitplane.pack_planes(codes, 8)
        nz = np.flatnonzero(planes[0])
        assert planes[1:].max() == 0 and nz.size == 1
        rt, g = divmod(r, 8)
        s, rem = divmod(c, 512)
        w_ = min(4, (640 - 512 * s) // 128)
        j, rem = divmod(rem, 128)
        t, b = divmod(rem, 32)
        lane = 4 * g + t
        word = rt * (640 // 32 * 8) + s * 32 * 4 + lane * w_ + j
        assert nz[0] == word * 4 + b // 8 and planes[0, nz[0]] == 1 << (b % 8)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="max_bits"):
        bitplane.quantize(np.ones((8, 128), np.float32), 9, 128)
    with pytest.raises(ValueError, match="group_size"):
        bitplane.quantize(np.ones((8, 128), np.float32), 8, 48)
    with pytest.raises(ValueError, match="nan"):
        bitplane.quantize(np.full((8, 128), np.nan, np.float32), 8, 128)
    with pytest.raises(ValueError, match="bit-width"):
        bitplane.view_params(np.zeros((1, 1, 2), np.float16), 1, 8)


# ---- conversion of a Hugging Face checkpoint ---------------------------------------------------

def _hf_state(path: Path) -> dict[str, np.ndarray]:
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(path)
    return {k: v.detach().float().numpy() for k, v in m.state_dict().items()}


def test_tiny_hf_roundtrip_within_half_a_step(tiny_hf, tiny_fq):
    r = ModelReader(tiny_fq)
    state = _hf_state(tiny_hf)
    cfg = r.config
    assert (cfg.hidden, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn, cfg.vocab) == \
        (64, 2, 4, 2, 16, 176, 320)
    assert r.max_bits == 8 and r.group_size == 128
    np.testing.assert_array_equal(r.tensor("blk.1.attn_norm.weight"), state["model.layers.1.input_layernorm.weight"])
    np.testing.assert_array_equal(r.tensor("token_embd.weight"),
                                  state["model.embed_tokens.weight"].astype(np.float16))
    for i in range(cfg.n_layers):
        for lin, hfp in zip(LAYER_LINEARS, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")):
            w = state[f"model.layers.{i}.{hfp}.weight"]
            for bits in (8, 4, 2):
                planes, qp, n, k = r.linear(f"blk.{i}.{lin}")
                view = r.dequantize(f"blk.{i}.{lin}", bits)
                s_k, _ = bitplane.view_params(qp, bits, 8)
                assert np.all(np.abs(view - w) <= s_k[:, np.arange(k) // 128] / 2 * (1 + 1e-5) + 1e-7)
    # the file holds exactly the planes the layout needs
    for name in linear_names(cfg):
        planes, qp, n, k = r.linear(name)
        assert planes.shape == (8, bitplane.LinearShape(n, k, 8, 128).plane_bytes)


@pytest.mark.parametrize("weights", ["sharded", "bin"])
def test_sharded_and_bin_checkpoints_convert_identically(tmp_path, tiny_hf, tiny_fq, weights):
    src = make_hf_llama(tmp_path / weights, weights=weights)  # same seed as tiny_hf
    out = tmp_path / f"{weights}.fq"
    convert(HFSource(src), out, progress=False, method="plain")
    a, b = ModelReader(out), ModelReader(tiny_fq)
    for name in b.tensor_names():
        np.testing.assert_array_equal(a.tensor(name), b.tensor(name), err_msg=name)


def test_sentencepiece_tokenizer_and_llama3_rope_are_carried(tmp_path):
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    src = make_hf_llama(tmp_path / "sp", tokenizer="sp", rope_scaling=rs, tie=True, vocab=384)
    out = tmp_path / "sp.fq"
    convert(HFSource(src), out, progress=False, max_bits=6, group_size=64)
    r = ModelReader(out)
    assert r.config.rope_scaling == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_context_length": 64}
    assert r.config.tie_word_embeddings and r.max_bits == 6 and r.group_size == 64
    tok = r.tokenizer()
    assert tok.model == "llama" and tok.sp_model == (src / "tokenizer.model").read_bytes()
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(tok.sp_model)
    assert tok.tokens[:sp.GetPieceSize()] == [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
    # tied: the LM head is the embedding, quantized as its own linear
    head = r.dequantize("output", 6)
    emb = _hf_state(src)["model.embed_tokens.weight"]
    _, qp, _, k = r.linear("output")
    s_k, _ = bitplane.view_params(qp, 6, 6)
    assert np.all(np.abs(head - emb) <= s_k[:, np.arange(k) // 64] / 2 * (1 + 1e-5) + 1e-7)


# ---- export --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 6, 4, 3, 2])
def test_export_hf_loads_in_transformers_with_the_numpy_view(tiny_fq, tmp_path, bits):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path / f"hf{bits}"
    export_hf(tiny_fq, out, bits, progress=False)
    model = LlamaForCausalLM.from_pretrained(out)
    r = ModelReader(tiny_fq)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for name in linear_names(r.config):
        view = r.dequantize(name, bits)
        hfn = "lm_head.weight" if name == "output" else None
        if hfn is None:
            from flexquant_rt.model_file import hf_name
            hfn = hf_name(r.config, name + ".")
        assert np.array_equal(sd[hfn], view), hfn
    np.testing.assert_array_equal(sd["model.embed_tokens.weight"], r.tensor("token_embd.weight").astype(np.float32))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("hello there")["input_ids"]) == "hello there"


# ---- the default converter: calibrated scale folding -----------------------------------------------

@pytest.fixture(scope="module")
def gqa_hf(tmp_path_factory):
    d = make_hf_llama(tmp_path_factory.mktemp("gqa") / "m", seed=5, heads=4, kv_heads=2)
    return d, calibration_stats(HFSource(d), n_chunks=2, chunk_len=128)


def _state_of_file_tensors(src, fold):
    """The source's HF state dict with every tensor passed through the fold (file names)."""
    from flexquant_rt.model_file import hf_name

    cfg = src.config
    out = {"model.embed_tokens.weight": src.load("model.embed_tokens.weight"),
           "model.norm.weight": fold.tensor("output_norm.weight", src.load("model.norm.weight")),
           "lm_head.weight": fold.tensor("output", src.load("lm_head.weight"))}
    for i in range(cfg.n_layers):
        for fname, hfn in ((f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight"),
                           (f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight")):
            out[hfn] = fold.tensor(fname, src.load(hfn))
        for lin in LAYER_LINEARS:
            hfn = hf_name(cfg, f"blk.{i}.{lin}.")
            out[hfn] = fold.tensor(f"blk.{i}.{lin}", src.load(hfn))
    return out


def test_scale_fold_keeps_the_models_function(gqa_hf):
    """Folding the scales (RMSNorm weights, v rows shared by the query heads of a KV head, up
    rows) is an exact transform: the unquantized folded model gives the same logits."""
    import torch
    from transformers import LlamaForCausalLM

    d, stats = gqa_hf
    src = HFSource(d)
    fold = ScaleFold(src.config, stats)
    assert max(np.abs(np.log(v)).max() for v in fold.col.values()) > 0.1  # the fold does something
    model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.tensor([np.random.default_rng(0).integers(0, 320, 48).tolist()])
    with torch.no_grad():
        ref = model(ids).logits
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                               _state_of_file_tensors(src, fold).items()})
        got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_folded_conversion_folds_and_every_view_holds_its_bound(gqa_hf, tmp_path):
    """Every view of a folded file (round to nearest) is within half its step of the folded weight."""
    d, stats = gqa_hf
    src = HFSource(d)
    out = tmp_path / "mv.fq"
    convert(src, out, progress=False, group_size=64, stats=stats, method="folded")
    r = ModelReader(out)
    assert "folded input scales" in r.field("flexquant.source")
    fold = make_fold(src, stats, 64)
    assert fold.alphas == {} and fold.alpha == AWQ_ALPHA
    searched = make_fold(src, stats, 64, alpha_search=True)  # --alpha-search: one exponent per site
    assert set(searched.alphas.values()) <= set(ALPHA_GRID) and len(searched.alphas) == 4 * src.config.n_layers + 1
    folded = _state_of_file_tensors(src, fold)
    from flexquant_rt.model_file import hf_name
    np.testing.assert_array_equal(r.tensor("blk.0.attn_norm.weight"), folded["model.layers.0.input_layernorm.weight"])
    for name in linear_names(src.config):
        w = folded["lm_head.weight" if name == "output" else hf_name(src.config, name + ".")]
        _, qp, n, k = r.linear(name)
        for bits in range(2, 9):
            view = r.dequantize(name, bits)
            s_k, _ = bitplane.view_params(qp, bits, 8)
            assert np.all(np.abs(view - w) <= s_k[:, np.arange(k) // 64] / 2 * (1 + 1e-5) + 1e-7), (name, bits)
    # method="plain" quantizes the source weights as they are
    plain = tmp_path / "plain.fq"
    convert(src, plain, progress=False, group_size=64, method="plain")
    rp = ModelReader(plain)
    np.testing.assert_array_equal(rp.tensor("blk.0.attn_norm.weight"),
                                  src.load("model.layers.0.input_layernorm.weight"))
    codes, qp = bitplane.quantize(src.load("model.layers.1.mlp.down_proj.weight"), 8, 64)
    np.testing.assert_array_equal(rp.linear("blk.1.ffn_down")[1], qp)


def test_output_scale_search_minimises_the_sites_output_error(gqa_hf, tmp_path):
    """--scale-search output (AWQ's per-layer search): with the calibration Grams, each site's
    exponent is the grid point with the least 4-bit output error of its linears; the converter
    collects the Grams itself and the file holds every view's bound in the folded weights."""
    from flexquant_rt import convert as C

    d, _ = gqa_hf
    src = HFSource(d)
    stats = calibration_stats(src, n_chunks=2, chunk_len=128, gram=True)
    assert set(stats.gram) == {f"blk.{i}.{l}" for i in range(src.config.n_layers) for l in C.GRAM_SITES} | {"output"}
    x_sq = stats.gram["blk.0.ffn_down"]
    np.testing.assert_allclose(np.diag(x_sq), stats.mean_sq["blk.0.ffn_down"], rtol=1e-4)
    fold = make_fold(src, stats, 64, alpha_search=True, objective="output")
    assert set(fold.alphas.values()) <= set(C.OUTPUT_ALPHA_GRID) and len(fold.alphas) == 4 * src.config.n_layers + 1
    # the chosen exponent of the gate/up site beats every other grid point on the objective
    w = [src.load(f"model.layers.1.mlp.{p}_proj.weight") for p in ("gate", "up")]
    g = stats.gram["blk.1.ffn_gate"]
    m = stats.mean_abs["blk.1.ffn_gate"]
    errs = {a: sum(C._output_error(x, fold_scale(m, a), g, 64) for x in w) for a in C.OUTPUT_ALPHA_GRID}
    assert min(errs, key=errs.get) == fold.alphas["blk.1.ffn_gate"]
    np.testing.assert_array_equal(fold.col["blk.1.ffn_up"], fold_scale(m, fold.alphas["blk.1.ffn_gate"]))
    with pytest.raises(ValueError, match="Grams"):
        make_fold(src, calibration_stats(src, n_chunks=1, chunk_len=64), 64, alpha_search=True, objective="output")
    out = tmp_path / "out.fq"
    convert(src, out, progress=False, group_size=64, scale_search="output", calibrate=True, method="folded")
    r = ModelReader(out)
    assert "output search" in r.field("flexquant.source")
    same = make_fold(src, calibration_stats(src, gram=True), 64, alpha_search=True, objective="output")
    for name in ("blk.0.attn_q", "blk.1.attn_output", "blk.1.ffn_down", "output"):
        wf = same.tensor(name, src.load("lm_head.weight" if name == "output" else hf_name(src.config, name + ".")))
        _, qp, n, k = r.linear(name)
        for bits in (3, 4, 8):
            s_k, _ = bitplane.view_params(qp, bits, 8)
            assert np.all(np.abs(r.dequantize(name, bits) - wf) <= s_k[:, np.arange(k) // 64] / 2 * (1 + 1e-5) + 1e-7)


def test_default_conversion_is_view_aware_gptq_on_the_folded_model(gqa_hf, tmp_path):
    """The default method: the folded model's weights, codes from nested_gptq.quantize with each
    linear's calibration Gram in the folded coordinates (H / s sᵀ); the group parameters are the
    folded file's; without Grams in the given statistics it says so."""
    from flexquant_rt import convert as C, nested_gptq

    d, _ = gqa_hf
    src = HFSource(d)
    stats = calibration_stats(src, n_chunks=2, chunk_len=128, gram=True)
    out, folded = tmp_path / "gptq.fq", tmp_path / "folded.fq"
    convert(src, out, progress=False, group_size=64, stats=stats)
    convert(src, folded, progress=False, group_size=64, stats=stats, method="folded")
    r, rf = ModelReader(out), ModelReader(folded)
    assert "view-aware GPTQ for views 3..8" in r.field("flexquant.source")
    fold = make_fold(src, stats, 64)
    for name, site in (("blk.0.attn_k", "blk.0.attn_q"), ("blk.1.attn_output", "blk.1.attn_output"),
                       ("blk.1.ffn_up", "blk.1.ffn_gate"), ("blk.0.ffn_down", "blk.0.ffn_down"), ("output", "output")):
        w = fold.tensor(name, src.load("lm_head.weight" if name == "output" else hf_name(src.config, name + ".")))
        s = fold.col[name].astype(np.float64)
        codes, qp = nested_gptq.quantize(w, stats.gram[site] / np.outer(s, s), 8, 64)
        planes, qpf, n, k = r.linear(name)
        np.testing.assert_array_equal(qpf, qp)
        np.testing.assert_array_equal(qpf, rf.linear(name)[1])
        np.testing.assert_array_equal(bitplane.unpack_planes(planes, n, k, 8), codes)
    np.testing.assert_array_equal(r.tensor("blk.1.ffn_norm.weight"), rf.tensor("blk.1.ffn_norm.weight"))
    with pytest.raises(ValueError, match="needs calibration statistics with Grams"):
        convert(src, tmp_path / "x.fq", progress=False, stats=calibration_stats(src, n_chunks=1, chunk_len=64))
    assert not (tmp_path / "x.fq").exists()
    # too large for the Grams' memory budget: the folded method, with a warning
    small = C.GPTQ_MAX_GRAM_BYTES
    try:
        C.GPTQ_MAX_GRAM_BYTES = C.gram_bytes(src.config) - 1
        fb = tmp_path / "fallback.fq"
        convert(src, fb, progress=False, group_size=64, stats=stats)
    finally:
        C.GPTQ_MAX_GRAM_BYTES = small
    assert "GPTQ" not in ModelReader(fb).field("flexquant.source")
    np.testing.assert_array_equal(ModelReader(fb).linear("blk.0.attn_q")[0], rf.linear("blk.0.attn_q")[0])


# ---- the real model --------------------------------------------------------------------------------

def test_smollm2_gguf_converts_close_to_the_source(smollm2_path, smollm2_fq, smollm2_stats):
    r = ModelReader(smollm2_fq)
    c = r.config
    assert (c.hidden, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn, c.vocab) == \
        (576, 30, 9, 3, 64, 1536, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0
    src = GGUFSource(smollm2_path)
    fold = make_fold(src, smollm2_stats, 128)  # the default converter quantizes the folded model
    for name, hfn, site in (("blk.0.attn_q", "model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q"),
                            ("blk.29.ffn_down", "model.layers.29.mlp.down_proj.weight", "blk.29.ffn_down"),
                            ("output", "model.embed_tokens.weight", "output")):
        # view-aware GPTQ: each view's output error on the calibration activations, tr(D H Dᵀ) with
        # H the Gram of the folded input, is below that of the nested round-to-nearest views
        w = fold.tensor(name, src.load(hfn))
        s = fold.col[name].astype(np.float64)
        h = (smollm2_stats.gram[site] / np.outer(s, s)).astype(np.float32)
        rows = slice(None, None, 16) if name == "output" else slice(None)
        codes, qp = bitplane.quantize(w[rows], 8, 128)
        _, qpf, _, k = r.linear(name)
        np.testing.assert_array_equal(qpf[rows], qp)
        for bits in (3, 4, 6, 8):
            dg = r.dequantize(name, bits)[rows] - w[rows]
            dr = bitplane.dequantize(codes, qp, bits, 8, 128) - w[rows]
            eg, er = np.einsum("ij,ij->", dg @ h, dg), np.einsum("ij,ij->", dr @ h, dr)
            assert eg < er, (name, bits, eg / er)
    tok = r.tokenizer()
    assert tok.model == "gpt2" and tok.hf_json and "<|im_start|>" in tok.chat_template
    from tokenizers import Tokenizer
    ids = Tokenizer.from_str(tok.hf_json).encode("Hello, world!").ids
    assert [tok.tokens[i] for i in ids] == ["Hello", ",", "Ġworld", "!"]
    # bytes per token: k planes + group params; 4-bit reads about half of 8-bit
    assert 0.5 < r.bytes_per_token(4) / r.bytes_per_token(8) < 0.56


def test_smollm2_q_k_rows_are_unpermuted(smollm2_path):
    """transformers' own GGUF loader undoes llama.cpp's Q/K permutation: we must agree."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                             dtype=torch.float32)
    src = GGUFSource(smollm2_path)
    for hfn in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                "model.layers.3.mlp.up_proj.weight"):
        np.testing.assert_array_equal(src.load(hfn), m.state_dict()[hfn].numpy(), err_msg=hfn)


# ---- synthetic models and the command line ----------------------------------------------------------

def test_synthetic_presets_have_the_real_shapes():
    assert {"tiny", "llama2-7b", "llama3-8b", "smollm2-135m"} <= set(SYNTHETIC_PRESETS)
    c = SyntheticSource("llama2-7b").config
    assert (c.hidden, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn, c.vocab) == (4096, 32, 32, 32, 11008, 32000)
    c = SyntheticSource("llama3-8b").config
    assert (c.n_kv_heads, c.ffn, c.vocab, c.rope_scaling["type"]) == (8, 14336, 128256, "llama3")
    s = SyntheticSource("llama2-7b", seed=3)
    w = s.load("model.layers.0.mlp.down_proj.weight")
    assert w.shape == (4096, 11008) and 0.015 < float(np.median(np.abs(w))) / 0.6745 < 0.025
    assert np.array_equal(w, SyntheticSource("llama2-7b", seed=3).load("model.layers.0.mlp.down_proj.weight"))


def test_synthetic_layers_override_keeps_the_shapes():
    full, two = SyntheticSource("llama2-7b").config, SyntheticSource("llama2-7b", n_layers=2).config
    assert two.n_layers == 2 and full.n_layers == 32
    assert (two.hidden, two.ffn, two.vocab, two.n_heads) == (full.hidden, full.ffn, full.vocab, full.n_heads)
    assert two.linear_shapes() == full.linear_shapes()
    for bad in (0, -1, 2000):
        with pytest.raises(ValueError, match="n_layers"):
            SyntheticSource("tiny", n_layers=bad)


def test_synthetic_random_codes_write_a_model_directly(tmp_path):
    """random_codes (gpu_check's --e2e model): uniformly random codes and group params of the usual
    weight scale, written without float weights; deterministic, a working model of the same layout,
    the file says so in its source."""
    from flexquant_rt import Engine
    from flexquant_rt.model_file import ModelReader

    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}.fq"
        convert(SyntheticSource("tiny", seed=4, random_codes=True), out, progress=False)
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    plain = tmp_path / "plain.fq"
    convert(SyntheticSource("tiny", seed=4), plain, progress=False)
    assert outs[0].stat().st_size == plain.stat().st_size  # the same tensors and shapes
    r = ModelReader(outs[0])
    w = r.dequantize("blk.1.ffn_down", 8)
    assert w.shape == (64, 176) and np.abs(w).max() < 0.1 and 0.03 < float(np.abs(w).mean()) < 0.05
    planes, _, n, k = r.linear("blk.1.ffn_down")
    codes = bitplane.unpack_planes(planes, n, k, 8)
    assert 110 < float(codes.mean()) < 145  # uniform over 0..255
    assert "random-codes" in r.field("flexquant.source")
    # padding codes are 0 (docs/format.md): the 176 columns pad to 256, the 64 rows need none
    full = bitplane.unpack_planes(planes, 64, 256, 8)
    assert (full[:, 176:] == 0).all() and full[:, :176].any()
    with pytest.raises(ValueError, match="random-codes synthetic source takes no calibration"):
        convert(SyntheticSource("tiny", random_codes=True), tmp_path / "x.fq", progress=False, calibrate=True)
    with Engine(outs[0], backend="cpu", n_ctx=32) as eng:
        assert np.isfinite(eng.forward(np.arange(7))).all()


def test_parallel_writer_writes_the_same_bytes(tmp_path):
    from flexquant_rt.model_file import write_model

    src = SyntheticSource("tiny", seed=5, n_layers=3)
    outs = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}.fq"
        write_model(out, src.config, src.tokenizer, src.load, progress=False, source=src.description, workers=workers)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    # a source that fails mid-way under the pool leaves no file behind and names the tensor
    def bad_load(name):
        if "layers.2.mlp.down_proj" in name:
            raise RuntimeError(f"cannot read {name}")
        return src.load(name)
    with pytest.raises(RuntimeError, match="layers.2.mlp.down_proj"):
        write_model(tmp_path / "bad.fq", src.config, src.tokenizer, bad_load, progress=False, workers=3)
    assert not any(p.name.startswith(".bad.fq") or p.name == "bad.fq" for p in tmp_path.iterdir())


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert.py"), *args], capture_output=True,
                          text=True, cwd=cwd)


def test_cli_synthetic_prints_sizes(tmp_path):
    p = _cli("--synthetic", "tiny", str(tmp_path / "t.fq"), "--quiet", "--max-bits", "6", "--group-size", "64")
    assert p.returncode == 0, p.stderr
    assert "bytes read per token" in p.stdout and "k=6" in p.stdout and "k=7" not in p.stdout
    r = ModelReader(tmp_path / "t.fq")
    assert r.max_bits == 6 and r.group_size == 64
    p = _cli(str(tmp_path / "t.fq"), "--export-hf", str(tmp_path / "x"), "--bits", "7")
    assert p.returncode == 2 and "7" in p.stderr and "bit-width" in p.stderr


# ---- bad input ---------------------------------------------------------------------------------------

def _no_leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if ".tmp" in p.name]


def test_not_a_llama_model_is_refused(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelFileError, match="not a Llama-family model.*gpt2"):
        open_source(d)
    p = _cli(str(d), str(tmp_path / "o.fq"))
    assert p.returncode == 2 and "gpt2" in p.stderr and not (tmp_path / "o.fq").exists()


def test_missing_tensor_leaves_no_partial_file(tmp_path):
    src = make_hf_llama(tmp_path / "m")
    from safetensors.numpy import load_file, save_file
    sd = load_file(src / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFileError, match="missing tensor 'model.layers.1.mlp.down_proj.weight'"):
        convert(HFSource(src), out / "m.fq", progress=False)
    assert list(out.iterdir()) == []


def test_wrong_tensor_shape_is_named(tmp_path):
    src = make_hf_llama(tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match=r"mlp.gate_proj.weight has shape \(176, 64\).*\(200, 64\)"):
        convert(HFSource(src), tmp_path / "m.fq", progress=False)
    assert _no_leftovers(tmp_path) == [] and not (tmp_path / "m.fq").exists()


def test_gguf_of_another_architecture_and_unsupported_quant_type(tmp_path):
    import gguf

    def write(path, arch, dtype):
        w = gguf.GGUFWriter(str(path), arch)
        w.add_block_count(1)
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(tmp_path / "gpt2.gguf", "gpt2", np.float32)
    with pytest.raises(ModelFileError, match="architecture 'gpt2' is not supported"):
        open_source(tmp_path / "gpt2.gguf")
    write(tmp_path / "i32.gguf", "llama", np.int32)
    with pytest.raises(ModelFileError, match="token_embd.weight has unsupported GGUF quant type I32"):
        open_source(tmp_path / "i32.gguf")
    (tmp_path / "junk.bin").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ModelFileError, match="neither a Hugging Face model directory nor a GGUF file"):
        open_source(tmp_path / "junk.bin")
    with pytest.raises(ModelFileError, match="no such file"):
        open_source(tmp_path / "absent")


def test_python_reader_rejects_truncated_and_foreign_files(tiny_fq, tmp_path):
    data = tiny_fq.read_bytes()
    for cut in (3, 100, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.fq"
        p.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match=str(p.name)):
            ModelReader(p)
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "plain.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="not a flexquant model file"):
        ModelReader(tmp_path / "plain.gguf")
