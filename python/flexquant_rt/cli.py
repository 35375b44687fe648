"""`flexquant-rt`: generate, chat, convert, inspect."""
from __future__ import annotations

import argparse
import sys


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n-ctx", type=int, default=None)
    p.add_argument("--bits", type=int, default=None, help="run every layer at this bit-width")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _gen_kwargs(a) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed, bits=a.bits)


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
    i = sub.add_parser("inspect", help="config and bytes per token of a model file")
    i.add_argument("model")
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
        if a.cmd == "generate":
            if len(a.args) > 2:
                ap.error("generate takes [MODEL] PROMPT (quote the prompt)")
            model, prompt = (None, a.args[0]) if len(a.args) == 1 else a.args
            with Engine(model, backend=a.backend, n_ctx=a.n_ctx, threads=a.threads) as eng:
                if a.raw or not eng.tokenizer.chat_template:
                    pieces = eng.generate(prompt, stream=True, **_gen_kwargs(a))
                else:
                    pieces = eng.chat([{"role": "user", "content": prompt}], stream=True, **_gen_kwargs(a))
                for piece in pieces:
                    print(piece, end="", flush=True)
                print()
            return 0
        if a.cmd == "chat":
            with Engine(a.model, backend=a.backend, n_ctx=a.n_ctx, threads=a.threads) as eng:
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
                    for piece in eng.chat(messages, stream=True, **_gen_kwargs(a)):
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
