#!/usr/bin/env python3
"""What an fp16 KV cache costs in accuracy and gains in speed, against the fp32 cache.

    python tools/kv_dtype_quality.py [MODEL.fq] [--chunks 2] [--len 512] [--bits 8] [--threads N]

Two engines on the same model, one with each cache, decode the same held-out real text (the
evaluation half of Python's pydoc topics, controller.calibration_text) token by token, teacher
forced, at the same bit-width. Per token: KL(fp32 cache || fp16 cache) of the next-token
distributions, whether their top-1 agree, the largest log-probability difference; per engine: the
perplexity and the decode time (the two engines alternate token by token, so machine noise hits
both alike; each has its own thread pool, whose workers spin briefly after a call, which slows
both a little: --threads 1 avoids it). With no model, the default model (SmolLM2-135M-Instruct).
Not a test.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--len", type=int, default=512, help="tokens per chunk")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()

    from flexquant_rt import Engine
    from flexquant_rt.controller import calibration_text, kl_rows, log_softmax, text_chunks
    from flexquant_rt.default_model import default_model_path

    path = a.model or str(default_model_path())
    engs = {d: Engine(path, backend="cpu", kv_dtype=d, n_ctx=a.len + 8, threads=a.threads) for d in ("f32", "f16")}
    for e in engs.values():
        e.set_layer_bits(a.bits, lm_head_bits=a.bits)
    chunks = text_chunks(engs["f32"], calibration_text("evaluation"), a.chunks, a.len, seed=7)
    kls, agree, worst = [], [], 0.0
    nll = {d: [] for d in engs}
    secs = {d: 0.0 for d in engs}
    for c in chunks:
        for e in engs.values():
            e.reset()
        for i, tok in enumerate(c):
            lp = {}
            for d, e in engs.items():
                t = time.perf_counter()
                logits = e.decode(tok)
                secs[d] += time.perf_counter() - t
                lp[d] = log_softmax(np.asarray(logits, dtype=np.float64)[None])[0]
            kls.append(float(kl_rows(lp["f32"][None], lp["f16"][None])[0]))
            agree.append(int(np.argmax(lp["f32"]) == np.argmax(lp["f16"])))
            worst = max(worst, float(np.max(np.abs(lp["f32"] - lp["f16"]))))
            if i + 1 < len(c):
                for d in engs:
                    nll[d].append(-lp[d][c[i + 1]])
    k = np.asarray(kls)
    n = sum(len(c) for c in chunks)
    print(f"{path}: {a.bits} bits, {a.chunks} chunks x {a.len} tokens of held-out text, teacher-forced decode")
    print(f"KL(f32 cache || f16 cache): mean {k.mean():.2e}, p99 {np.quantile(k, 0.99):.2e}, max {k.max():.2e}")
    print(f"top-1 agreement {np.mean(agree):.5f}; largest |log-prob difference| {worst:.2e}")
    for d in engs:
        print(f"{d} cache: perplexity {np.exp(np.mean(nll[d])):.4f}, decode {n / secs[d]:.1f} tok/s "
              f"(mean over positions 0..{a.len - 1})")


if __name__ == "__main__":
    main()
