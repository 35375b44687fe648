"""`flexquant-rt`: generate, chat, convert, inspect."""
from __future__ import annotations

import argparse
import sys

from .controller import POLICIES


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n-ctx", type=int, default=None)
    p.add_argument("--kv-dtype", default="auto", choices=("auto", "f32", "f16", "q8"),
                   help="KV cache: f16 (the CPU default), f32, or q8 (CPU: int8 codes, 0.56 of f16's memory, for long contexts)")
    p.add_argument("--cpu-activations", default="i16", choices=("i16", "i8", "f32"),
                   help="CPU: what the matmuls multiply: i16 (the default: int16-rounded activations), i8 (int8: faster on "
                        "AVX-512 VNNI / AVX-VNNI CPUs, a next-token KL of ~2e-3 at 8 bits) or f32")
    p.add_argument("--bits", type=int, default=None, help="run every layer at this bit-width")
    p.add_argument("--policy", default=None, choices=POLICIES,
                   help="precision policy (the calibrated ones need --budget-bits and `flexquant-rt calibrate`)")
    p.add_argument("--budget-bits", type=float, default=None, help="mean bits per weight for --policy")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _gen_kwargs(a, eng) -> dict:
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
              min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed)
    if a.policy is None and a.budget_bits is None:
        kw["bits"] = a.bits
    else:
        from .controller import make_controller
        kw["controller"] = make_controller(eng, a.policy, a.budget_bits, a.bits)
    return kw


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "convert":
        from .convert import main as convert_main
        return convert_main(argv[1:])
    ap = argparse.ArgumentParser(prog="flexquant-rt", description="LLM inference on a bit-plane weight store.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="complete a prompt (chat template applied unless --raw)")
    g.add_argument("args", nargs="+", metavar="[MODEL] PROMPT",
                   help="model file (default: SmolLM2-135M-Instruct) and the prompt")
    g.add_argument("--raw", action="store_true", help="no chat template: plain text completion")
    _engine_args(g)
    c = sub.add_parser("chat", help="interactive chat")
    c.add_argument("model", nargs="?", default=None)
    _engine_args(c)
    sub.add_parser("convert", help="same as tools/convert.py (see flexquant-rt convert --help)")
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the `serve` extra; docs/server.md)")
    sv.add_argument("model", nargs="?", default=None, help="model file (default: SmolLM2-135M-Instruct)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    sv.add_argument("--threads", type=int, default=None)
    sv.add_argument("--n-ctx", type=int, default=None)
    sv.add_argument("--kv-dtype", default="auto", choices=("auto", "f32", "f16", "q8"),
                    help="KV cache: f16 (the CPU default), f32, or q8 (CPU: int8 codes, 0.56 of f16's memory, for long contexts)")
    sv.add_argument("--cpu-activations", default="i16", choices=("i16", "i8", "f32"),
                    help="CPU: what the matmuls multiply: i16 (the default: int16-rounded activations), i8 (int8: faster on "
                        "AVX-512 VNNI / AVX-VNNI CPUs, a next-token KL of ~2e-3 at 8 bits) or f32")
    sv.add_argument("--model-name", default=None, help="the model id clients send (default: the file's stem)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests that may wait; beyond: 503")
    sv.add_argument("--batch", type=int, default=1,
                    help="requests decoded together (continuous batching on the CPU; 1 = one at a time)")
    sv.add_argument("--bits", type=int, default=None, help="default: every layer at this bit-width")
    sv.add_argument("--policy", default=None, choices=POLICIES, help="default precision policy")
    sv.add_argument("--budget-bits", type=float, default=None, help="mean bits per weight for --policy")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    tu = sub.add_parser("tune", help="time the kernels on this machine (CPU, or the GPU with --backend cuda) and "
                                     "save the faster choice per shape")
    tu.add_argument("model", nargs="?", default=None)
    tu.add_argument("--backend", default="cpu", choices=("cpu", "cuda"))
    tu.add_argument("--max-m", type=int, default=None,
                    help="largest row count (prompt slice or batch) timed (default: 16 on the CPU, 256 on CUDA)")
    tu.add_argument("--repeats", type=int, default=3)
    tu.add_argument("--threads", type=int, default=None, help="the thread count the table is for (default: all)")
    tu.add_argument("--cpu-activations", default="i16", choices=("i16", "i8", "f32"),
                    help="the CPU activations the table is for (each has its own: their kernels differ)")
    i = sub.add_parser("inspect", help="config and bytes per token of a model file")
    i.add_argument("model")
    cal = sub.add_parser("calibrate", help="measure per-layer sensitivity and store it in the model file")
    cal.add_argument("model", nargs="?", default=None)
    cal.add_argument("--chunks", type=int, default=2, help="calibration windows")
    cal.add_argument("--chunk-len", type=int, default=256, help="tokens per window")
    cal.add_argument("--levels", type=int, nargs="+", default=[3, 4, 5, 6, 7])
    cal.add_argument("--activations", type=int, nargs="*", default=[8, 6, 4],
                     help="also measure each layer's KL with its activations at these widths: integers "
                          "2..8 per weight group (the CUDA tensor-core GEMV uses 8) or 16 (fp16, the CUDA "
                          "f16 GEMV); none to skip")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--threads", type=int, default=None)
    ev = sub.add_parser("eval", help="evaluate precision policies on held-out text (table, CSV, PNG)")
    ev.add_argument("model", nargs="?", default=None)
    ev.add_argument("--reference", default=None,
                    help="unquantized source (HF dir or GGUF) run by transformers; default: the default "
                         "model's GGUF for the default model, else the engine at max bits")
    ev.add_argument("--chunks", type=int, default=3)
    ev.add_argument("--chunk-len", type=int, default=256)
    ev.add_argument("--budgets", type=float, nargs="+", default=[5.0, 5.5, 6.0, 6.5, 7.0])
    ev.add_argument("--static-bits", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8])
    ev.add_argument("--out", default="eval_out")
    ev.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)

    from . import FlexquantError, Engine  # noqa: F401  (imports the extension)
    try:
        if a.cmd == "inspect":
            from . import _core
            mf = _core.ModelFile(a.model)
            for k, v in mf.config.items():
                print(f"{k}: {v}")
            for bits in range(int(mf.config["max_bits"]), 1, -1):
                print(f"bytes per token at {bits} bits: {mf.bytes_per_token(bits) / 1e6:.2f} MB")
            return 0
        if a.cmd == "serve":
            from .server import serve
            serve(a.model, host=a.host, port=a.port, backend=a.backend, n_ctx=a.n_ctx, threads=a.threads,
                  kv_dtype=a.kv_dtype, cpu_activations=a.cpu_activations,
                  model_name=a.model_name, max_queue=a.max_queue, log_level=a.log_level, batch=a.batch,
                  default_fq={"policy": a.policy, "budget_bits": a.budget_bits, "bits": a.bits})
            return 0
        if a.cmd == "tune":
            with Engine(a.model, backend=a.backend, threads=a.threads, kernel_table=None,
                        cpu_activations=a.cpu_activations) as eng:
                if eng.backend != a.backend:
                    raise SystemExit(f"--backend {a.backend}: the engine runs on {eng.backend} ({eng._eng.backend_note})")
                table = eng.tune_kernels(max_m=a.max_m, repeats=a.repeats)
                if eng.backend == "cuda":
                    from . import _core
                    print(f"CUDA kernel table for {eng.path} on {_core.cuda_device_name()} (bits:rows:gemm = the "
                          f"GEMV up to the given rows, that tensor-core GEMM above; default: the a8 GEMM from 64 rows):")
                else:
                    print(f"CPU kernel table for {eng.path} on {eng._eng.threads} threads "
                          f"(decode kernels up to the given rows, GEMM above; default 6 on int16/int8 activations with "
                          f"AVX-512 or AVX2 + GFNI, else 4):")
                shapes: dict = {}
                for d in table:
                    key = (d["n"], d["k"], d.get("act_bits", 0), d.get("mma_min_rows", -1), d.get("rejected", ""))
                    cell = f"{d['bits']}:{d['decode_max_m']}" + (f":{d['gemm']}" if d.get("gemm") else "")
                    shapes.setdefault(key, []).append(cell)
                for (n, k, act, mma, rejected), cells in shapes.items():
                    what = f"  {n} x {k}" + (f" (int{act} activations)" if act == 8 else
                                             " (fp16 activations)" if act == 16 else "")
                    line = f"{what}: bits:rows " + " ".join(cells)
                    if act == 8:
                        line += f"; GEMV on the s8 MMA kernel from {mma} rows" if mma > 0 else "; GEMV on TC"
                    print(line)
                    if rejected:
                        print(f"    left out (disagreed with the reference GEMV, or could not run): {rejected}")
                print("saved: engines on this machine with the same threads (or GPU) and shapes use it")
            return 0
        if a.cmd == "calibrate":
            from .controller import calibrate, calibration_text, save_profile, text_chunks
            with Engine(a.model, threads=a.threads) as eng:
                chunks = text_chunks(eng, calibration_text(), a.chunks, a.chunk_len, seed=a.seed)
                prof = calibrate(eng, chunks, levels=a.levels, seed=a.seed, activation_levels=a.activations)
                path = eng.path
            save_profile(path, prof)
            print(f"stored the calibration profile ({prof.n_tokens} tokens, levels {prof.levels}) in {path}")
            return 0
        if a.cmd == "eval":
            from .controller import load_profile
            from .evaluate import HEADER, evaluate, write_report
            ref = a.reference
            if a.model is None and ref is None:
                from .default_model import smollm2_gguf_path
                ref = str(smollm2_gguf_path())
            with Engine(a.model, threads=a.threads) as eng:
                prof = load_profile(eng)
                if prof is None:
                    print(f"error: {eng.path} has no calibration profile: run flexquant-rt calibrate first",
                          file=sys.stderr)
                    return 2
                print(HEADER)
                results, oracle, corr = evaluate(eng, prof, source=ref, n_chunks=a.chunks, chunk_len=a.chunk_len,
                                                 budgets=a.budgets, static_bits=a.static_bits)
            report = write_report(results, oracle, corr, a.out)
            print(report.read_text())
            print(f"wrote {report}, eval.csv and eval.png in {a.out}")
            return 0
        if a.cmd == "generate":
            if len(a.args) > 2:
                ap.error("generate takes [MODEL] PROMPT (quote the prompt)")
            model, prompt = (None, a.args[0]) if len(a.args) == 1 else a.args
            with Engine(model, backend=a.backend, n_ctx=a.n_ctx, threads=a.threads, kv_dtype=a.kv_dtype,
                        cpu_activations=a.cpu_activations) as eng:
                if a.raw or not eng.tokenizer.chat_template:
                    pieces = eng.generate(prompt, stream=True, **_gen_kwargs(a, eng))
                else:
                    pieces = eng.chat([{"role": "user", "content": prompt}], stream=True, **_gen_kwargs(a, eng))
                for piece in pieces:
                    print(piece, end="", flush=True)
                print()
            return 0
        if a.cmd == "chat":
            with Engine(a.model, backend=a.backend, n_ctx=a.n_ctx, threads=a.threads, kv_dtype=a.kv_dtype,
                        cpu_activations=a.cpu_activations) as eng:
                messages = []
                while True:
                    try:
                        line = input("> ")
                    except EOFError:
                        print()
                        return 0
                    if not line.strip():
                        continue
                    messages.append({"role": "user", "content": line})
                    reply = ""
                    for piece in eng.chat(messages, stream=True, **_gen_kwargs(a, eng)):
                        reply += piece
                        print(piece, end="", flush=True)
                    print()
                    messages.append({"role": "assistant", "content": reply})
    except (FlexquantError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
