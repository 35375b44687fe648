#!/usr/bin/env python3
"""Decode-step benchmark of the CPU attention op over a KV cache of fp32, fp16 or q8.

    python tools/bench_attention.py [--positions 256 1024 2048] [--threads 2] [--repeats 9]
                                    [--layout heads tokens] [--cache float32 float16 q8]

One query token attends to `positions` cache rows in each of 30 layers (SmolLM2-135M's attention:
9 query heads, 3 KV heads, head_dim 64). Each layer has its own cache, so the rows come from memory
as in a decode step, not from the cache of the previous call. Printed per cache layout and dtype:
the time for all the layers (best of --repeats) and the cache bytes read over it (K and V rows up to
the query's position; for q8 the int8 codes and their scales, one float32 per 32 values). Layouts: `heads` (n_kv_heads, t, head_dim), the engine's, where each KV
head's rows are contiguous; `tokens` (t, n_kv_heads, head_dim), where they are strided. Values are
random: timing does not depend on them. Not a test.
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--threads", type=int, default=None, help="the ops pool's threads (default: all cores)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--layout", nargs="+", choices=["heads", "tokens"], default=["heads", "tokens"])
    ap.add_argument("--cache", nargs="+", choices=["float32", "float16", "q8"], default=["float32", "float16", "q8"])
    a = ap.parse_args()

    from flexquant_rt import _core

    ops = _core.ops
    if a.threads:
        ops.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, HEADS, HEAD_DIM)).astype(np.float32)
    print(f"CPU attention, {LAYERS} layers x ({HEADS} heads, {KV_HEADS} KV heads, head_dim {HEAD_DIM}), one token, "
          f"{ops.get_num_threads()} threads, kernels {ops.get_cpu_kernels()}, best of {a.repeats}")
    print("| positions | layout | cache | ms (all layers) | GB/s read |")
    print("|---|---|---|---|---|")
    for T, layout, cache in itertools.product(a.positions, a.layout, a.cache):
        shape = (KV_HEADS, T, HEAD_DIM) if layout == "heads" else (T, KV_HEADS, HEAD_DIM)
        layers = []  # per layer: the op's cache arguments
        for _ in range(LAYERS):
            k, v = rng.standard_normal(shape), rng.standard_normal(shape)
            if cache == "q8":  # int8 codes and a float32 scale per 32 values (the engine's q8 cache)
                (kc, ks), (vc, vs) = (ops.quantize_kv_q8(x.astype(np.float32).reshape(-1, HEAD_DIM)) for x in (k, v))
                layers.append(dict(k_cache=kc.reshape(shape), v_cache=vc.reshape(shape),
                                   k_scale=ks.reshape(shape[:2] + (-1,)), v_scale=vs.reshape(shape[:2] + (-1,))))
            else:
                dt = np.float32 if cache == "float32" else np.float16
                layers.append(dict(k_cache=k.astype(dt), v_cache=v.astype(dt)))
        best = float("inf")
        for _ in range(a.repeats):
            t = time.perf_counter()
            for args in layers:
                ops.attention(q, p0=T - 1, layout=layout, **args)
            best = min(best, time.perf_counter() - t)
        nbytes = sum(x.nbytes for args in layers for x in args.values())
        print(f"| {T} | {layout} | {cache} | {best * 1e3:.2f} | {nbytes / best / 1e9:.1f} |")

if __name__ == "__main__":
    main()
