"""Precision controllers: calibration, allocation, budgets, and the controller protocol."""
from __future__ import annotations

import numpy as np
import pytest

from flexquant_rt import Engine, FlexquantError
from flexquant_rt.controller import (FlexQuant, InputAware, LayerwiseStatic, LinearwiseStatic, Profile, Static,
                                     allocate, calibrate, calibration_text, load_profile, mean_bits,
                                     save_profile, text_chunks)


@pytest.fixture(scope="module")
def calibrated(tiny_fq, tmp_path_factory):
    """(model path with a stored profile, the profile)."""
    import shutil

    path = tmp_path_factory.mktemp("cal") / "tiny.fq"
    shutil.copy(tiny_fq, path)
    with Engine(path) as eng:
        chunks = text_chunks(eng, calibration_text(), 2, 48, seed=0)
        prof = calibrate(eng, chunks, progress=False)
    save_profile(path, prof)
    return path, prof


def test_calibration_is_deterministic_and_stored(calibrated):
    path, prof = calibrated
    with Engine(path) as eng:
        again = calibrate(eng, text_chunks(eng, calibration_text(), 2, 48, seed=0), progress=False)
        stored = load_profile(eng)
    assert again.kl == prof.kl and again.extra == prof.extra
    assert stored.to_json() == prof.to_json()
    kl = np.asarray(prof.kl)
    assert kl.shape == (3, 5) and (kl > 0).all()
    kl_type = np.asarray(prof.extra["kl_type"])
    assert kl_type.shape == (7, 5) and (kl_type > 0).all() and (np.diff(kl_type, axis=1) < 0).all()
    # fewer bits, more divergence, for every unit
    assert (np.diff(kl, axis=1) < 0).all()
    # per layer: q (64x64), k and v (32x64 each), o (64x64), gate, up (176x64), down (64x176)
    layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 176 * 64
    assert prof.weights == [layer, layer, 320 * 64]


def test_allocation_meets_the_budget_and_prefers_cheap_sensitivity(calibrated):
    _, prof = calibrated
    for budget in (3.5, 5.0, 6.25, 7.5):
        bits = allocate(prof, budget)
        assert mean_bits(prof.weights, bits) <= budget + 1e-9
        assert all(min(prof.levels) <= b <= prof.max_bits for b in bits)
    assert allocate(prof, 8.0) == [8] * len(prof.weights)
    with pytest.raises(ValueError, match="budget = 9"):
        allocate(prof, 9)


def test_linearwise_allocation_is_per_linear_and_within_budget(calibrated):
    path, prof = calibrated
    sizes = np.asarray(prof.extra["linear_sizes"], dtype=np.float64)
    for budget in (4.5, 6.0, 7.25):
        c = LinearwiseStatic(prof, budget)
        mask, head = c.mask(None)
        assert mask.shape == (2, 7)
        bits = np.append(mask.reshape(-1), head)
        assert float(bits @ sizes / sizes.sum()) <= budget + 1e-9
        assert c.mean_bits == pytest.approx(float(bits @ sizes / sizes.sum()))
    with Engine(path) as eng:
        eng.generate("the", max_new_tokens=4, controller=LinearwiseStatic(prof, 6.0))
        assert (eng.layer_bits() == LinearwiseStatic(prof, 6.0).mask(None)[0]).all()
    stale = Profile(**{**prof.__dict__, "extra": {}})
    with pytest.raises(ValueError, match="per-type"):
        LinearwiseStatic(stale, 6.0)


def test_static_8_equals_bits_8(calibrated):
    path, _ = calibrated
    with Engine(path) as eng:
        a = eng.generate("the cat", max_new_tokens=12, controller=Static(8))
        b = eng.generate("the cat", max_new_tokens=12, bits=8)
        c = eng.generate("the cat", max_new_tokens=12, controller=Static(3))
        d = eng.generate("the cat", max_new_tokens=12, bits=3)
    assert a == b and c == d


