#!/usr/bin/env python3
"""Decode-step benchmark of the CPU attention op over a KV cache of fp32 and of fp16.

    python tools/bench_attention.py [--positions 256 1024 2048] [--threads 2] [--repeats 9]
                                    [--layout heads tokens]

One query token attends to `positions` cache rows in each of 30 layers (SmolLM2-135M's attention:
9 query heads, 3 KV heads, head_dim 64). Each layer has its own cache, so the rows come from memory
as in a decode step, not from the cache of the previous call. Printed per cache layout and dtype:
the time for all the layers (best of --repeats) and the cache bytes read over it (K and V rows up to
the query's position). Layouts: `heads` (n_kv_heads, t, head_dim), the engine's, where each KV
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
    for T, layout, dt in itertools.product(a.positions, a.layout, (np.float32, np.float16)):
        shape = (KV_HEADS, T, HEAD_DIM) if layout == "heads" else (T, KV_HEADS, HEAD_DIM)
        ks = [rng.standard_normal(shape).astype(dt) for _ in range(LAYERS)]
        vs = [rng.standard_normal(shape).astype(dt) for _ in range(LAYERS)]
        best = float("inf")
        for _ in range(a.repeats):
            t = time.perf_counter()
            for k, v in zip(ks, vs):
                ops.attention(q, k, v, T - 1, layout=layout)
            best = min(best, time.perf_counter() - t)
        nbytes = LAYERS * 2 * T * KV_HEADS * HEAD_DIM * np.dtype(dt).itemsize
        print(f"| {T} | {layout} | {np.dtype(dt).name} | {best * 1e3:.2f} | {nbytes / best / 1e9:.1f} |")


if __name__ == "__main__":
    main()
