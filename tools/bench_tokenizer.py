#!/usr/bin/env python3
"""Benchmark: the native C++ tokenizer against `tokenizers` and `sentencepiece`.

    python tools/bench_tokenizer.py MODEL.fq [MODEL.fq ...] [--repeat 5]

Encodes every topic of Python's pydoc_data.topics one document per call (what a chat turn or a
prompt costs, not a batch), then decodes the ids, with each implementation in this process on one
thread; prints MB/s of UTF-8 text (best of --repeat) and checks that the ids agree. The
`tokenizers` column calls Tokenizer.encode per document (its batch API would use more threads).
Not a test: tests never assert on time.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers: one thread, like the others

import pydoc_data.topics  # noqa: E402

from flexquant_rt import _core  # noqa: E402
from flexquant_rt.tokenizer import Tokenizer  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"corpus: {len(docs)} documents, {mb:.3f} MB UTF-8")
    for path in a.models:
        mf = _core.ModelFile(path)
        native, lib = _core.Tokenizer(mf), Tokenizer.from_model_file(mf)
        ref = "tokenizers" if lib._hf is not None else "sentencepiece"
        ids = [lib.encode(d) for d in docs]
        assert [native.encode(d) for d in docs] == ids, "the tokenizers disagree"
        n_tok = sum(map(len, ids))
        rows = {
            "encode native": best(lambda: [native.encode(d) for d in docs], a.repeat),
            f"encode {ref}": best(lambda: [lib.encode(d) for d in docs], a.repeat),
            "decode native": best(lambda: [native.decode(i) for i in ids], a.repeat),
            f"decode {ref}": best(lambda: [lib.decode(i) for i in ids], a.repeat),
        }
        print(f"{os.path.basename(path)} ({native.kind}, {n_tok} tokens):")
        for name, s in rows.items():
            print(f"  {name:24s} {mb / s:8.2f} MB/s  {n_tok / s / 1e6:6.2f} M tokens/s")


if __name__ == "__main__":
    main()
