#!/usr/bin/env python3
"""What the CPU's fast numerics cost in accuracy and gain in speed: the fp16 and q8 KV caches and
int16 activations in the matmuls, each against fp32.

    python tools/numerics_quality.py [MODEL.fq] [--chunks 2] [--len 512] [--bits 8] [--threads N]

The reference is the engine with the fp32 cache and fp32 activations at that bit-width, each chunk of
held-out real text (the evaluation half of Python's pydoc topics, controller.calibration_text) in
one forward pass. Then an engine with each setting (KV cache x activations) decodes the same chunks
token by token, teacher-forced, as `flexquant-rt eval` runs a policy (evaluate.run_policy): per
token KL(reference || engine) and top-1 agreement, per engine the perplexity and the decode tok/s.
The fp32 / fp32 row is the floor: what decoding step by step instead of in one pass changes by
itself. The f16 / i16 row is the CPU engine's default. A second table runs each chunk through each
engine in one pass, as a prompt is run (its matmuls on the GEMM kernels, the int16 GEMMs with i16),
against the same reference; there the fp32 / fp32 row is the reference itself. With no model, the
default model (SmolLM2-135M-Instruct). Not a test.
"""
from __future__ import annotations

import argparse

import numpy as np

SETTINGS = [("f32", "f32"), ("f16", "f32"), ("f32", "i16"), ("f16", "i16"), ("q8", "f32"),
            ("q8", "i16")]  # (KV cache, activations)


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
    engs = {s: Engine(path, backend="cpu", kv_dtype=s[0], cpu_activations=s[1], n_ctx=a.len + 8, threads=a.threads)
            for s in SETTINGS}
    ref_eng = engs[SETTINGS[0]]
    chunks = text_chunks(ref_eng, calibration_text("evaluation"), a.chunks, a.len, seed=7)
    ref_eng.set_layer_bits(a.bits, lm_head_bits=a.bits)
    ref = [log_softmax(ref_eng.forward(c)) for c in chunks]
    print(f"{path}: {a.bits} bits, {a.chunks} chunks x {a.len} tokens of held-out text, teacher-forced decode "
          f"against the fp32 cache's and fp32 activations' one-pass logits")
    print("| KV cache | activations | KL mean | KL p99 | KL max | top-1 agreement | perplexity | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for (kv, act), e in engs.items():
        r = run_policy(e, lambda: Static(a.bits), chunks, ref, f"{kv}/{act}", None)
        k = r.per_token_kl
        print(f"| {kv} | {act} | {k.mean():.2e} | {np.quantile(k, 0.99):.2e} | {k.max():.2e} | {r.top1:.4f} | "
              f"{r.ppl:.4f} | {r.tok_s:.1f} |")

    print()
    print("One pass per chunk (the prompt path), against the same reference:")
    print("| KV cache | activations | KL mean | KL p99 | KL max | top-1 agreement | perplexity |")
    print("|---|---|---|---|---|---|---|")
    for (kv, act), e in engs.items():
        e.set_layer_bits(a.bits, lm_head_bits=a.bits)
        kls, agree, nll = [], [], []
        for c, lr in zip(chunks, ref):
            lp = log_softmax(e.forward(c))
            kls.append((np.exp(lr) * (lr - lp)).sum(-1))
            agree.append(lr.argmax(-1) == lp.argmax(-1))
            nll.append(-lp[np.arange(len(c) - 1), np.asarray(c[1:])])
        k, top1, ppl = np.concatenate(kls), np.concatenate(agree).mean(), float(np.exp(np.concatenate(nll).mean()))
        print(f"| {kv} | {act} | {k.mean():.2e} | {np.quantile(k, 0.99):.2e} | {k.max():.2e} | {top1:.4f} | {ppl:.4f} |")


if __name__ == "__main__":
    main()
