"""Where a CUDA decode step spends its time, kernel by kernel (needs a GPU and torch).

Converts a synthetic model of a real shape with only a few layers (the per-layer kernels are the
same as the whole model's; the LM head is the real one), prefills a prompt, then traces decode
steps with CUPTI through torch.profiler (it records every kernel of the process, the engine's
CUDA graph nodes included) and prints, per kernel: launches per step, µs per step, share of the
step. The gap between the wall time of a step and the summed kernel time is what launches,
dependencies and the host cost.

    python tools/gpu_profile.py [--model llama2-7b] [--layers 2] [--bits 8 4] [--prompt 2048]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama2-7b", help="synthetic preset")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--file", help="an existing model file instead of a synthetic one")
    ap.add_argument("--kv-dtype", nargs="+", default=["f32"], choices=["f32", "f16"], help="KV cache types to profile")
    ap.add_argument("--pdl", nargs="+", type=int, default=[0], choices=[0, 1],
                    help="FLEXQUANT_CUDA_PDL values to profile (1: programmatic dependent launch; kernels then "
                         "overlap, so their summed time exceeds the step)")
    ap.add_argument("--mma-rows", nargs="+", type=int, default=[0], choices=range(9),
                    help="cuda_mma_min_rows values to profile (1: the one-row GEMV on the s8 tensor cores)")
    a = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    import flexquant_rt as fq
    from flexquant_rt.convert import SyntheticSource, convert

    work = tempfile.TemporaryDirectory()  # the synthetic file and the traces, removed at the end
    path = a.file
    if path is None:
        path = os.path.join(work.name, f"{a.model}-{a.layers}l.fq")
        t = time.perf_counter()
        convert(SyntheticSource(a.model, n_layers=a.layers, random_codes=True), path, progress=False)
        print(f"converted {a.model} with {a.layers} layers in {time.perf_counter() - t:.1f} s")
    for pdl, mma, kv, bits in [(pdl, mma, kv, bits) for pdl in a.pdl for mma in a.mma_rows for kv in a.kv_dtype
                               for bits in a.bits]:
        os.environ["FLEXQUANT_CUDA_PDL"] = str(pdl)  # read when the engine builds its CUDA forward pass
        eng = fq.Engine(path, backend="cuda", n_ctx=a.prompt + a.steps + 32, kv_dtype=kv, cuda_mma_min_rows=mma)
        if eng.backend != "cuda":
            raise SystemExit(f"needs a CUDA GPU: the engine runs on {eng.backend} ({eng._eng.backend_note})")
        name_of_model = os.path.basename(path) if a.file else a.model
        n_layers = eng.n_layers
        eng.set_layer_bits(bits)
        vocab = int(eng.config["vocab"])
        prompt = np.random.default_rng(0).integers(0, min(vocab, 30000), size=a.prompt).astype(np.int32)
        eng._eng.eval(prompt)
        tok = int(np.argmax(eng._eng.logits()))
        for _ in range(5):  # the graph capture and warm-up
            eng._eng.eval(np.array([tok], dtype=np.int32))
        torch.cuda.synchronize()
        walls = []
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                t = time.perf_counter()
                eng._eng.eval(np.array([tok], dtype=np.int32))
                walls.append(time.perf_counter() - t)
        # the trace's kernel records (cat "kernel", dur in µs): every kernel CUPTI saw, graph nodes
        # and launches from outside torch included
        trace = os.path.join(work.name, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
        per = collections.defaultdict(lambda: [0, 0.0])
        for ev in events:
            if ev.get("cat") != "kernel":
                continue
            name = ev["name"].replace("(anonymous namespace)::", "").replace("flexquant::", "")
            name = name.removeprefix("void ").split("(")[0][:90]  # the kernel and its template arguments
            per[name][0] += 1
            per[name][1] += float(ev["dur"])
        total = sum(v[1] for v in per.values()) / a.steps
        wall = float(np.median(walls)) * 1e6
        if total <= 0:
            raise SystemExit("CUPTI recorded no kernels (is this torch built with CUDA, and the engine on the GPU?)")
        print(f"\n## {name_of_model} x {n_layers} layers, {bits} bits, KV cache {kv}, PDL {pdl}, cuda_mma_min_rows {mma}, context {a.prompt}: "
              f"step {wall:.0f} µs wall (median), kernels {total:.0f} µs per step, "
              f"{(wall - total):.0f} µs outside kernels; per layer {total / n_layers:.1f} µs of kernels")
        print("| kernel | per step | µs per step | µs each | share |")
        print("|---|---|---|---|---|")
        for name, (cnt, us) in sorted(per.items(), key=lambda it: -it[1][1]):
            print(f"| {name} | {cnt / a.steps:.0f} | {us / a.steps:.1f} | {us / cnt:.2f} | {100 * us / a.steps / total:.1f}% |")
        eng.close()
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
