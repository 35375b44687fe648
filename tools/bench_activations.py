#!/usr/bin/env python3
"""Same-run A/B of the CPU matmuls' activations: an engine per `cpu_activations` in one process (the
default "i16" first: the baseline), run alternately for several rounds, medians printed as a table of
prefill and decode tok/s with each one's ratio to the baseline.

    python tools/bench_activations.py [MODEL.fq] [--acts i16 i8] [--bits 8 6 4] [--prompt 512]
                                      [--decode 64] [--rounds 7] [--threads N]

Alternating in one process takes the machine's drift (other tenants, clocks) out of the ratios, which
separate runs of tools/bench.py do not. FLEXQUANT_CPU=gfni etc. caps the kernels as for every tool.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="a .fq file (default: the default model)")
    ap.add_argument("--acts", nargs="+", default=["i16", "i8"], choices=("i16", "i8", "f32"),
                    help="cpu_activations to compare; the first is the baseline")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (random ids)")
    ap.add_argument("--decode", type=int, default=64, help="greedy tokens generated after a short prompt")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args(argv)

    from flexquant_rt import Engine
    from flexquant_rt._core import ops

    # kernel_table=None: the built-in decode/GEMM rule for all, so that a table saved for one setting
    # and not the other does not tilt the ratios
    engines = {act: Engine(a.model, backend="cpu", threads=a.threads, cpu_activations=act, kernel_table=None,
                           n_ctx=max(a.prompt, 64) + a.decode + 64) for act in a.acts}
    prompt = np.random.default_rng(0).integers(100, engines[a.acts[0]].config["vocab"] - 100,
                                               a.prompt).astype(np.int32)
    print(f"{engines[a.acts[0]].path}; kernels {ops.get_cpu_kernels()}, {a.threads} threads; "
          f"{a.prompt}-token prompt, {a.decode} decode steps; medians of {a.rounds} alternated rounds")
    print()
    print("| bits | activations | prefill tok/s | ratio | decode tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for bits in a.bits:
        pre = {act: [] for act in a.acts}
        dec = {act: [] for act in a.acts}
        for eng in engines.values():
            eng.set_layer_bits(bits, lm_head_bits=bits)
            eng.generate("Once upon a time", max_new_tokens=4, ignore_eos=True)  # warm: tables, pages
        for _ in range(a.rounds):
            for act, eng in engines.items():
                eng.reset()
                t = time.perf_counter()
                eng._eng.eval(prompt)  # (as tools/bench.py: the last position's logits only)
                pre[act].append(a.prompt / (time.perf_counter() - t))
                t = time.perf_counter()
                eng.generate("Once upon a time", max_new_tokens=a.decode, ignore_eos=True)
                dec[act].append(a.decode / (time.perf_counter() - t))
        base = a.acts[0]
        for act in a.acts:
            p, d = float(np.median(pre[act])), float(np.median(dec[act]))
            pb, db = float(np.median(pre[base])), float(np.median(dec[base]))
            print(f"| {bits} | {act} | {p:,.0f} | {p / pb:.2f}x | {d:.1f} | {d / db:.2f}x |", flush=True)
    for eng in engines.values():
        eng.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
