#!/usr/bin/env python3
"""Load test for `flexquant-rt serve`: N concurrent clients, a fixed number of requests.

    python tools/load_test.py                           # starts a server on the default model
    python tools/load_test.py --model m.fq --clients 4 --requests 32 --max-tokens 64
    python tools/load_test.py --url http://127.0.0.1:8000 --pid 1234   # an already running server
    python tools/load_test.py --batch 4                  # the started server decodes 4 requests together

Every request is a streaming chat completion (so time-to-first-token is measured the way a
client sees it) with stream_options.include_usage for the token count. Reports requests/s,
completion tokens/s, p50/p95 latency and TTFT, errors, and the server's resident memory before
the run (after a warm-up request) and after each round (--rounds; flat means no leak).
Not a test: nothing here asserts; it prints a markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
    "Why is the sky blue?",
    "Give me a short recipe for pancakes.",
    "What does a compiler do?",
    "Name the planets of the solar system.",
]


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            if ev.get("choices") and ev["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}


async def run_round(url: str, model: str, clients: int, requests: int, args) -> dict:
    counter = iter(range(requests))
    results: list[dict] = []
    errors: list[str] = []

    async def client_loop(cid: int) -> None:
        async with httpx.AsyncClient(timeout=args.timeout) as client:
            for i in counter:
                body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                        "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": i,
                        "stream": True, "stream_options": {"include_usage": True}}
                if args.ignore_eos:
                    body["ignore_eos"] = True
                if args.bits is not None:
                    body["flexquant"] = {"bits": args.bits}
                try:
                    results.append(await one_request(client, url, body))
                except Exception as e:  # noqa: BLE001  (counted and reported)
                    errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    return {"wall": wall, "results": results, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="target a running server (else one is started)")
    ap.add_argument("--pid", type=int, default=None, help="the running server's pid (for its memory)")
    ap.add_argument("--model", default=None, help="model file for the started server (default model if absent)")
    ap.add_argument("--threads", type=int, default=None, help="the started server's engine threads")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32, help="requests per round, over all clients")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--ignore-eos", action="store_true", help="every request generates exactly --max-tokens")
    ap.add_argument("--bits", type=int, default=None, help="flexquant extension: static bits per request")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--batch", type=int, default=1, help="the started server's --batch (continuous batching)")
    args = ap.parse_args(argv)

    proc = None
    url, pid = args.url, args.pid
    if url is None:
        from flexquant_rt.server import ServerProcess

        extra = ["--log-level", "warning", "--max-queue", str(max(64, args.clients * 2)), "--batch", str(args.batch)]
        proc = ServerProcess(args.model, *extra, *(["--threads", str(args.threads)] if args.threads else []))
        url, pid = proc.url, proc.pid
    url = url.rstrip("/")
    try:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        asyncio.run(run_round(url, model, 1, 1, args))  # warm-up
        rss0 = rss_mib(pid)
        rounds = []
        for _ in range(args.rounds):
            r = asyncio.run(run_round(url, model, args.clients, args.requests, args))
            r["rss"] = rss_mib(pid)
            rounds.append(r)
        health = httpx.get(url + "/health", timeout=30).json()
    finally:
        if proc is not None:
            proc.stop()

    print(f"\nmodel `{model}` at {url}; {args.clients} clients x {args.requests} requests per round, "
          f"max_tokens {args.max_tokens}{' (ignore_eos)' if args.ignore_eos else ''}, "
          f"temperature {args.temperature}{f'; server --batch {args.batch}' if args.url is None else ''}; "
          f"{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| round | requests | errors | wall s | req/s | tokens | tok/s | p50 latency s | p95 latency s | "
          "p50 TTFT s | p95 TTFT s | server RSS MiB before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    prev = rss0
    for i, r in enumerate(rounds, 1):
        res = r["results"]
        lat = [x["latency"] for x in res]
        ttft = [x["ttft"] for x in res if x["ttft"] is not None]
        toks = sum(x["tokens"] for x in res)
        mem = "n/a" if prev is None else f"{prev:.1f} -> {r['rss']:.1f}"
        print(f"| {i} | {len(res) + len(r['errors'])} | {len(r['errors'])} | {r['wall']:.2f} | "
              f"{len(res) / r['wall']:.2f} | {toks} | {toks / r['wall']:.1f} | {percentile(lat, .5):.2f} | "
              f"{percentile(lat, .95):.2f} | {percentile(ttft, .5):.2f} | {percentile(ttft, .95):.2f} | {mem} |")
        prev = r["rss"]
    for r in rounds:
        for e in r["errors"][:5]:
            print("error:", e)
    print(f"\nserver counters: {health.get('requests')}")
    return 1 if any(r["errors"] for r in rounds) else 0


if __name__ == "__main__":
    sys.exit(main())
