#!/usr/bin/env python3
"""Experiment: AWQ-style output-error search of the fold exponent per site (issue 9 follow-up).

Calibration (first half of pydoc_data.topics, with Grams) is cached; each config converts
SmolLM2 with the searched fold and measures every view as tools/view_quality.py does."""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import view_quality as vq  # noqa: E402
from flexquant_rt import convert as C  # noqa: E402


def mlp_inputs(n_tok: int) -> dict[int, np.ndarray]:
    """Sampled inputs of every layer's MLP (post_attention_layernorm output) on the calibration text."""
    import torch
    from flexquant_rt.controller import calibration_text
    model, tok = vq.load_model()
    ids = tok(calibration_text("calibration"), add_special_tokens=False)["input_ids"]
    xs: dict[int, list] = {}
    hooks = [l.mlp.register_forward_hook(lambda m, inp, out, i=i: xs.setdefault(i, []).append(
        inp[0][0].detach().numpy().copy())) for i, l in enumerate(model.model.layers)]
    with torch.no_grad():
        for c in range(4):
            model(torch.tensor([ids[c * 512:(c + 1) * 512]]))
    for h in hooks:
        h.remove()
    stride = max(1, 2048 // n_tok)
    return {i: np.concatenate(v)[::stride].astype(np.float32) for i, v in xs.items()}


def pick_alpha(self, names, scale_of, view_error) -> np.ndarray:
    """The grid search both block objectives share: the scale whose views minimise
    Σ_k use_k · 4^k · view_error(s, k) (view_error(s, None) first prepares the views of scale s)."""
    best = None
    for a in C.OUTPUT_ALPHA_GRID:
        s = scale_of(a)
        view_error(s, None)
        e = sum(use * 4.0 ** k * view_error(s, k) for k, use in C.OUTPUT_VIEW_USE.items())
        if best is None or e < best[0]:
            best = (e, a, s)
    self.alphas[names[0]] = best[1]
    self.betas[names[0]] = 0.0
    return best[2]


def patch_mlp_block(xs: dict[int, np.ndarray]) -> None:
    """ScaleFold's search for the gate/up site: error of the MLP output (fp down_proj)."""
    from flexquant_rt import bitplane
    orig = C.ScaleFold._site

    def silu(z):
        return z / (1.0 + np.exp(-z))

    def site(self, names, scale_of):
        if not names[0].endswith("ffn_gate"):
            return orig(self, names, scale_of)
        load, group = self.search
        i = int(names[0].split(".")[1])
        x = xs[i]
        wg, wu = (np.asarray(load(n), np.float32) for n in names)
        wd = np.asarray(load(f"blk.{i}.ffn_down"), np.float32)
        h = silu(x @ wg.T) * (x @ wu.T)
        views = []

        def view_error(s, k):
            if k is None:  # the views of both linears at this scale
                views[:] = []
                for w in (wg, wu):
                    codes, qp = bitplane.quantize(w * s, 8, group)
                    views.append({kk: bitplane.dequantize(codes, qp, kk, 8, group) / s for kk in C.OUTPUT_VIEW_USE})
                return 0.0
            d = (silu(x @ views[0][k].T) * (x @ views[1][k].T) - h) @ wd.T
            return float(np.einsum("ij,ij->", d, d))
        return pick_alpha(self, names, scale_of, view_error)
    C.ScaleFold._site = site


def patch_attn_block() -> None:
    """ScaleFold's search for the q/k/v site: error of the attention block's output (fp o_proj),
    replaying each layer's self_attn on one calibration chunk with the views of q, k, v."""
    import torch
    from flexquant_rt import bitplane
    from flexquant_rt.controller import calibration_text
    model, tok = vq.load_model()
    ids = tok(calibration_text("calibration"), add_special_tokens=False)["input_ids"]
    calls = {}
    hooks = [l.self_attn.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: calls.setdefault(i, (args, kwargs)), with_kwargs=True)
        for i, l in enumerate(model.model.layers)]
    with torch.no_grad():
        model(torch.tensor([ids[1024:1536]]))
    for h in hooks:
        h.remove()
    orig = C.ScaleFold._site

    def site(self, names, scale_of):
        if not names[0].endswith("attn_q"):
            return orig(self, names, scale_of)
        load, group = self.search
        i = int(names[0].split(".")[1])
        attn = model.model.layers[i].self_attn
        lins = (attn.q_proj, attn.k_proj, attn.v_proj)
        ws = [np.asarray(load(n), np.float32) for n in names]
        for lin, w in zip(lins, ws):
            lin.weight.data = torch.from_numpy(w.copy())
        args, kwargs = calls[i]
        with torch.no_grad():
            ref = attn(*args, **kwargs)[0]
            qs = []

            def view_error(s, k):
                if k is None:  # quantize q, k, v at this scale
                    qs[:] = [bitplane.quantize(w * s, 8, group) for w in ws]
                    return 0.0
                for lin, (codes, qp) in zip(lins, qs):
                    lin.weight.data = torch.from_numpy(bitplane.dequantize(codes, qp, k, 8, group) / s)
                d = attn(*args, **kwargs)[0] - ref
                return float((d * d).sum())
            return pick_alpha(self, names, scale_of, view_error)
    C.ScaleFold._site = site


