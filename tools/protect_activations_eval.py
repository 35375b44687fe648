#!/usr/bin/env python3
"""What int8 activations (the CUDA tensor-core GEMV's arithmetic) cost, and how much keeping fp32
or fp16 activations in the most sensitive units (Engine.protect_activations) wins back, run on the
CPU (which runs the GPU's int8 and fp16 arithmetic per linear): KL of the next-token distribution against
fp32 activations, on text the calibration did not see.

    python tools/protect_activations_eval.py [MODEL.fq] [--shares 0.25 0.5 0.75]

Calibrates int8 activation sensitivity per unit on 2 x 256 tokens of the calibration half of
pydoc_data.topics (unless the file has a profile with it), evaluates on 4 x 256 tokens of the
evaluation half; weights at max_bits throughout. Prints a table (docs/activation_precision.md).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="a .fq file (default: the default model)")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    a = ap.parse_args(argv)

    from flexquant_rt import Engine
    from flexquant_rt.controller import calibrate, calibration_text, kl_rows, load_profile, log_softmax, text_chunks

    eng = Engine(a.model, backend="cpu", n_ctx=512, cpu_activations="f32")  # its reference: fp32
    L = eng.n_layers
    prof = load_profile(eng)
    if prof is None or 8 not in (prof.extra.get("act_levels") or []):
        t = time.perf_counter()
        cal = text_chunks(eng, calibration_text("calibration"), 2, 256)
        prof = calibrate(eng, cal, levels=(7,), activation_levels=(8,), progress=False)
        print(f"calibrated int8 activation sensitivity in {time.perf_counter() - t:.0f} s")
    ev = text_chunks(eng, calibration_text("evaluation"), 4, 256, seed=1)
    eng.set_layer_bits(eng.max_bits, lm_head_bits=eng.max_bits)
    eng.set_activation_bits(0)
    ref = [log_softmax(eng.forward(c)) for c in ev]

    def kl_now() -> float:
        out = [log_softmax(eng.forward(c)) for c in ev]
        return float(np.mean(np.concatenate([kl_rows(r, o) for r, o in zip(ref, out)])))

    def names(units):
        return ", ".join("LM head" if u == L else f"layer {u}" for u in units) or "-"

    rows = []
    eng.set_activation_bits(16)
    rows.append(("fp16 everywhere (the f16 GEMV)", [], kl_now()))
    eng.set_activation_bits(8)
    rows.append(("int8 everywhere (the GPU default)", [], kl_now()))
    for share in a.shares:
        for bits in (0, 16):
            units = eng.protect_activations(share, profile=prof, bits=bits)
            rows.append((f"protect_activations({share}, bits={bits})", units, kl_now()))
    fixed = [0, L - 1]  # FlexQ keeps 8-bit activations in the first and last layers by rule
    act = np.full((L, 7), 8, dtype=np.int32)
    act[fixed] = 0
    eng.set_activation_bits(act, lm_head_bits=8)
    rows.append(("fixed rule: first and last layer", fixed, kl_now()))
    print(f"\n{eng.path}: KL vs fp32 activations, {len(ev)} x 256 tokens of held-out text\n")
    print("| activations | protected units | KL vs fp32 activations |")
    print("|---|---|---|")
    for name, units, kl in rows:
        print(f"| {name} | {names(units)} | {kl:.5f} |" if kl >= 1e-4 else f"| {name} | {names(units)} | {kl:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