@pytest.mark.parametrize("make", [
    lambda p: LinearwiseStatic(p, 5.5),
    lambda p: FlexQuant(p, 6.0),
    lambda p: FlexQuant(p, 5.5, levels=(5, 6)),
    lambda p: InputAware(p, 5.0),
    lambda p: InputAware(p, 6.5),
    lambda p: LayerwiseStatic(p, 5.5),
])
def test_masks_respect_the_budget_over_a_long_generation(calibrated, make):
    path, prof = calibrated
    ctrl = make(prof)
    seen = []

    class Recorder:
        """Wraps a controller and records the bits every step actually ran at."""

        def attach(self, eng):
            if hasattr(ctrl, "attach"):
                ctrl.attach(eng)

        def detach(self):
            if hasattr(ctrl, "detach"):
                ctrl.detach()

        def reset(self):
            ctrl.reset()

        def mask(self, info):
            if info is not None:
                seen.append(info.mean_bits)
            return ctrl.mask(info)

    with Engine(path, n_ctx=256) as eng:
        eng.generate("the", max_new_tokens=200, temperature=1.0, seed=3, controller=Recorder(), ignore_eos=True)
        assert not eng._eng.has_precision_rules  # detached after the generation
    assert len(seen) >= 150
    assert np.mean(seen) <= ctrl.budget + 0.15, (np.mean(seen), ctrl.budget)
    if isinstance(ctrl, (FlexQuant, InputAware)):
        assert len(set(np.round(seen, 3))) > 1  # it did switch


def test_bad_controller_mask_names_the_layer_and_value(calibrated):
    path, _ = calibrated

    class Bad:
        def mask(self, info):
            m = np.full((2, 7), 6)
            m[1, 2] = 11
            return m if info is not None else None

    with Engine(path) as eng:
        with pytest.raises(FlexquantError, match=r"mask\[1\]\[2\] \(layer 1, v\) = 11 is outside 2..8"):
            eng.generate("the", max_new_tokens=4, controller=Bad())


def test_in_step_rules_pick_bits_from_the_input(calibrated):
    path, prof = calibrated
    with Engine(path) as eng:
        ctrl = InputAware(prof, 5.0)
        ctrl.attach(eng)
        eng.forward([5, 6, 7])
        used = eng._eng.last_bits()
        assert used.shape == (2 * 7 + 1,) and used.min() >= 3 and used.max() <= 8
        eng._eng.set_rule_lambda(0.0)  # bits are free: everything at max
        eng.decode(9)
        assert (eng._eng.last_bits() == 8).all()
        eng._eng.set_rule_lambda(1e30)  # bits are dear: everything at the lowest level
        eng.decode(10)
        assert (eng._eng.last_bits() == 3).all()
        ctrl.detach()
        with pytest.raises(FlexquantError, match="cost table 0 has 3 values"):
            eng._eng.set_precision_rules(3, 8, [np.zeros((1, 3), np.float32)] * 15, 1.0)
        with pytest.raises(FlexquantError, match=r"1 cost tables; expected n_layers \* 7 \+ 1 = 15"):
            eng._eng.set_precision_rules(3, 8, [np.zeros((6, 64), np.float32)], 1.0)
        with pytest.raises(FlexquantError, match="bits range 1..8"):
            eng._eng.set_precision_rules(1, 8, [], 1.0)


def test_profile_roundtrip_and_version():
    p = Profile(max_bits=8, levels=[4, 6], kl=[[0.2, 0.01], [0.3, 0.02]], weights=[10, 20],
                entropy_quantiles=list(np.linspace(0, 5, 101)), n_tokens=100)
    assert Profile.from_json(p.to_json()) == p
    assert p.kl_at(0, 8) == 0 and p.kl_at(0, 6) == 0.01 and p.kl_at(0, 3) == pytest.approx(0.8)
    assert p.kl_at(1, 5) == pytest.approx(0.02 * 4)
    bad = p.to_json().replace('"version": 1', '"version": 99')
    with pytest.raises(ValueError, match="version 99"):
        Profile.from_json(bad)


