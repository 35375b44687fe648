#!/usr/bin/env python3
"""Decode-step benchmark of the CPU bit-plane matmul against a numpy fp32 matvec of the same shape.

    python tools/bench_ops.py [--threads 1 2] [--bits 8 6 4] [--act f32 i16]
                              [--kernels avx512|avx512-nogfni|avx512-nogfni-novnni|gfni|avx2|vec128|portable]
                              [--seconds 0.3]

For each thread count a fresh process runs with numpy's BLAS limited to the same number of threads
(OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS) and the ops pool set to it, so both
sides of every ratio are measured in the same process, on the same machine state. Printed:

- per linear shape (M = 1, one token): time per call and effective GB/s, i.e. the bytes the product
  must read (k planes + fp16 group parameters for the bit-plane store, 4·N·K for fp32) over the
  time. Each shape cycles through enough copies of its weights (>= 64 MiB) that they come from
  memory, not from the 32 MiB L3, as they would in a real decode step;
- per token for SmolLM2-135M: all 30 layers x 7 linears + the LM head, each with its own weights,
  one after another (the matmul part of a decode step; attention and norms are not included).

Shapes: SmolLM2-135M (hidden 576, ffn 1536, 9 heads x 64, 3 KV heads, vocab 49152) and one
Llama-2-7B layer (4096x4096, 11008x4096, 4096x11008). Weights are random: timing does not depend
on the values. --act: the activations the product runs on, each measured in the same process: f32
(as given) and i16 (rounded to int16 per group: the engine's CPU default; the AVX-512 kernel
multiplies integers). Not a test: nothing asserts on time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SMOL = dict(hidden=576, ffn=1536, layers=30, heads=9, head_dim=64, kv_heads=3, vocab=49152)
# (name, N, K) per decode step of SmolLM2-135M, per layer, then the head.
SMOL_LAYER = [("q", 576, 576), ("k", 192, 576), ("v", 192, 576), ("o", 576, 576),
              ("gate", 1536, 576), ("up", 1536, 576), ("down", 576, 1536)]
SMOL_HEAD = ("head", 49152, 576)
LLAMA7B = [("7b q/k/v/o", 4096, 4096), ("7b gate/up", 11008, 4096), ("7b down", 4096, 11008)]
SHAPES = ([("smol " + n, N, K) for n, N, K in [SMOL_LAYER[0], SMOL_LAYER[1], SMOL_LAYER[4], SMOL_LAYER[6]]]
          + [("smol " + SMOL_HEAD[0], SMOL_HEAD[1], SMOL_HEAD[2])] + LLAMA7B)
MAX_BITS = 8
GROUP = 128
COLD_BYTES = 64 << 20  # cycle through at least this much weight data per shape


def random_linear(rng, n, k):
    import numpy as np

    n_pad, k_pad = -(-n // 8) * 8, -(-k // 128) * 128
    # 64-byte aligned, as the model file's tensors are (numpy's large arrays start 16 bytes past a
    # page, where every 64-byte load of the AVX-512 kernel would straddle two cache lines)
    size = MAX_BITS * n_pad * k_pad // 8
    buf = np.empty(size + 64, np.uint8)
    off = -buf.ctypes.data % 64
    planes = buf[off:off + size].reshape(MAX_BITS, n_pad * k_pad // 8)
    planes[...] = rng.integers(0, 256, planes.shape, dtype=np.uint8)
    ng = -(-k // GROUP)
    qp = np.stack([rng.uniform(1e-3, 1e-2, (n, ng)), rng.uniform(-1.0, 0.0, (n, ng))], -1).astype(np.float16)
    return planes, qp


def best_time(fn, seconds):
    """Best of 3 rounds of the mean time per call over `seconds / 3`."""
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        calls = 0
        while True:
            fn()
            calls += 1
            dt = time.perf_counter() - t0
            if dt >= seconds / 3:
                break
        best = min(best, dt / calls)
    return best


def child(threads: int, bits_list, acts, seconds: float, kernels: str | None) -> dict:
    import numpy as np

    import flexquant_rt._core as core

    ops = core.ops
    ops.set_num_threads(threads)
    if kernels:
        # avx512-nogfni: as Cascade Lake (AVX-512 and its VNNI, no GFNI); -novnni: as Skylake-SP
        ops.set_cpu_kernels(kernels.split("-")[0], gfni="nogfni" not in kernels, avx512vnni="novnni" not in kernels)
    rng = np.random.default_rng(0)
    out = dict(threads=threads, kernels=f"{ops.get_cpu_kernels()} ({' '.join(ops.cpu_features_in_use()) or '-'})",
               shapes=[], token={})

    for name, n, k in SHAPES:
        x = rng.standard_normal(k).astype(np.float32)
        lin = random_linear(rng, n, k)
        copies = max(1, min(64, -(-COLD_BYTES // lin[0].nbytes)))
        lins = [lin] + [random_linear(rng, n, k) for _ in range(copies - 1)]
        row = dict(name=name, n=n, k=k, bits={})
        for bits in bits_list:
            for act in acts:
                it = iter(range(1 << 62))
                nbytes = ops.bitplane_bytes_at(lin[0].shape[1], n, k, GROUP, bits)

                def call():
                    p, q = lins[next(it) % copies]
                    ops.bitplane_matmul(p, q, n, k, MAX_BITS, GROUP, bits, x, act=act)

                t = best_time(call, seconds)
                row["bits"][f"{bits}/{act}"] = dict(us=t * 1e6, gbs=nbytes / t / 1e9)
        del lins
        w = rng.standard_normal((n, k), dtype=np.float32)
        copies = max(1, min(64, -(-COLD_BYTES // w.nbytes)))
        ws = [w] + [rng.standard_normal((n, k), dtype=np.float32) for _ in range(copies - 1)]
        it = iter(range(1 << 62))
        t = best_time(lambda: ws[next(it) % copies] @ x, seconds)
        row["numpy"] = dict(us=t * 1e6, gbs=4 * n * k / t / 1e9)
        del ws
        out["shapes"].append(row)

    # One SmolLM2 decode step's linears, each with its own weights.
    step = [(N, K) for _ in range(SMOL["layers"]) for _, N, K in SMOL_LAYER] + [SMOL_HEAD[1:]]
    lins = [random_linear(rng, N, K) for N, K in step]
    xs = {K: rng.standard_normal(K).astype(np.float32) for _, K in step}
    for bits in bits_list:
        nbytes = sum(ops.bitplane_bytes_at(p.shape[1], N, K, GROUP, bits) for (p, _), (N, K) in zip(lins, step))
        for act in acts:

            def token():
                for (p, q), (N, K) in zip(lins, step):
                    ops.bitplane_matmul(p, q, N, K, MAX_BITS, GROUP, bits, xs[K], act=act)

            t = best_time(token, max(seconds * 3, 0.5))
            out["token"][f"{bits}/{act}"] = dict(ms=t * 1e3, gbs=nbytes / t / 1e9)
    del lins
    ws = [rng.standard_normal((N, K), dtype=np.float32) for N, K in step]

    def token_np():
        for w in ws:
            w @ xs[w.shape[1]]

    t = best_time(token_np, max(seconds * 3, 0.5))
    out["token"]["numpy"] = dict(ms=t * 1e3, gbs=sum(4 * w.size for w in ws) / t / 1e9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    ap.add_argument("--act", nargs="+", choices=["f32", "i16"], default=["f32", "i16"],
                    help="activations: f32 as given, i16 rounded per group (default: both)")
    ap.add_argument("--kernels", choices=["avx512", "avx512-nogfni", "avx512-nogfni-novnni", "gfni", "avx2", "vec128",
                                          "portable"],
                    default=None, help="cap the kernel family (default: the best this CPU has); avx512-nogfni: "
                    "as Cascade Lake, avx512-nogfni-novnni: as Skylake-SP")
    ap.add_argument("--seconds", type=float, default=0.3, help="measuring time per configuration")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(child(a.child, a.bits, a.act, a.seconds, a.kernels)))
        return

    results = []
    for t in a.threads:
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(t), OMP_NUM_THREADS=str(t), MKL_NUM_THREADS=str(t))
        cmd = [sys.executable, __file__, "--child", str(t), "--seconds", str(a.seconds), "--bits", *map(str, a.bits),
               "--act", *a.act]
        if a.kernels:
            cmd += ["--kernels", a.kernels]
        res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))

    print(f"bit-plane decode matmul (M = 1) vs numpy fp32 matvec; kernels: {results[0]['kernels']}; "
          f"GB/s = bytes the product reads / time")
    head = f"{'shape':<16}{'N x K':>13}  {'k':>3} {'act':>4}"
    for r in results:
        head += f" | {r['threads']} thr: {'us':>7} {'GB/s':>6} {'fp32 us':>8} {'GB/s':>6} {'x':>5}"
    print(head)
    print("-" * len(head))
    for i, row in enumerate(results[0]["shapes"]):
        for bits in a.bits:
            for act in a.act:
                line = f"{row['name']:<16}{row['n']:>6} x {row['k']:<5} {bits:>3} {act:>4}"
                for r in results:
                    s = r["shapes"][i]
                    b, npy = s["bits"][f"{bits}/{act}"], s["numpy"]
                    line += (f" | {'':6} {b['us']:7.0f} {b['gbs']:6.1f} {npy['us']:8.0f} {npy['gbs']:6.1f} "
                             f"{npy['us'] / b['us']:5.2f}")
                print(line)
    print()
    print("SmolLM2-135M, matmuls of one decode step (30 layers x 7 linears + LM head, separate weights)")
    for r in results:
        tok = r["token"]
        npy = tok["numpy"]
        print(f"  {r['threads']} thread(s): fp32 numpy {npy['ms']:6.2f} ms ({npy['gbs']:5.1f} GB/s)")
        for act in a.act:
            parts = []
            for bits in a.bits:
                b = tok[f"{bits}/{act}"]
                parts.append(f"k={bits}: {b['ms']:6.2f} ms ({b['gbs']:5.1f} GB/s, {npy['ms'] / b['ms']:4.2f}x)")
            print(f"    act {act}: " + " | ".join(parts))


if __name__ == "__main__":
    main()
