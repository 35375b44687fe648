#!/usr/bin/env python3
"""Benchmark: prefill and decode tokens/s, effective GB/s and peak RSS at k = 8, 6, 4.

    python tools/bench.py [MODEL.fq ...] [--synthetic smollm2-135m] [--threads N] [--bits 8 6 4]
                          [--backend cpu|cuda] [--batch 1 2 4 8 16]

--backend cuda runs the engine on the GPU and compares with the GPU's copy bandwidth (torch, read +
write counted), adds a row with a new random mask every token (mean 5 bits: layers drawn from
{4, 6}) to price per-token switching, and prints the roofline: the tok/s that 85% of the copy
bandwidth allows for the bytes a token reads. --variant NAME:VAR=VALUE,... adds columns: each
static-bits row's prefill and decode with those environment variables set (FLEXQUANT_CUDA_PDL=1:
programmatic dependent launch; FLEXQUANT_CUDA_PREFETCH=1: the GEMV's L2 prefetch;
FLEXQUANT_CUDA_WGMMA=1: the prompt's int8 GEMM on Hopper's wgmma), measured in the same run.

--batch B ...: batched decode instead (CPU): B sequences of the prompt length in one engine
(n_seq = B), each step one `decode_batch` pass over all of them; prints the aggregate decode tok/s,
the step time, and the ratio to B = 1 measured in the same run (one weight read serves B tokens).

With no model, benchmarks the default model (SmolLM2-135M-Instruct). Each configuration runs in a
fresh process, so its peak RSS is its own. In the same run it measures the machine's memory copy
bandwidth (numpy, read + write counted) and, if `llama-cpp-python` is installed, runs the same
SmolLM2 GGUF through llama.cpp with the same threads and prompt and prints the ratio.
Not a test: tests never assert on time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def print_engine_numerics(a, results) -> None:
    """The KV cache type and the CPU matmul activations the engines of this run ran with, as they
    report them (--kv-dtype auto is resolved by the engine)."""
    seen = sorted({r["kv_dtype"] for r in results if r and "kv_dtype" in r})
    print(f"KV cache: {', '.join(seen) or '-'} (--kv-dtype {a.kv_dtype})")
    acts = sorted({r["cpu_activations"] for r in results if r and "cpu_activations" in r})
    if a.backend == "cpu":
        print(f"CPU matmul activations: {', '.join(acts) or '-'} (--cpu-activations {a.cpu_activations})")


def cpu_activations_arg() -> str:
    """--cpu-activations, handed to the worker processes through their environment."""
    return os.environ.get("FLEXQUANT_BENCH_CPU_ACTIVATIONS", "i16")


def copy_bandwidth_gbs() -> float:
    """Memory copy bandwidth, read + write bytes counted (as the GPU copy figure)."""
    import numpy as np

    a = np.ones(64 << 20, dtype=np.float32)  # 256 MiB
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage: Linux keeps ru_maxrss across
    exec, so a worker would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def gpu_copy_bandwidth_gbs() -> float:
    """The GPU's device-to-device copy bandwidth, read + write counted (torch, 1 GiB, median of 10)."""
    import torch

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * a.numel() / times[len(times) // 2] / 1e9


def worker(model: str, bits: int, threads: int, n_prompt: int, n_decode: int, backend: str = "cpu",
           gemm_min_rows: int = 64, kv_dtype: str = "auto", mma_rows: int = 0) -> dict:
    """bits 0: a new random mask every step, each linear at 4 or 6 (mean 5), the LM head at 6.
    bits -1: the FlexQuant controller (4 <-> max_bits on the previous step's entropy) at a budget
    of 5 bits per weight, its decision, the mask push and the signals inside each timed step, as in
    generate(); calibrated on the fly (levels 4 only: one prefill per unit) if the file has no profile.
    bits -2: 8 bits, int8 activations except fp32 ones in the LM head and the last layer (what
    Engine.protect_activations picked on SmolLM2): the price of the fp32 GEMV there. bits -3: the
    same with fp16 activations there (the f16 GEMV, protect_activations(bits=16)).
    gemm_min_rows: the CUDA engine's cuda_gemm_min_rows (0: the prompt on the GEMV only)."""
    import numpy as np

    import flexquant_rt as fq

    # the controller's on-the-fly calibration runs 256-token windows
    n_ctx = max(n_prompt + n_decode + 16, 272 if bits == -1 else 0)
    eng = fq.Engine(model, threads=threads, backend=backend, n_ctx=n_ctx, cuda_gemm_min_rows=gemm_min_rows,
                    kv_dtype=kv_dtype, cuda_mma_min_rows=mma_rows, cpu_activations=cpu_activations_arg())
    if eng.backend != backend:
        raise SystemExit(f"asked for backend {backend}, the engine runs on {eng.backend}")
    rng = np.random.default_rng(1)
    switching = bits == 0
    masks = [rng.choice([4, 6], size=(eng.n_layers, 7)).astype(np.int32) for _ in range(n_decode)]
    ctl = None
    if bits == -1:
        from flexquant_rt.controller import calibrate, calibration_text, load_profile, make_controller, text_chunks

        profile = load_profile(eng) or calibrate(eng, text_chunks(eng, calibration_text(), 1, 256), levels=(4,),
                                                 progress=False)
        ctl = make_controller(eng, "flexquant", budget_bits=5.0, profile=profile)
        eng._apply(ctl.mask(None))
    elif bits in (-2, -3):
        if bits == -3 and backend == "cuda" and int(eng.config["group_size"]) not in (128, 256, 512):
            return None  # the f16 GEMV takes group sizes 128, 256, 512: no row for this model
        eng.set_layer_bits(8, lm_head_bits=8)
        act = np.full((eng.n_layers, 7), 8, dtype=np.int32)
        act[-1] = 0 if bits == -2 else 16
        eng.set_activation_bits(act, lm_head_bits=int(act[-1, 0]))
    else:
        eng.set_layer_bits(masks[0] if switching else bits, lm_head_bits=6 if switching else bits)
    vocab = int(eng.config["vocab"])
    prompt = np.random.default_rng(0).integers(0, min(vocab, 30000), size=n_prompt).astype(np.int32)
    eng.forward(prompt[:8])  # warm-up: page in the weights
    eng.reset()
    eng._eng.eval(prompt[:300])  # and the first launch of every prefill kernel (a GEMM pass, then GEMV passes)
    eng.reset()
    t = time.perf_counter()
    eng._eng.eval(prompt)
    t_prefill = time.perf_counter() - t
    tok = int(np.argmax(eng._eng.logits()))
    times, nbytes, mean_bits = [], [], []
    info = eng.step_info(tok) if ctl is not None else None
    for i in range(n_decode):
        t = time.perf_counter()
        if switching:  # the switch is part of the step: its cost shows in the step time
            eng._eng.set_layer_bits(masks[i])
        if ctl is not None:  # so are the controller's decision and the signals it reads
            eng._apply(ctl.mask(info))
        eng._eng.eval(np.array([tok], dtype=np.int32))
        if ctl is not None:
            info = eng.step_info(tok)
        times.append(time.perf_counter() - t)
        nbytes.append(eng._eng.last_bytes_per_token())
        mean_bits.append(eng._last_mean_bits())
        tok = int(np.argmax(eng._eng.logits()))
    step = float(np.median(times))
    cfg = eng.config
    # the K and V rows a decode step reads: every layer's cache up to its position, the mean over
    # the timed steps (step i sees n_prompt + 1 + i rows)
    hd = int(cfg["head_dim"])  # bytes of a row (kv_dtype "auto" resolved by the engine): q8 codes and a scale
    row = {"f16": 2 * hd, "q8": hd + 4 * -(-hd // 32)}.get(eng.kv_dtype, 4 * hd)
    kv_bytes = (2 * int(cfg["n_layers"]) * int(cfg["n_kv_heads"]) * row
                * (n_prompt + 1 + (n_decode - 1) / 2))
    return {
        "prefill_tok_s": n_prompt / t_prefill, "decode_tok_s": 1.0 / step, "step_ms": step * 1e3,
        "bytes_per_token": float(np.mean(nbytes)), "mean_bits": float(np.mean(mean_bits)),
        "kv_bytes_per_token": float(kv_bytes),
        "peak_rss_mb": peak_rss_mb(), "device_mb": eng._eng.device_bytes / 1e6, "kv_dtype": eng.kv_dtype,
        "cpu_activations": eng.cpu_activations,
    }


def batch_worker(model: str, bits: int, threads: int, n_prompt: int, n_decode: int, batch: int,
                 backend: str = "cpu", kv_dtype: str = "auto", mma_rows: int = 0) -> dict:
    """Decode steps of `batch` sequences at once (Engine.decode_batch), greedy."""
    import numpy as np

    import flexquant_rt as fq

    eng = fq.Engine(model, threads=threads, backend=backend, n_ctx=n_prompt + n_decode + 16, n_seq=batch,
                    kv_dtype=kv_dtype, cuda_mma_min_rows=mma_rows, cpu_activations=cpu_activations_arg())
    if eng.backend != backend:
        raise SystemExit(f"backend {backend} asked for, the engine runs on {eng.backend}: {eng._eng.backend_note}")
    eng.set_layer_bits(bits, lm_head_bits=bits)
    vocab = int(eng.config["vocab"])
    rng = np.random.default_rng(0)
    e = eng._eng
    seqs = np.arange(batch, dtype=np.int32)
    e.eval_seq(0, rng.integers(0, min(vocab, 30000), size=8).astype(np.int32))  # warm-up: page in the weights
    e.reset_seq(0)
    toks = np.empty(batch, dtype=np.int32)
    for s in range(batch):
        e.eval_seq(s, rng.integers(0, min(vocab, 30000), size=n_prompt).astype(np.int32))
        toks[s] = int(np.argmax(e.logits()))
    times = []
    for _ in range(n_decode):
        t = time.perf_counter()
        logits, _, _ = e.decode_batch(seqs, toks)
        times.append(time.perf_counter() - t)
        toks = logits.argmax(axis=1).astype(np.int32)
    step = float(np.median(times))
    return {"step_ms": step * 1e3, "decode_tok_s": batch / step, "bytes_per_token": float(eng.bytes_per_token()),
            "peak_rss_mb": peak_rss_mb(), "kv_dtype": eng.kv_dtype, "cpu_activations": eng.cpu_activations}


def main_batch(a, models) -> int:
    bw = gpu_copy_bandwidth_gbs() if a.backend == "cuda" else copy_bandwidth_gbs()
    print(f"backend {a.backend}, threads: {a.threads}; {'GPU' if a.backend == 'cuda' else 'memory'} copy bandwidth "
          f"(read + write): {bw:.1f} GB/s; "
          f"prompt {a.prompt} tokens per sequence, {a.decode} batched decode steps (median); KV cache {a.kv_dtype}"
          + (f"; GEMV launches of >= {a.mma_rows} rows on the s8 tensor cores (cuda_mma_min_rows)" if a.mma_rows else ""))
    print()
    print("| model | bits | batch | step ms | decode tok/s (all sequences) | vs batch 1 | weight GB/s | % of copy BW |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for name, path in models:
        for bits in a.bits:
            base = None
            for b in a.batch:
                r = run_worker(["batch", path, str(bits), str(a.threads), str(a.prompt), str(a.decode), str(b),
                                a.backend, a.kv_dtype, str(a.mma_rows)])
                results.append(r)
                if base is None and b == 1:
                    base = r["decode_tok_s"]
                gbs = r["bytes_per_token"] / (r["step_ms"] / 1e3) / 1e9  # one weight read per step
                ratio = f"{r['decode_tok_s'] / base:.2f}x" if base else "-"
                print(f"| {name} | {bits} | {b} | {r['step_ms']:.2f} | {r['decode_tok_s']:.1f} | {ratio} | "
                      f"{gbs:.2f} | {100 * gbs / bw:.0f}% |")
    print_engine_numerics(a, results)
    return 0


def llama_cpp_worker(gguf: str, threads: int, n_prompt: int, n_decode: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import numpy as np

    llm = Llama(model_path=gguf, n_ctx=max(512, n_prompt + n_decode + 8), n_threads=threads, verbose=False)
    prompt = np.random.default_rng(0).integers(0, 30000, size=n_prompt).tolist()
    t = time.perf_counter()
    llm.eval(prompt)
    t_prefill = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(n_decode):
        llm.eval([100 + i])
    step = (time.perf_counter() - t) / n_decode
    return {"prefill_tok_s": n_prompt / t_prefill, "decode_tok_s": 1.0 / step, "step_ms": step * 1e3,
            "peak_rss_mb": peak_rss_mb()}


def run_worker(args: list[str], env: dict | None = None) -> dict | None:
    """One configuration in a fresh process; env: extra environment variables for it."""
    p = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True,
                       env={**os.environ, **env} if env else None)
    if p.returncode != 0:
        print(p.stderr, file=sys.stderr)
        raise SystemExit(f"worker failed: {args}")
    out = p.stdout.strip().splitlines()[-1]
    return None if out == "null" else json.loads(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--synthetic", action="append", default=[], help="also a synthetic model of this shape")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=32, help="decode steps")
    ap.add_argument("--backend", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch", type=int, nargs="+", help="batched decode with these batch sizes")
    ap.add_argument("--kv-dtype", default="auto", choices=("auto", "f32", "f16", "q8"),
                    help="KV cache type of the decode tables (f16 halves the attention's reads at long contexts, "
                         "q8 (CPU) halves them again; auto: the engine's default, f16 on the CPU and f32 on CUDA)")
    ap.add_argument("--cpu-activations", default="i16", choices=("i16", "i8", "f32"),
                    help="CPU: what the bit-plane matmuls multiply: int16-rounded activations (the engine's "
                         "default; integer products on AVX-512 VNNI), int8-rounded ones (vpdpbusd on AVX-512 "
                         "VNNI and AVX-VNNI) or fp32 ones")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                    help="--backend cuda: add a column NAME: the decode of each static-bits row with these "
                         "environment variables, measured in the same run (e.g. pdl:FLEXQUANT_CUDA_PDL=1)")
    ap.add_argument("--mma-rows", type=int, default=0, choices=range(17), metavar="0..16",
                    help="--backend cuda: the engines' cuda_mma_min_rows (GEMV launches of at least this many rows "
                         "on the s8 tensor cores instead of the binary ones; 0 = never)")
    ap.add_argument("--static-only", action="store_true",
                    help="cuda: only the --bits rows (no switching, controller or activation-precision rows)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kind, *rest = a.worker
        if kind == "fq":
            model, bits, threads, n_p, n_d, backend, gemm, kv, mma = rest
            res = worker(model, int(bits), int(threads), int(n_p), int(n_d), backend, int(gemm), kv, int(mma))
        elif kind == "batch":
            model, bits, threads, n_p, n_d, b, backend, kv, mma = rest
            res = batch_worker(model, int(bits), int(threads), int(n_p), int(n_d), int(b), backend, kv, int(mma))
        else:
            gguf, threads, n_p, n_d = rest
            res = llama_cpp_worker(gguf, int(threads), int(n_p), int(n_d))
        print(json.dumps(res))
        return 0

    os.environ["FLEXQUANT_BENCH_CPU_ACTIVATIONS"] = a.cpu_activations  # the workers inherit it
    from flexquant_rt.default_model import default_model_path, smollm2_gguf_path

    models = [(Path(m).stem, m) for m in a.models]
    if not a.models and not a.synthetic:
        models.append(("SmolLM2-135M", str(default_model_path())))
    tmp = tempfile.TemporaryDirectory()
    for name in a.synthetic:
        out = Path(tmp.name) / f"{name}.fq"
        from flexquant_rt.convert import SyntheticSource, convert
        convert(SyntheticSource(name), out, progress=False)
        models.append((f"synthetic {name}", str(out)))

    if a.batch:
        if 1 not in a.batch:
            a.batch = [1] + a.batch  # the baseline of the ratio, measured in the same run
        return main_batch(a, models)
    if a.backend == "cuda":
        return main_cuda(a, models)
    bw = copy_bandwidth_gbs()
    print(f"threads: {a.threads}; memory copy bandwidth (read + write): {bw:.1f} GB/s; "
          f"prompt {a.prompt} tokens, {a.decode} decode steps (median)")
    base = None
    try:
        base = run_worker(["llama", str(smollm2_gguf_path()), str(a.threads), str(a.prompt), str(a.decode)])
    except FileNotFoundError:
        pass
    print()
    # A decode step reads the weights' bytes and the KV cache's rows up to its position: the GB/s and
    # the fraction of the copy bandwidth count both (at long prompts the cache is a large part)
    print("| model | bits | prefill tok/s | decode tok/s | weight MB/token | KV MB/token | decode GB/s (weights + KV) "
          "| % of copy BW | peak RSS MB | decode vs llama.cpp Q4_1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for name, path in models:
        for bits in a.bits:
            r = run_worker(["fq", path, str(bits), str(a.threads), str(a.prompt), str(a.decode), "cpu", "0",
                            a.kv_dtype, "0"])
            results.append(r)
            gbs = (r["bytes_per_token"] + r["kv_bytes_per_token"]) * r["decode_tok_s"] / 1e9
            ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if (base and "SmolLM2" in name) else "-"
            print(f"| {name} | {bits} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                  f"{r['bytes_per_token'] / 1e6:.1f} | {r['kv_bytes_per_token'] / 1e6:.1f} | {gbs:.2f} | "
                  f"{100 * gbs / bw:.0f}% | {r['peak_rss_mb']:.0f} | {ratio} |")
    if base:
        print(f"| llama.cpp (llama-cpp-python), SmolLM2 Q4_1 GGUF | 4.5 | {base['prefill_tok_s']:.1f} | "
              f"{base['decode_tok_s']:.1f} | - | - | - | - | {base['peak_rss_mb']:.0f} | 1.00x |")
    else:
        print("(llama-cpp-python is not installed: no llama.cpp baseline in this run)")
    print_engine_numerics(a, results)
    return 0


def main_cuda(a, models) -> int:
    """The GPU table: decode tok/s and GB/s against the copy bandwidth measured in this run, the
    85% roofline for each row's bytes per token, the cost of a new mask every token, and the
    FlexQuant controller at a 5-bit budget (the last row)."""
    bw = gpu_copy_bandwidth_gbs()
    print(f"GPU copy bandwidth (read + write): {bw:.0f} GB/s; prompt {a.prompt} tokens, "
          f"{a.decode} decode steps (median); KV cache {a.kv_dtype}; roofline = 0.85 x copy BW / bytes per token "
          "(weights only, as the issue's goals; 'incl. KV' adds the K and V rows each step reads at this context)" + (f"; GEMV launches of >= {a.mma_rows} rows on the s8 tensor cores (cuda_mma_min_rows)"
                              if a.mma_rows else ""))
    mma = str(a.mma_rows)
    print()
    print("prefill: the prompt in passes of up to 1024 tokens on the tensor-core GEMM (W{k}A8), and, for comparison in the "
          "same run, in 8-token passes on the GEMV (cuda_gemm_min_rows=0)")
    print()
    variants = []
    for v in a.variant:
        name, _, assigns = v.partition(":")
        env = dict(kv.split("=", 1) for kv in assigns.split(",") if "=" in kv)
        if not name or not env:
            raise SystemExit(f"--variant {v!r}: expected NAME:VAR=VALUE[,VAR=VALUE]")
        variants.append((name, env))
        print(f"prefill and decode tok/s, {name}: the same static-bits row with {' '.join(f'{k}={x}' for k, x in env.items())}")
    if variants:
        print()
    var_head = "".join(f" prefill tok/s, {n} | {n} / plain | decode tok/s, {n} | {n} / plain |" for n, _ in variants)
    print("| model | bits | prefill tok/s | prefill tok/s GEMV only | decode tok/s |" + var_head +
          " MB/token | decode GB/s | % of copy BW | 85% roofline tok/s | vs roofline | KV MB/token |"
          " vs roofline incl. KV | GPU MB |")
    print("|---|---|---|---|---|" + "---|---|---|---|" * len(variants) + "---|---|---|---|---|---|---|---|")
    results = []
    for name, path in models:
        rows = {}
        for bits in [*a.bits] + ([] if a.static_only else [0, -1, -2, -3]):
            r = rows[bits] = run_worker(["fq", path, str(bits), "1", str(a.prompt), str(a.decode), "cuda", "64",
                                         a.kv_dtype, mma])
            results.append(r)
            if r is None:  # a row this model cannot run (fp16 activations need group size 128, 256, 512)
                continue
            gemv = "-"
            if bits > 0:
                g = run_worker(["fq", path, str(bits), "1", str(a.prompt), "2", "cuda", "0", a.kv_dtype, mma])
                gemv = f"{g['prefill_tok_s']:.0f}"
            extra = ""
            for _, env in variants:
                if bits > 0:
                    rv = run_worker(["fq", path, str(bits), "1", str(a.prompt), str(a.decode), "cuda", "64",
                                     a.kv_dtype, mma], env=env)
                    extra += (f" {rv['prefill_tok_s']:.0f} | {rv['prefill_tok_s'] / r['prefill_tok_s']:.3f} |"
                              f" {rv['decode_tok_s']:.1f} | {rv['decode_tok_s'] / r['decode_tok_s']:.3f} |")
                else:
                    extra += " - | - | - | - |"
            gbs = r["bytes_per_token"] * r["decode_tok_s"] / 1e9
            roof = 0.85 * bw * 1e9 / r["bytes_per_token"]
            roof_kv = 0.85 * bw * 1e9 / (r["bytes_per_token"] + r["kv_bytes_per_token"])
            label = (str(bits) if bits > 0 else "4/6 per token (mean 5)" if bits == 0 else
                     f"FlexQuant controller, budget 5 (mean {r['mean_bits']:.2f})" if bits == -1 else
                     "8, fp32 activations in the LM head and the last layer" if bits == -2 else
                     "8, fp16 activations in the LM head and the last layer")
            print(f"| {name} | {label} | {r['prefill_tok_s']:.0f} | {gemv} | {r['decode_tok_s']:.1f} |{extra} "
                  f"{r['bytes_per_token'] / 1e6:.1f} | {gbs:.0f} | {100 * gbs / bw:.0f}% | {roof:.0f} | "
                  f"{r['decode_tok_s'] / roof:.2f} | {r['kv_bytes_per_token'] / 1e6:.1f} | "
                  f"{r['decode_tok_s'] / roof_kv:.2f} | {r['device_mb']:.0f} |")
        if 4 in rows and 6 in rows and rows.get(0) is not None:
            # the switching row reads, per token, a mix of 4- and 6-bit linears: its expected step is
            # the byte-weighted mean of the static steps; the excess is what switching costs
            r4, r6, r0 = rows[4], rows[6], rows[0]
            f = (r0["bytes_per_token"] - r4["bytes_per_token"]) / max(r6["bytes_per_token"] - r4["bytes_per_token"], 1)
            expect = r4["step_ms"] + f * (r6["step_ms"] - r4["step_ms"])
            print(f"\n{name}: per-token mask switch: step {r0['step_ms']:.3f} ms vs {expect:.3f} ms interpolated from the "
                  f"static 4- and 6-bit steps: {100 * (r0['step_ms'] / expect - 1):+.1f}% of a step")
    print_engine_numerics(a, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
