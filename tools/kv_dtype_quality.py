#!/usr/bin/env python3
"""What an fp16 KV cache costs in accuracy and gains in speed, against the fp32 cache.

    python tools/kv_dtype_quality.py [MODEL.fq] [--chunks 2] [--len 512] [--bits 8] [--threads N]

The reference is the engine with the fp32 cache at that bit-width, each chunk of held-out real text
(the evaluation half of Python's pydoc topics, controller.calibration_text) in one forward pass.
Then an engine with each cache decodes the same chunks token by token, teacher-forced, as `flexquant-rt
eval` runs a policy (evaluate.run_policy): per token KL(reference || engine) and top-1 agreement,
per engine the perplexity and the decode tok/s. The fp32 row is the floor: what decoding step by
step instead of in one pass changes by itself. With no model, the default model
(SmolLM2-135M-Instruct). Not a test.
"""
from __future__ import annotations

import argparse

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
    from flexquant_rt.controller import Static, calibration_text, log_softmax, text_chunks
    from flexquant_rt.default_model import default_model_path
    from flexquant_rt.evaluate import run_policy

    path = a.model or str(default_model_path())
    engs = {d: Engine(path, backend="cpu", kv_dtype=d, n_ctx=a.len + 8, threads=a.threads) for d in ("f32", "f16")}
    chunks = text_chunks(engs["f32"], calibration_text("evaluation"), a.chunks, a.len, seed=7)
    engs["f32"].set_layer_bits(a.bits, lm_head_bits=a.bits)
    ref = [log_softmax(engs["f32"].forward(c)) for c in chunks]
    print(f"{path}: {a.bits} bits, {a.chunks} chunks x {a.len} tokens of held-out text, teacher-forced decode "
          f"against the fp32 cache's one-pass logits")
    print("| cache | KL mean | KL p99 | KL max | top-1 agreement | perplexity | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for d, e in engs.items():
        r = run_policy(e, lambda: Static(a.bits), chunks, ref, d, None)
        k = r.per_token_kl
        print(f"| {d} | {k.mean():.2e} | {np.quantile(k, 0.99):.2e} | {k.max():.2e} | {r.top1:.4f} | {r.ppl:.4f} | "
              f"{r.tok_s:.1f} |")


if __name__ == "__main__":
    main()