def main() -> int:
    import torch
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--use", default='{"4": 1}', help="OUTPUT_VIEW_USE as JSON")
    ap.add_argument("--grid", type=float, nargs="*")
    ap.add_argument("--beta", type=float, nargs="*")
    ap.add_argument("--mlp-block", action="store_true", help="gate/up site: MLP-output error on sampled tokens")
    ap.add_argument("--attn-block", action="store_true", help="qkv site: attention-output error (one 512-token chunk)")
    ap.add_argument("--cal-chunks", type=int, default=4)
    ap.add_argument("--mlp-tokens", type=int, default=512)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8])
    ap.add_argument("--tag", required=True)
    ap.add_argument("--work", default="/tmp/fq9b")
    ap.add_argument("--ref-work", default="/tmp/fq_i9")
    a = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(a.work)
    C.OUTPUT_VIEW_USE = {int(k): float(v) for k, v in json.loads(a.use).items()}
    if a.grid:
        C.OUTPUT_ALPHA_GRID = tuple(a.grid)
    if a.beta:
        C.OUTPUT_BETA_GRID = tuple(a.beta)
    src = C.GGUFSource(vq.smollm2_gguf())
    sp = work / ("stats_gram.pkl" if a.cal_chunks == 4 else f"stats_gram{a.cal_chunks}.pkl")
    if sp.is_file():
        stats = pickle.loads(sp.read_bytes())
    else:
        t0 = time.time()
        stats = C.calibration_stats(src, n_chunks=a.cal_chunks, gram=True)
        print(f"calibration {time.time() - t0:.0f}s", flush=True)
        sp.write_bytes(pickle.dumps(stats))
    f = work / f"{a.tag}_g{a.group}.fq"
    if a.mlp_block:
        xp = work / "mlp_x.pkl"
        if xp.is_file():
            xs = pickle.loads(xp.read_bytes())
        else:
            xs = mlp_inputs(a.mlp_tokens)
            xp.write_bytes(pickle.dumps(xs))
        patch_mlp_block(xs)
    if a.attn_block:
        patch_attn_block()
    t0 = time.time()
    fold = C.make_fold(src, stats, a.group, alpha_search=True, objective="output")
    ts = time.time() - t0
    al = fold.alphas
    kinds = {}
    for n, v in al.items():
        kinds.setdefault(n.split(".")[-1], []).append(v)
    print("betas: " + str(np.round(list(fold.betas.values()), 2).tolist()))
    print(f"search {ts:.0f}s; alphas: " + "; ".join(f"{k}: {np.mean(v):.2f} {v}" for k, v in kinds.items()), flush=True)
    C.write_model(f, src.config, src.tokenizer, src.load, max_bits=8, group_size=a.group, source="exp",
                  progress=False, transform=fold.tensor)
    model, tok = vq.load_model()
    chunks = vq.eval_tokens(tok, 4, 512)
    ref = torch.load(Path(a.ref_work) / "ref_4x512.pt")
    cells = []
    for k in a.bits:
        vq.load_view(model, f, k)
        cells.append(vq.compare(ref, vq.logprobs(model, chunks), chunks))
        print(f"  k={k}: {cells[-1][0]:.4f} / {cells[-1][1]:.2f}", flush=True)
    print(f"| {a.group} | {a.tag} | " + " | ".join(f"{kl:.4f} / {pp:.2f}" for kl, pp in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
