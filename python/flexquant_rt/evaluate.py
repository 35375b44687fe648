"""Evaluation of precision policies on held-out real text (flexquant-rt eval / tools/eval.py).

Every policy runs real token-by-token decoding, teacher-forced: the KV cache is built at the
precisions the policy actually chose. Per policy: perplexity, mean KL(reference || policy), top-1
agreement with the reference, mean bits per weight actually read (weighted by each linear's size,
LM head included), tokens/s and the controller's share of the step time. The reference is the
unquantized source model run by transformers (fp32), or the engine at max_bits when no source
is given. The per-token oracle (cheapest uniform k whose KL at this token is below a threshold,
from the static runs; it ignores that earlier tokens would have run at other precisions) is
reported as an upper bound.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .controller import (FlexQuant, InputAware, LayerwiseStatic, LinearwiseStatic, Profile, SinkProtect, Static,
                         calibration_text, kl_rows, log_softmax, text_chunks)


@dataclass
class Result:
    policy: str
    budget: float | None
    mean_bits: float
    kld: float
    ppl: float
    top1: float
    tok_s: float
    ctrl_pct: float
    per_token_kl: np.ndarray
    per_token_bits: np.ndarray


def reference_logprobs(source: str | None, chunks: Sequence[Sequence[int]], engine) -> list[np.ndarray]:
    """Log-probabilities of the reference model on each chunk."""
    if source is None:
        engine.set_layer_bits(engine.max_bits, lm_head_bits=engine.max_bits)
        return [log_softmax(engine.forward(c)) for c in chunks]
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(source)
    if p.is_file():
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for c in chunks:
            out.append(torch.log_softmax(model(torch.tensor([list(c)])).logits[0].double(), -1).numpy())
    return out


def run_policy(engine, make_controller: Callable[[], object], chunks, ref: list[np.ndarray], name: str,
               budget: float | None) -> Result:
    kls, bits, nll, agree = [], [], [], []
    t_ctrl = 0.0
    t0 = time.perf_counter()
    n_steps = 0
    for chunk, r in zip(chunks, ref):
        ctrl = make_controller()
        engine.reset()
        with engine.controlled(ctrl):
            for i, tok in enumerate(chunk):
                logits = engine.decode(tok)
                info = engine.step_info(tok)
                lq = log_softmax(logits[None])[0]
                kls.append(float(kl_rows(r[i][None], lq[None])[0]))
                bits.append(info.mean_bits)
                agree.append(int(np.argmax(lq) == np.argmax(r[i])))
                if i + 1 < len(chunk):
                    nll.append(-float(lq[chunk[i + 1]]))
                t = time.perf_counter()
                engine._apply(ctrl.mask(info))
                t_ctrl += time.perf_counter() - t
                n_steps += 1
    wall = time.perf_counter() - t0
    return Result(name, budget, float(np.mean(bits)), float(np.mean(kls)), float(np.exp(np.mean(nll))),
                  float(np.mean(agree)), n_steps / wall, 100.0 * t_ctrl / wall, np.asarray(kls), np.asarray(bits))


def oracle_curve(static: dict[int, Result], thresholds: Sequence[float]) -> list[tuple[float, float, float]]:
    """(threshold, mean bits, mean KL) of the per-token oracle over the static runs."""
    ks = sorted(static)
    kl = np.stack([static[k].per_token_kl for k in ks])  # (levels, tokens)
    out = []
    for th in thresholds:
        ok = kl <= th
        ok[-1] = True  # the highest precision is always allowed
        idx = ok.argmax(0)
        chosen_bits = np.asarray(ks)[idx]
        out.append((th, float(chosen_bits.mean()), float(kl[idx, np.arange(kl.shape[1])].mean())))
    return out


def evaluate(engine, profile: Profile, *, source: str | None = None, n_chunks: int = 3, chunk_len: int = 256,
             budgets: Sequence[float] = (5.0, 5.5, 6.0, 6.5, 7.0), static_bits: Sequence[int] = (3, 4, 5, 6, 7, 8),
             seed: int = 1, log: Callable[[str], None] = print) -> tuple[list[Result], list, dict]:
    chunks = text_chunks(engine, calibration_text("evaluation"), n_chunks, chunk_len, seed=seed)
    log(f"reference log-probs on {n_chunks} x {chunk_len} held-out tokens ({'transformers: ' + source if source else 'engine at max bits'})")
    ref = reference_logprobs(source, chunks, engine)
    results: list[Result] = []
    static: dict[int, Result] = {}
    B = profile.max_bits
    for k in static_bits:
        r = run_policy(engine, lambda k=k: Static(k), chunks, ref, f"static {k}", float(k))
        static[k] = r
        results.append(r)
        log(_row(r))
        if k < B:
            r = run_policy(engine, lambda k=k: SinkProtect(Static(k), B), chunks, ref, "SinkProtect(static)", float(k))
            results.append(r)
            log(_row(r))

    def neighbours(b):
        lo = int(np.floor(b))
        return FlexQuant(profile, b, levels=(lo, lo + 1)) if lo < B else Static(B)

    for b in budgets:
        for name, make in (("LayerwiseStatic", lambda b=b: LayerwiseStatic(profile, b)),
                           ("LinearwiseStatic", lambda b=b: LinearwiseStatic(profile, b)),
                           ("SinkProtect(LinearwiseStatic)", lambda b=b: SinkProtect(LinearwiseStatic(profile, b), B)),
                           ("FlexQuant 4/8", lambda b=b: FlexQuant(profile, b, levels=(4, 8))),
                           ("FlexQuant neighbours", lambda b=b: neighbours(b)),
                           ("InputAware", lambda b=b: InputAware(profile, b)),
                           ("SinkProtect(LayerwiseStatic)", lambda b=b: SinkProtect(LayerwiseStatic(profile, b), B)),
                           ("SinkProtect(FlexQuant neighbours)", lambda b=b: SinkProtect(neighbours(b), B))):
            r = run_policy(engine, make, chunks, ref, name, b)
            results.append(r)
            log(_row(r))
    oracle = oracle_curve(static, [0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1])
    # how well each signal predicts a token's sensitivity (KL at 5 bits): correlations
    corr = {}
    if 5 in static and 8 in static:
        kl5 = static[5].per_token_kl
        ent = []
        for r_ in ref:
            e = -(np.exp(r_) * r_).sum(-1)
            ent.append(np.concatenate([[np.nan], e[:-1]]))
        prev_ent = np.concatenate(ent)
        m = ~np.isnan(prev_ent)
        corr["previous-token entropy vs KL at 5 bits"] = float(np.corrcoef(prev_ent[m], kl5[m])[0, 1])
        own = np.concatenate([-(np.exp(r_) * r_).sum(-1) for r_ in ref])
        corr["current-token entropy (not known before the step) vs KL at 5 bits"] = float(np.corrcoef(own, kl5)[0, 1])
        ia = [r for r in results if r.policy == "InputAware"]
        if ia:
            x = np.concatenate([ia_r.per_token_bits for ia_r in ia[:1]])
            corr["InputAware bits (first budget) vs KL at 5 bits"] = float(np.corrcoef(x, kl5)[0, 1])
    return results, oracle, corr


def _row(r: Result) -> str:
    b = f"{r.budget:.2f}" if r.budget is not None else "-"
    return (f"| {r.policy} | {b} | {r.mean_bits:.3f} | {r.kld:.5f} | {r.ppl:.3f} | {r.top1:.3f} | "
            f"{r.tok_s:.1f} | {r.ctrl_pct:.2f}% |")


HEADER = ("| policy | budget | mean bits | KLD | perplexity | top-1 agree | tok/s | controller % of step |\n"
          "|---|---|---|---|---|---|---|---|")


def write_report(results: list[Result], oracle, corr: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [HEADER] + [_row(r) for r in results]
    lines += ["", "Per-token oracle (upper bound; from the static runs):", "",
              "| KL threshold | mean bits | KLD |", "|---|---|---|"]
    lines += [f"| {t} | {b:.3f} | {k:.5f} |" for t, b, k in oracle]
    lines += ["", "Signal correlations (Pearson):", ""] + [f"- {k}: {v:.3f}" for k, v in corr.items()]
    (out / "eval.md").write_text("\n".join(lines) + "\n")
    with open(out / "eval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "budget", "mean_bits", "kld", "ppl", "top1", "tok_s", "ctrl_pct"])
        for r in results:
            w.writerow([r.policy, r.budget, r.mean_bits, r.kld, r.ppl, r.top1, r.tok_s, r.ctrl_pct])
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out / "eval.md"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault("static uniform" if r.policy.startswith("static") else r.policy, []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r.mean_bits)
        ax.plot([r.mean_bits for r in rs], [r.kld for r in rs], marker="o", label=name)
    ax.plot([b for _, b, _ in oracle], [k for _, _, k in oracle], "k--", label="per-token oracle (bound)")
    ax.set_yscale("log")
    ax.set_xlabel("mean bits per weight read")
    ax.set_ylabel("KL divergence vs unquantized")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "eval.png", dpi=120)
    plt.close(fig)
    return out / "eval.md"
