"""The memory traffic of a CUDA decode step, kernel by kernel, measured without a GPU.

Builds the package with the CPU stand-in for CUDA as its CUDA backend in its traffic-measuring form
(tests/simt_ops.py, tests/cuda_host/simt/traffic.cpp: every load and store of every kernel is seen),
converts a synthetic model of a real shape with a few layers, prefills a prompt and runs one decode
step at each bit-width. Prints, per kernel of the step: launches, warps per launch and the bytes each
warp reads (how many warps share the work, for the memory-level parallelism a GPU needs to hide
DRAM latency: an H100 holds 64 warps on each of its 132 SMs), the bytes of the distinct 32-byte
sectors read and written in device memory (what DRAM must deliver at the least: each sector once per
launch, the L2 serving repeats), the sector efficiency of the global requests (bytes used / bytes of
the sectors each warp request touched: 1.0 is fully coalesced) and the shared-memory bank-conflict
factor (wavefronts / conflict-free wavefronts). The total is set against the engine's own count of
the weight bytes a step reads at that bit-width (planes and group params), the denominator of the
roofline in tools/bench.py.

What it does not say: time. The stand-in has no clock; tools/gpu_profile.py measures on a GPU.

    python tools/kernel_traffic.py [--model smollm2-135m] [--layers 2] [--bits 8 6 4] [--prompt 16]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the stand-in (tests/simt_ops.py)


def build(out_dir: Path, cxx: str = "g++") -> Path:
    """The package with the traffic-measuring stand-in as its CUDA backend (about a minute on 2 cores)."""
    from simt_ops import build_package

    return build_package(cxx, out_dir, traffic=True)


def worker(model: str, bits: list[int], prompt: int) -> None:
    """Runs inside the stand-in package: prefill, then per bit-width one step to capture the graph and
    one step between marks (the measured one). Prints {bits: the engine's weight bytes per token}."""
    import numpy as np

    import flexquant_rt as fq
    from simt_ops import traffic_mark

    eng = fq.Engine(model, backend="cuda", n_ctx=prompt + 2 * len(bits) + 4)
    if eng.backend != "cuda":
        raise SystemExit(f"the stand-in package runs on {eng.backend}")
    vocab = int(eng.config["vocab"])
    eng._eng.eval((np.arange(prompt, dtype=np.int32) * 7 + 5) % min(vocab, 256))
    tok = int(np.argmax(eng._eng.logits()))
    out = {}
    for b in bits:
        eng.set_layer_bits(b, lm_head_bits=b)
        eng._eng.eval(np.array([tok], np.int32))  # the new mask's first step (capture)
        traffic_mark(f"step {b}")
        eng._eng.eval(np.array([tok], np.int32))
        traffic_mark(f"after {b}")
        out[b] = int(eng._eng.last_bytes_per_token())
    print(json.dumps(out))


def measure(package: Path, model: Path, bits: list[int], prompt: int = 16, timeout: int = 1800):
    """-> (Traffic of the run, {bits: the engine's weight bytes per token})."""
    from simt_ops import Traffic

    with tempfile.TemporaryDirectory(prefix="traffic_") as d:
        path = Path(d) / "traffic.txt"
        env = dict(os.environ, SIMT_TRAFFIC_OUT=str(path))
        env["PYTHONPATH"] = os.pathsep.join([str(package), str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        for var in ("FLEXQUANT_CUDA_PDL", "FLEXQUANT_CUDA_PREFETCH", "FLEXQUANT_CUDA_WGMMA", "FLEXQUANT_CUDA_TILED_ATTENTION"):
            env.pop(var, None)
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(model), "--bits",
                            *map(str, bits), "--prompt", str(prompt)], env=env, capture_output=True, text=True,
                           timeout=timeout, cwd=d)
        if r.returncode:
            raise RuntimeError(f"kernel_traffic worker failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
        engine = {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
        return Traffic(path), engine


def kernel_family(name: str) -> str:
    """bitplane_matmul_tc_kernel<8, 2> -> bitplane_matmul_tc_kernel (the template arguments dropped)."""
    return name.split("<")[0]


def summarize(launches) -> dict:
    """Per kernel family: launches, DRAM bytes read / written, the global requests' distinct bytes and
    sector bytes, shared wavefronts and their conflict-free count."""
    rows = collections.defaultdict(lambda: collections.Counter())
    for la in launches:
        c = rows[kernel_family(la.kernel)]
        c["launches"] += 1
        c["warps"] += la.grid[0] * la.grid[1] * la.grid[2] * -(-la.block[0] * la.block[1] * la.block[2] // 32)
        c["read"] += la.dram_bytes()
        c["written"] += la.dram_bytes(write=True)
        for s in la.sites:
            if s.space == "g":
                c["distinct"] += s.distinct
                c["sector_bytes"] += 32 * s.units
            elif s.space == "s" and s.ideal:
                c["wavefronts"] += s.units
                c["ideal"] += s.ideal
    return dict(rows)


def print_table(traffic, engine: dict, bits: list[int]) -> None:
    for b in bits:
        launches = traffic.after_mark(f"step {b}")
        rows = summarize(launches)
        read = sum(r["read"] for r in rows.values())
        gemv = sum(r["read"] for k, r in rows.items() if k.startswith("bitplane_matmul"))
        print(f"\n### {b}-bit decode step: {len(launches)} launches; DRAM read {read / 1e6:.3f} MB, "
              f"of which the GEMVs {gemv / 1e6:.3f} MB; engine's weight bytes {engine[b] / 1e6:.3f} MB "
              f"(GEMVs / engine = {gemv / engine[b]:.4f})\n")
        print("| kernel | launches | warps per launch | KB read per warp | DRAM read MB | DRAM written MB | "
              "sector efficiency | bank-conflict factor |")
        print("|---|---|---|---|---|---|---|---|")
        for k, r in sorted(rows.items(), key=lambda kv: -kv[1]["read"]):
            eff = r["distinct"] / r["sector_bytes"] if r["sector_bytes"] else 1.0
            banks = r["wavefronts"] / r["ideal"] if r["ideal"] else 1.0
            print(f"| {k} | {r['launches']} | {r['warps'] / r['launches']:.0f} | {r['read'] / r['warps'] / 1e3:.2f} | "
                  f"{r['read'] / 1e6:.4f} | {r['written'] / 1e6:.4f} | {eff:.3f} | {banks:.2f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="synthetic preset (random codes)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--file", help="an existing model file instead of a synthetic one")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--package", help="a traffic-measuring package built before (its directory); default: build one")
    ap.add_argument("--cxx", default=os.environ.get("CXX", "g++"), help="the host compiler: GCC (its -fsanitize=thread hooks)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.bits, a.prompt)
        return 0
    with tempfile.TemporaryDirectory(prefix="kernel_traffic_") as d:
        pkg = Path(a.package) if a.package else build(Path(d) / "pkg", a.cxx)
        model = Path(a.file) if a.file else Path(d) / f"{a.model}.fq"
        if not a.file:
            from flexquant_rt.convert import SyntheticSource, convert

            convert(SyntheticSource(a.model, n_layers=a.layers, random_codes=True), model, progress=False)
        traffic, engine = measure(pkg, model, a.bits, a.prompt)
        print(f"{model.name if a.file else f'synthetic {a.model}, {a.layers} layers'}; prompt {a.prompt} tokens; "
              "measured on the CPU stand-in for CUDA (tests/cuda_host/simt/traffic.cpp)")
        print_table(traffic, engine, a.bits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
