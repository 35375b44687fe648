"""Integer activations on the CPU (ops.quantize_activations, Engine.set_activation_bits): the CPU
twin of the CUDA tensor-core GEMV's int8 activations, and what calibration measures per layer.

References: numpy for the op (bit for bit: the same fp32 operations), transformers for the model
(the exported k-bit view with the same quantization applied to every nn.Linear input by a pre-hook).
"""
from __future__ import annotations

import numpy as np
import pytest

import flexquant_rt._core as core
from flexquant_rt import Engine, FlexquantError
from flexquant_rt.convert import HFSource, convert, export_hf

from conftest import make_hf_llama, rel_err


def np_quantize(x: np.ndarray, group: int, bits: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    qmax = np.float32(2 ** (bits - 1) - 1)
    out = np.zeros_like(x)
    for g0 in range(0, x.shape[1], group):
        xg = x[:, g0:g0 + group]
        scale = (np.abs(xg).max(1, keepdims=True) / qmax).astype(np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            q = np.where(scale > 0, np.clip(np.rint(xg / scale), -qmax, qmax), 0).astype(np.float32)
        out[:, g0:g0 + group] = scale * q
    return out


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
@pytest.mark.parametrize("m,k,group", [(1, 64, 64), (5, 300, 128), (3, 576, 32)])
def test_quantize_activations_bit_exact(bits, m, k, group):
    rng = np.random.default_rng(bits * k + m)
    x = (rng.standard_normal((m, k)) + 0.2).astype(np.float32)
    x[rng.random((m, k)) < 0.02] *= 30
    x[0, :group] = 0.0  # an all-zero group stays zero
    out = core.ops.quantize_activations(x, group, bits)
    np.testing.assert_array_equal(out, np_quantize(x, group, bits))
    assert len(np.unique(out[1 % m])) <= k  # really quantized: at most 2^bits - 1 levels per group
    with pytest.raises(ValueError, match="bits in 2..8 or 16"):
        core.ops.quantize_activations(x, group, 9)


def test_quantize_activations_16_is_fp16_rounding():
    """bits = 16: every element to the nearest fp16 (ties to even), no scale: the activations of the
    CUDA f16 GEMV (path mma_a16)."""
    rng = np.random.default_rng(16)
    x = (rng.standard_normal((5, 300)) * np.float32(3.0)).astype(np.float32)
    x[0, :4] = [65504.0, 1e-8, -0.0, 2.0 ** -24 * 1.5]  # fp16's largest, a flush to 0, -0, a subnormal tie
    out = core.ops.quantize_activations(x, 128, 16)
    np.testing.assert_array_equal(out, x.astype(np.float16).astype(np.float32))
    # beyond fp16's range: saturated at ±65504, not inf; NaN stays NaN
    big = np.array([[7e4, -1e30, np.nan, 65519.0]], dtype=np.float32)
    np.testing.assert_array_equal(core.ops.quantize_activations(big, 128, 16), [[65504.0, -65504.0, np.nan, 65504.0]])


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    import torch
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("act")
    src = make_hf_llama(d / "hf", seed=3, hidden=96, heads=3, kv_heads=1, ffn=200)
    fq = d / "m.fq"
    convert(HFSource(src), fq, progress=False, group_size=32, method="plain")
    export_hf(fq, d / "hf8", 8, progress=False)
    return fq, LlamaForCausalLM.from_pretrained(d / "hf8", dtype=torch.float32).eval()


def hf_logits(model, ids, act_bits: int | None, group: int):
    """transformers' logits; with act_bits, every nn.Linear's input quantized like the engine's."""
    import torch

    hooks = []
    if act_bits:
        def pre(mod, args):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1]).numpy()
            return (torch.from_numpy(np_quantize(flat, group, act_bits)).reshape(x.shape),)
        hooks = [m.register_forward_pre_hook(pre) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()
    finally:
        for h in hooks:
            h.remove()


def test_engine_activation_bits_match_transformers_with_quantized_inputs(tiny_pair):
    fq, ref_model = tiny_pair
    ids = np.random.default_rng(0).integers(0, 320, 24).tolist()
    # transformers' fp32 math (cache and activations): the activation bits alone differ
    eng = Engine(fq, backend="cpu", kv_dtype="f32", cpu_activations="f32")
    fp = eng.forward(ids)
    eng.set_activation_bits(16)  # fp16 activations: within fp16 rounding of transformers' fp32 model
    assert (np.asarray(eng._eng.activation_bits) == 16).all()
    h16 = eng.forward(ids)
    eng.set_activation_bits(8)
    assert (np.asarray(eng._eng.activation_bits) == 8).all()
    q8 = eng.forward(ids)
    ref_fp = hf_logits(ref_model, ids, None, 32)
    ref_q8 = hf_logits(ref_model, ids, 8, 32)
    assert rel_err(h16, ref_fp) < 2e-3
    assert 10 * rel_err(h16, ref_fp) < rel_err(q8, ref_fp)
    assert rel_err(h16, fp) > 1e-5  # really fp16 (measured ~3.5e-4), not fp32 under another name
    # A rounding boundary crossed differently by the two fp32 computations moves one activation by
    # one step (and, through the KV cache, the later positions a little): so not 1e-5, but the
    # engine's int8 model must be an order of magnitude closer to transformers' int8 model than to
    # its fp32 one.
    assert rel_err(q8, ref_q8) < 1e-2
    assert rel_err(q8, ref_fp) > 10 * rel_err(q8, ref_q8)
    assert rel_err(fp, ref_fp) < 1e-4
    # step by step equals the prefill. Activation bits 8 run the int8 kernels (exact integer sums,
    # then fp32), whose decode and prompt paths round differently at the last bit: where that moves
    # an input across a rounding boundary of its int8 grid, one code changes by a step (1/127 of its
    # group's largest value) and so does that position's output, and through the KV cache the later
    # ones a little (on the development machine once, at the first decoded position: 2e-3 there,
    # 3.4e-4 over all). So within 2e-3 over all and 1e-2 at any position, an order of magnitude below
    # the int8 rounding's own effect; the portable kernels multiply x̂ in fp32 and cross none here.
    def by_steps():
        eng.reset()
        steps = [eng.forward(ids[:5], reset=False)] + [eng.decode(t)[None] for t in ids[5:]]
        return np.concatenate(steps)

    steps = by_steps()
    per_pos = [rel_err(a, b) for a, b in zip(steps, q8)]
    assert rel_err(steps, q8) < 2e-3 and max(per_pos) < 1e-2, per_pos
    prev = core.ops.get_cpu_kernels()
    try:
        core.ops.set_cpu_kernels("portable")
        assert rel_err(by_steps(), eng.forward(ids)) < 1e-5
    finally:
        core.ops.set_cpu_kernels(prev)
    # back to fp32: the model of before
    eng.set_activation_bits(0)
    np.testing.assert_array_equal(eng.forward(ids), fp)


def test_activation_bits_validation_changes_nothing(tiny_fq):
    eng = Engine(tiny_fq, backend="cpu")
    eng.set_activation_bits(6)
    before = list(eng._eng.activation_bits)
    with pytest.raises(FlexquantError, match=r"activation bits\[3\] \(layer 0, o\) = 9 must be 0 "
                                             r"\(the default activations\), 16 \(fp16\) or in 2..8"):
        bad = np.full((2, 7), 8, dtype=np.int32)
        bad[0, 3] = 9
        eng.set_activation_bits(bad)
    with pytest.raises(FlexquantError, match=r"\(lm_head\) = 1 must be"):
        eng.set_activation_bits(8, lm_head_bits=1)
    with pytest.raises(ValueError, match="shape \\(2, 7\\)"):
        eng.set_activation_bits(np.full((3, 7), 8))
    with pytest.raises(FlexquantError, match=r"2 entries; expected 1 \(all linears\) or n_layers \* 7 \+ 1 = 15"):
        eng._eng.set_activation_bits(np.zeros(2, dtype=np.int32))
    assert list(eng._eng.activation_bits) == before


def test_calibration_measures_activation_sensitivity(tiny_fq):
    from flexquant_rt.controller import Profile, calibrate

    eng = Engine(tiny_fq, backend="cpu")
    rng = np.random.default_rng(1)
    chunks = [rng.integers(0, 320, 32).tolist() for _ in range(2)]
    prof = calibrate(eng, chunks, levels=(4, 6), progress=False, activation_levels=(4, 8, 6))
    assert prof.extra["act_levels"] == [8, 6, 4]
    kl = np.asarray(prof.extra["act_kl"])
    assert kl.shape == (3, 3) and (kl > 0).all()
    assert (kl[:, 2] > kl[:, 0]).all()  # 4-bit activations cost more than 8-bit ones, in every unit
    assert (np.asarray(eng._eng.activation_bits) == 0).all()  # calibration leaves fp32 activations behind
    again = Profile.from_json(prof.to_json())
    assert again.extra["act_kl"] == prof.extra["act_kl"]


def test_calibration_on_an_int8_engine_measures_against_int16(tiny_fq):
    """On a cpu_activations='i8' engine calibration's activation costs are measured against activation
    bits 0, int16 (not against the engine's own int8, which would make int8 cost nothing): the same
    numbers an 'i16' engine measures, bit for bit; and the engine gets its int8 back afterwards."""
    from flexquant_rt.controller import calibrate

    rng = np.random.default_rng(2)
    chunks = [rng.integers(0, 320, 32).tolist() for _ in range(2)]
    kls = []
    for act in ("i16", "i8"):
        with Engine(tiny_fq, backend="cpu", cpu_activations=act) as eng:
            before = np.asarray(eng._eng.activation_bits)
            prof = calibrate(eng, chunks, levels=(6,), progress=False, activation_levels=(8,))
            np.testing.assert_array_equal(np.asarray(eng._eng.activation_bits), before)
            kls.append(np.asarray(prof.extra["act_kl"]))
    assert (kls[0] > 0).all()
    np.testing.assert_array_equal(kls[1], kls[0])


def _act_profile(costs, levels=(8,)):
    """A calibration profile whose only content that matters: per-unit int8 activation costs."""
    from flexquant_rt.controller import Profile

    n = len(costs)
    return Profile(max_bits=8, levels=[4], kl=[[0.1]] * n, weights=[1] * n, entropy_quantiles=[0.0] * 101,
                   n_tokens=1, seed=0, extra={"act_levels": list(levels), "act_kl": [[c] * len(levels) for c in costs]})


def test_sensitive_activation_units_take_the_largest_costs_first():
    from flexquant_rt.controller import sensitive_activation_units

    prof = _act_profile([0.1, 0.5, 0.2, 0.2])  # layers 0..2, the LM head (unit 3); sum 1.0
    assert sensitive_activation_units(prof, 0.0) == []
    assert sensitive_activation_units(prof, 0.5) == [1]
    assert sensitive_activation_units(prof, 0.6) == [1, 2]  # ties: the lower unit first
    assert sensitive_activation_units(prof, 0.9) == [1, 2, 3]
    assert sensitive_activation_units(prof, 1.0) == [0, 1, 2, 3]
    assert sensitive_activation_units(_act_profile([0.0, 0.0]), 1.0) == []  # nothing to protect
    with pytest.raises(ValueError, match="share must be in 0..1"):
        sensitive_activation_units(prof, 1.5)
    with pytest.raises(ValueError, match="no int8 activation measurements"):
        sensitive_activation_units(_act_profile([0.1, 0.2], levels=(6,)), 0.5)


def test_protect_activations_runs_int8_except_the_sensitive_units(tiny_fq):
    """On the CPU, protect_activations runs the GPU's arithmetic: int8 activations in every linear
    but those of the chosen units (here layer 1 and the LM head), bit for bit the same mask set by
    hand; without a profile it says how to make one."""
    eng = Engine(tiny_fq, backend="cpu")
    ids = np.random.default_rng(3).integers(0, 320, 12)
    units = eng.protect_activations(0.8, profile=_act_profile([0.05, 0.5, 0.45]))
    assert units == [1, 2]
    bits = np.asarray(eng._eng.activation_bits)
    assert (bits[:7] == 8).all() and (bits[7:14] == 0).all() and bits[14] == 0
    got = eng.forward(ids)
    manual = np.full((2, 7), 8, dtype=np.int32)
    manual[1] = 0
    eng.set_activation_bits(manual, lm_head_bits=0)
    np.testing.assert_array_equal(eng.forward(ids), got)
    with pytest.raises(ValueError, match="has no calibration profile: run flexquant-rt calibrate .* --activations 8"):
        eng.protect_activations()
    with pytest.raises(ValueError, match="the profile has 3 layers, the model 2"):
        eng.protect_activations(profile=_act_profile([0.1, 0.1, 0.1, 0.1]))
    # fp16 in the protected units instead of fp32
    assert eng.protect_activations(0.8, profile=_act_profile([0.05, 0.5, 0.45]), bits=16) == [1, 2]
    bits = np.asarray(eng._eng.activation_bits)
    assert (bits[:7] == 8).all() and (bits[7:14] == 16).all() and bits[14] == 16
    with pytest.raises(ValueError, match="bits must be 0 \\(the default activations\\) or 16 \\(fp16\\), got 8"):
        eng.protect_activations(0.8, profile=_act_profile([0.05, 0.5, 0.45]), bits=8)


def test_protect_activations_on_an_int8_engine_keeps_int16_in_the_sensitive_units(tiny_fq):
    """cpu_activations='i8' starts every decoder linear at int8; protect_activations then puts the
    chosen units on int16 (activation bits 0) and the rest, the LM head included if it is not chosen,
    on int8: exactly the 'i16' engine given the same mask, and closer to fp32 activations than int8
    everywhere."""
    ids = np.random.default_rng(4).integers(0, 320, 16)
    with Engine(tiny_fq, backend="cpu", cpu_activations="i8") as i8, \
            Engine(tiny_fq, backend="cpu", cpu_activations="i16") as i16, \
            Engine(tiny_fq, backend="cpu", cpu_activations="f32") as f32:
        i8.set_activation_bits(8)  # the LM head too
        everywhere = i8.forward(ids)
        assert i8.protect_activations(0.8, profile=_act_profile([0.05, 0.5, 0.45])) == [1, 2]
        bits = np.asarray(i8._eng.activation_bits)
        assert (bits[:7] == 8).all() and (bits[7:] == 0).all()
        got = i8.forward(ids)
        manual = np.full((2, 7), 8, dtype=np.int32)
        manual[1] = 0
        i16.set_activation_bits(manual, lm_head_bits=0)
        np.testing.assert_array_equal(got, i16.forward(ids))
        ref = f32.forward(ids)
        assert rel_err(got, ref) < 0.8 * rel_err(everywhere, ref)  # (measured: 0.66x)


def test_calibration_restores_the_engines_activations(tiny_fq):
    """calibrate() measures activation costs against fp32 activations whatever the engine ran (the
    GPU runs int8 by default), and gives the engine its activation bits back; input_energy=False
    (the default where the engine is on the GPU) leaves out the CPU-only input-energy statistics."""
    from flexquant_rt.controller import calibrate

    rng = np.random.default_rng(4)
    chunks = [rng.integers(0, 320, 24).tolist() for _ in range(2)]
    eng = Engine(tiny_fq, backend="cpu")
    fp32_start = calibrate(eng, chunks, levels=(4,), progress=False, activation_levels=(8,))
    assert "e_mean" in fp32_start.extra
    mixed = np.full((2, 7), 8, dtype=np.int32)
    mixed[1, 3] = 0
    eng.set_activation_bits(mixed, lm_head_bits=8)
    before = list(eng._eng.activation_bits)
    int8_start = calibrate(eng, chunks, levels=(4,), progress=False, activation_levels=(8,), input_energy=False)
    assert list(eng._eng.activation_bits) == before
    assert int8_start.extra["act_kl"] == fp32_start.extra["act_kl"]
    assert "e_mean" not in int8_start.extra
    # an array keeps the LM head's activation bits unless told otherwise
    eng.set_activation_bits(np.zeros((2, 7), dtype=np.int32))
    assert eng._eng.activation_bits[-1] == 8