def test_sink_protect_runs_the_first_positions_at_max_bits(calibrated):
    from flexquant_rt.controller import SinkProtect

    path, prof = calibrated
    with Engine(path) as eng:
        ctrl = SinkProtect(Static(4), n_sink=2)
        ctrl.attach(eng)
        ctrl.reset()
        used = []
        info = None
        for t in (5, 6, 7, 8):
            m = ctrl.mask(info)
            if m is not None:
                eng.set_layer_bits(m[0], lm_head_bits=m[1])
            eng.decode(t)
            info = eng.step_info(t)
            used.append(info.mean_bits)
        assert used == [8.0, 8.0, 4.0, 4.0]
        with pytest.raises(ValueError, match="n_sink"):
            SinkProtect(Static(4), n_sink=0)
        with pytest.raises(ValueError, match="mask-driven"):
            SinkProtect(InputAware(prof, 5.0)).attach(eng)


def test_evaluation_measures_what_each_policy_ran(calibrated):
    from flexquant_rt.evaluate import oracle_curve, reference_logprobs, run_policy

    path, prof = calibrated
    with Engine(path) as eng:
        chunks = text_chunks(eng, calibration_text("evaluation"), 2, 24, seed=1)
        ref = reference_logprobs(None, chunks, eng)  # the engine at max bits
        r8 = run_policy(eng, lambda: Static(8), chunks, ref, "static 8", 8.0)
        r3 = run_policy(eng, lambda: Static(3), chunks, ref, "static 3", 3.0)
        ls = run_policy(eng, lambda: LayerwiseStatic(prof, 5.0), chunks, ref, "ls", 5.0)
        assert not eng._eng.has_precision_rules
    # token-by-token decoding at 8 bits reproduces the 8-bit prefill reference
    assert r8.mean_bits == 8.0 and r8.kld < 1e-6 and r8.top1 == 1.0
    assert r3.mean_bits == 3.0 and r3.kld > 1e-3 and len(r3.per_token_kl) == 48
    assert ls.mean_bits <= 5.0 + 1e-9
    curve = oracle_curve({3: r3, 8: r8}, [0.0, 1e9])
    assert curve[0][1] == 8.0 and curve[1][1] == 3.0 and curve[1][2] == pytest.approx(r3.kld)


def test_bench_worker_times_the_flexquant_controller(tmp_path):
    """tools/bench.py's controller row (issue 5: decode under the FlexQuant controller at a 5-bit
    budget): calibrated on the fly, it switches inside the timed steps and keeps near the budget."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from flexquant_rt.convert import SyntheticSource, convert

    model = tmp_path / "t.fq"
    convert(SyntheticSource("tiny", seed=2), model, progress=False)
    bench = Path(__file__).resolve().parents[1] / "tools" / "bench.py"

    def worker(bits):
        out = subprocess.run([sys.executable, str(bench), "--worker", "fq", str(model), str(bits), "2", "16", "32",
                              "cpu", "0", "f32", "0"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    ctl, static, protected, protected16 = worker(-1), worker(8), worker(-2), worker(-3)
    assert static["mean_bits"] == 8.0
    # the K/V rows a step reads, for the roofline with the cache: 2 (K, V) x layers x kv heads x
    # head_dim x 4 bytes (f32) x the mean cache length of the 32 timed steps (16 + 1 + 31 / 2)
    from flexquant_rt import Engine
    with Engine(model, backend="cpu") as eng:
        c = eng.config
        per_row = 2 * c["n_layers"] * c["n_kv_heads"] * c["head_dim"] * 4
    assert static["kv_bytes_per_token"] == per_row * (16 + 1 + 31 / 2)
    # the rows pricing fp32 (fp16) activations in the LM head and the last layer: 8-bit weights all the same
    for row in (protected, protected16):
        assert row["mean_bits"] == 8.0 and row["bytes_per_token"] == static["bytes_per_token"]
    assert 4.0 < ctl["mean_bits"] < 8.0  # it went down to 4 bits for some steps, not for all
    assert ctl["bytes_per_token"] < static["bytes_per_token"] and ctl["decode_tok_s"] > 0
