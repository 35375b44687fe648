#!/usr/bin/env bash
# GPU check of the CUDA backend, on a machine with an NVIDIA GPU (the lent H100: run from the
# repository root). In one go:
#   1. builds and installs the package with nvcc (pip, no build isolation, no dependencies: the
#      machine is offline and has numpy, torch, pybind11, scikit-build-core);
#   2. runs the CUDA tests (tests/test_cuda_ops.py: the GEMV; tests/test_engine_cuda.py: the decode
#      ops and whole models against the CPU engine, mask switching through the CUDA graph);
#   3. runs compute-sanitizer (memcheck, racecheck, initcheck) over a few odd shapes of both GEMV
#      paths and a short generation on a tiny model through the CUDA engine (graph included);
#   3b. profiles a decode step kernel by kernel (tools/gpu_profile.py, CUPTI through torch.profiler);
#   4. benchmarks bitplane_matmul_cuda against torch.nn.functional.linear fp16 (cuBLAS) on the
#      Llama-2-7B linear shapes, weights rotated past L2, and prints the tables;
#   5. benchmarks the tensor-core GEMM (bitplane_gemm_cuda, W{k}A8 and W{k}A16; W{k}A8 on wgmma,
#      'a8_wg', where it runs) against cuBLAS fp16 (torch.matmul) and torch._int_mm on the Llama-2-7B /
#      Llama-3-8B linear shapes and m from 1 to 4096 (issue 6), and the GEMV at small m;
#   6. (--e2e) converts a synthetic Llama-2-7B here and runs tools/bench.py --backend cuda on it:
#      prefill tok/s of a 2048-token prompt (GEMM and GEMV-only), decode tok/s at 8/6/4 bits and with
#      per-token masks, against the roofline (after `flexquant-rt tune --backend cuda` checked and
#      measured the GEMV/GEMM table: which kernels agree with the reference, then the fastest), each also with programmatic dependent launch (FLEXQUANT_CUDA_PDL=1), the GEMV's
#      L2 prefetch (FLEXQUANT_CUDA_PREFETCH=1) and both, then with an fp16 KV cache; then batched
#      decode of 1, 4, 8 and 16 sequences, plain and with every GEMV launch on the s8 tensor cores
#      (--mma-rows 1: cuda_mma_min_rows). The converter
#      writes with the `gguf` package, which the device machine lacks: carry its wheel in .whl/
#      (see the device README) and this step installs it into /tmp/site.
# Logs and bench.json go to $OUT (the device tool's output folder) or /tmp/gpu_check.
# With --e2e the 7B model is written in the background from the start (the converter needs only
# numpy and gguf, not the extension being built): random codes (SyntheticSource(random_codes=True)),
# which takes seconds where quantizing random floats took 212-270 s on the H100 machine.
# Each step runs under a time limit in seconds (a lent machine gives one call 10 minutes), set by
# the variables T_BUILD, T_TESTS, T_SANITIZER, T_PROFILE, T_BENCH, T_GEMM, T_E2E; a step past its limit is
# killed and counts as failed, and the next one runs; DEADLINE (epoch seconds) caps them all.
# The CUDA compile is skipped when .whl/ holds an archive tools/prebuild_cuda.sh built on the dev
# machine from the same sources (carry .whl; about 45 s of device time per call).
# TESTS_K selects tests (pytest -k); E2E_MODEL the synthetic preset of --e2e (default llama2-7b).
#
#   tools/gpu_check.sh [--skip-build] [--skip-tests] [--skip-sanitizer] [--skip-profile] [--skip-bench] [--skip-gemm] [--e2e]
set -uo pipefail

PY=${PYTHON:-python3}
LOG=${OUT:-/tmp/gpu_check}
mkdir -p "$LOG"
BUILD=1 TESTS=1 SANITIZER=1 PROFILE=1 BENCH=1 GEMM=1 E2E=0
for a in "$@"; do
  case "$a" in
    --e2e) E2E=1 ;;
    --skip-build) BUILD=0 ;;
    --skip-tests) TESTS=0 ;;
    --skip-sanitizer) SANITIZER=0 ;;
    --skip-profile) PROFILE=0 ;;
    --skip-bench) BENCH=0 ;;
    --skip-gemm) GEMM=0 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
status=0
cd "$(dirname "$0")/.."
T_BUILD=${T_BUILD:-600} T_TESTS=${T_TESTS:-900} T_SANITIZER=${T_SANITIZER:-900}
T_BENCH=${T_BENCH:-600} T_GEMM=${T_GEMM:-900} T_E2E=${T_E2E:-1200}
# limit SECONDS CMD...: rc 124 when killed at the limit, or earlier at DEADLINE (epoch seconds) if set
limit() {
  local t=$1; shift
  if [ -n "${DEADLINE:-}" ]; then
    local l=$(( DEADLINE - $(date +%s) )); [ $l -lt $t ] && t=$(( l > 1 ? l : 1 ))
  fi
  timeout -k 10 "$t" "$@"
}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

E2E_MODEL=${E2E_MODEL:-llama2-7b}  # the synthetic preset of --e2e (written with random codes: seconds)
MODEL=/tmp/gpu_check_$E2E_MODEL.fq  # the --e2e model, converted once, read by every run
# gguf, which the device machine lacks: the converter (the tests' models, --e2e) writes with it
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$E2E" = 1 ]; then
  if [ ! -f "$MODEL" ]; then
    # the source package without its __init__ (which loads the extension not yet built)
    (start=$(date +%s); "$PY" - "$MODEL" "$E2E_MODEL" >"$LOG/convert.log" 2>&1 <<'EOF'
import sys, types
pkg = types.ModuleType("flexquant_rt")
pkg.__path__ = ["python/flexquant_rt"]
sys.modules["flexquant_rt"] = pkg
from flexquant_rt.convert import SyntheticSource, convert
# random codes written directly: seconds, not the minutes of quantizing 7B random floats (the
# kernels' speed does not depend on the values)
convert(SyntheticSource(sys.argv[2], random_codes=True), sys.argv[1], progress=False)
EOF
     rc=$?; echo "converted in $(( $(date +%s) - start )) s, rc $rc" >>"$LOG/convert.log") &
    CONVERT_PID=$!
    # an early exit (a failed build) must not leave it running
    trap 'kill "$CONVERT_PID" 2>/dev/null; pkill -P "$CONVERT_PID" 2>/dev/null' EXIT
  fi
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
nvcc --version | tail -1

if [ "$BUILD" = 1 ]; then
  echo "== build (log: $LOG/build.log)"
  start=$(date +%s)
  # FAST_BUILD=1: kernels for sm_90a only (about half the compile time; the H100 runs those). An
  # environment variable, read at each configure (CMakeLists.txt), so nothing of it stays cached.
  gencode=""
  [ "${FAST_BUILD:-0}" = 1 ] && gencode="-gencode=arch=compute_90a,code=sm_90a"
  # .whl/libflexquant_cuda.a (tools/prebuild_cuda.sh on the dev machine, carried with .whl): linked
  # instead of compiling cuda/*.cu when it was built from these very sources; if that build fails
  # (a toolchain mismatch), the normal build follows.
  prebuilt=""
  if [ -f .whl/libflexquant_cuda.a ]; then
    if [ ! -f .whl/libflexquant_cuda.src ]; then
      echo "the prebuilt CUDA archive has no source hash beside it: compiling"
    elif [ "$(cat .whl/libflexquant_cuda.src)" = "$(bash tools/cuda_src_hash.sh)" ]; then
      prebuilt=$PWD/.whl/libflexquant_cuda.a
    else
      echo "the prebuilt CUDA archive is stale (its sources or the nvcc version differ): compiling"
    fi
  fi
  built=0
  if [ -n "$prebuilt" ]; then
    if FLEXQUANT_CUDA_PREBUILT="$prebuilt" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) limit "$T_BUILD" \
        "$PY" -m pip install --no-build-isolation --no-deps -v . >"$LOG/build.log" 2>&1; then
      built=1
      echo "linked the prebuilt CUDA archive"
    else
      tail -20 "$LOG/build.log"
      echo "the build with the prebuilt CUDA archive failed: compiling"
      rm -rf build/cp*  # scikit-build-core's build dir: configure afresh without the archive
    fi
  fi
  if [ "$built" = 0 ] && ! FLEXQUANT_CUDA_PREBUILT= FLEXQUANT_CUDA_GENCODE="$gencode" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) limit "$T_BUILD" \
      "$PY" -m pip install --no-build-isolation --no-deps -v . >"$LOG/build.log" 2>&1; then
    tail -60 "$LOG/build.log"
    echo "BUILD FAILED"
    exit 1
  fi
  stamp "built in $(( $(date +%s) - start )) s"
fi
cd /tmp  # import the installed package, not the source tree
if ! "$PY" -c "import flexquant_rt._core as c, sys; print('cuda_available', c.cuda_available()); sys.exit(0 if c.cuda_available() else 1)"; then
  echo "the installed package sees no CUDA device"
  exit 1
fi
cd - >/dev/null

if [ "$TESTS" = 1 ]; then
  # The wgmma GEMM (a8_wg) first, alone and briefly: it has never run on a GPU, and a wrong
  # descriptor or tensor map hangs on its barrier or ends the CUDA context. If it fails, the main
  # run leaves its tests out so that the rest still gets measured. On a compute capability 9.0 GPU
  # it must be supported: a false there (a register count that does not fit setmaxnreg, a probe that
  # failed) would otherwise skip all its tests silently.
  stamp "== wgmma smoke (log: $LOG/wgmma_smoke.log)"
  if [ "${FLEXQUANT_CUDA_WGMMA_OFF:-}" = 1 ]; then
    echo "FLEXQUANT_CUDA_WGMMA_OFF=1: no wgmma GEMM in this run"
  elif (cd /tmp && "$PY" -c "
import sys, flexquant_rt._core as c
sys.exit(0 if c.bitplane_gemm_wgmma_supported(128) else 1)"); then
    if limit 150 "$PY" -m pytest -q -x -p no:cacheprovider --timeout 120 -rfE --tb=short -k "a8_wg and not simt" \
        tests/test_cuda_ops.py >"$LOG/wgmma_smoke.log" 2>&1; then
      grep -E "passed|failed" "$LOG/wgmma_smoke.log" | tail -1
    else
      tail -30 "$LOG/wgmma_smoke.log"
      echo "wgmma smoke FAILED: the tests and runs below leave a8_wg out (FLEXQUANT_CUDA_WGMMA_OFF=1)"; status=1
      TESTS_K="${TESTS_K:+($TESTS_K) and }not a8_wg"
      export FLEXQUANT_CUDA_WGMMA_OFF=1  # tune and the engine then never run it either
    fi
  elif nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | grep -q '^9\.0$'; then
    echo "bitplane_gemm_wgmma_supported(128) is False on a compute capability 9.0 GPU: the a8_wg tests would skip"
    status=1
  else
    echo "not a compute capability 9.0 GPU: no wgmma GEMM here"
  fi
  stamp "== tests"
  # (the CPU stand-in's variants of the op tests are CI's: not on the lent GPU's time)
  TESTS_K="${TESTS_K:+($TESTS_K) and }not simt"
  # 8 workers: the CPU reference engine dominates the time; --timeout names a test that hangs
  limit "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -n 8 --timeout 300 -rfE --tb=short ${TESTS_K:+-k "$TESTS_K"} \
    tests/test_cuda_ops.py tests/test_engine_cuda.py \
    "tests/test_model_file_cpp.py::test_cuda_dequantize_matches_cpu_exactly" >"$LOG/tests.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$LOG/tests.log" | tail -40
  [ $rc = 0 ] || { echo "tests: rc $rc"; status=1; }
fi

if [ "$SANITIZER" = 1 ]; then
  stamp "== compute-sanitizer"
  cat >"$LOG/sanitize.py" <<'EOF'
# Every GEMV path on odd shapes (short last super-chunk, N % 8 != 0, m > 8 sliced), buffers sized exactly.
import numpy as np
import flexquant_rt._core as core
from flexquant_rt import bitplane as bp
rng = np.random.default_rng(0)
for n, k, g, m, bits in [(13, 300, 32, 3, 3), (21, 576, 128, 1, 8), (200, 1536, 64, 11, 5), (9, 384, 512, 2, 4),
                         (13, 300, 96, 2, 6), (37, 1664, 256, 13, 6)]:
    codes, qp = bp.quantize(rng.standard_normal((n, k)).astype(np.float32), 8, g)
    planes = bp.pack_planes(codes, 8)
    x = rng.standard_normal((m, k)).astype(np.float32)
    paths = (("tc", "fp32") if core.bitplane_cuda_tc_supports(g) else ("fp32",)) + \
        (("mma", "mma_a16") if core.bitplane_cuda_mma_supports(g) else ())
    for path in paths:
        y = core.bitplane_matmul_cuda(np.ascontiguousarray(planes[:bits]), qp, n, k, 8, g, bits, x, path=path)
        assert np.isfinite(y).all()
    for kind in ("a8", "a16") + (("a8_wg",) if core.bitplane_gemm_wgmma_supported(g) else ()):  # the GEMMs: tile edges in m and n, K padding
        y = core.bitplane_gemm_cuda(np.ascontiguousarray(planes[:bits]), qp, n, k, 8, g, bits, x, kind=kind)
        assert np.isfinite(y).all()
        y = core.bitplane_gemm_cuda(planes, qp, n, k, 8, g, bits, np.tile(x, (70, 1)), kind=kind)
        assert np.isfinite(y).all()
# The tiled prefill attention: partial query and key tiles, GQA, both cache types.
for m_, p0_, H_, Hkv_, d_ in [(45, 31, 4, 2, 128), (70, 130, 3, 3, 36)]:
    for dt in (np.float32, np.float16):
        q_ = rng.standard_normal((m_, H_, d_)).astype(np.float32)
        kc_ = rng.standard_normal((p0_ + m_, Hkv_, d_)).astype(dt)
        assert np.isfinite(core.attention_cuda(q_, kc_, kc_, p0_, prefill=True)).all()
# The whole engine on a tiny random model: prefill (two slices), graph capture, replays with masks.
import tempfile, pathlib, sys
sys.path.insert(0, "tests")
from conftest import make_hf_llama
from flexquant_rt import Engine
from flexquant_rt.convert import HFSource, convert
d = pathlib.Path(tempfile.mkdtemp())
convert(HFSource(make_hf_llama(d / "hf")), d / "t.fq", progress=False)
eng = Engine(d / "t.fq", backend="cuda")
assert eng.backend == "cuda"
logits = eng.forward(rng.integers(0, 320, 11))[-1]  # (T, vocab): the last row
for i in range(6):
    eng.set_layer_bits(int(rng.integers(2, 9)))
    logits = eng.decode(int(np.argmax(logits)))
    assert np.isfinite(logits).all()
# The GEMM prefill (passes of >= 4 rows on it), several sequences and a batched step through the engine.
import flexquant_rt._core as fcore
b = fcore.Engine(str(d / "t.fq"), backend="cuda", n_ctx=64, n_seq=3, cuda_gemm_min_rows=4)
for s_ in range(3):
    b.eval_seq(s_, rng.integers(0, 320, 5 + 4 * s_).astype(np.int32))
lg, ent, top1 = b.decode_batch(np.array([2, 0, 1], dtype=np.int32), rng.integers(0, 320, 3).astype(np.int32))
assert np.isfinite(lg).all() and np.isfinite(ent).all()
# A 150-token prompt and a 70-token chunk with the tiled prefill attention and the wgmma GEMM (where
# the GPU runs it) switched on: passes of >= 64 rows take both.
import os
os.environ["FLEXQUANT_CUDA_TILED_ATTENTION"] = "1"
os.environ["FLEXQUANT_CUDA_WGMMA"] = "1"
t = fcore.Engine(str(d / "t.fq"), backend="cuda", n_ctx=256)
assert np.isfinite(t.forward(rng.integers(0, 320, 150).astype(np.int32), False)).all()
assert np.isfinite(t.forward(rng.integers(0, 320, 70).astype(np.int32), False)).all()
del os.environ["FLEXQUANT_CUDA_TILED_ATTENTION"], os.environ["FLEXQUANT_CUDA_WGMMA"]
# Odd widths at group 64 (K = 72 and 150: padding words past the last group) through the reference
# dequantize and the engine.
convert(HFSource(make_hf_llama(d / "odd", hidden=72, layers=2, heads=3, kv_heads=3, head_dim=24, ffn=150, vocab=333)),
        d / "odd.fq", progress=False, group_size=64)
m = core.ModelFile(str(d / "odd.fq"))
for name in ("blk.0.attn_q", "blk.0.ffn_down", "output"):
    for bits in (8, 3):
        assert np.array_equal(core.dequantize_cuda(m, name, bits), m.dequantize(name, bits)), (name, bits)
eng = Engine(d / "odd.fq", backend="cuda")
logits = eng.forward(rng.integers(0, 333, 9))[-1]
for i in range(3):
    logits = eng.decode(int(np.argmax(logits)))
    assert np.isfinite(logits).all()
# head_dim 128 (attention's vector loads) with an fp16 cache, plain launches and PDL
import os
convert(HFSource(make_hf_llama(d / "wide", hidden=256, heads=2, kv_heads=1, head_dim=128, ffn=512)), d / "w.fq",
        progress=False)
for pdl, mma in (("0", 0), ("1", 0), ("1", 1)):  # and the s8 tensor-core GEMV on every launch
    os.environ["FLEXQUANT_CUDA_PDL"] = pdl
    eng = Engine(d / "w.fq", backend="cuda", kv_dtype="f16", cuda_mma_min_rows=mma)
    logits = eng.forward(rng.integers(0, 320, 140))[-1]
    for i in range(3):
        logits = eng.decode(int(np.argmax(logits)))
        assert np.isfinite(logits).all()
print("sanitize script ok")
EOF
  for tool in memcheck racecheck initcheck; do
    if limit "$T_SANITIZER" compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" "$LOG/sanitize.py" >"$LOG/sanitizer_$tool.log" 2>&1; then
      echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOG/sanitizer_$tool.log" | tail -1)"
    else
      echo "$tool: FAILED"; tail -30 "$LOG/sanitizer_$tool.log"; status=1
    fi
  done
fi

if [ "$PROFILE" = 1 ] && command -v cuobjdump >/dev/null; then
  # the GEMV's L2 prefetch in SASS (m = 1, group 128): lane 0 issues one bulk prefetch per plane;
  # whether they became UBLKPF instructions (and no per-lane loop) shows here
  so=$("$PY" -c 'import flexquant_rt._core as c; print(c.__file__)')
  cuobjdump -sass "$so" 2>/dev/null | awk '/Function : /{if (on) exit} /Function : .*bitplane_matmul_tc_kernelILi1ELi2E/{on=1} on{print}' \
    >"$LOG/sass_gemv_tc_1_2.txt"
  echo "SASS of the m=1 TC GEMV: $(wc -l <"$LOG/sass_gemv_tc_1_2.txt") lines, $(grep -c 'UBLKPF' "$LOG/sass_gemv_tc_1_2.txt") bulk prefetches (UBLKPF):"
  grep -n -B4 -A2 'UBLKPF' "$LOG/sass_gemv_tc_1_2.txt" | head -40
fi

if [ "$PROFILE" = 1 ]; then
  # the decode step kernel by kernel (tools/gpu_profile.py: a 2-layer Llama-2-7B, context 2048)
  stamp "== decode step profile"
  # fp32 and fp16 KV cache, plain launches and PDL (FLEXQUANT_CUDA_PDL=1), the one-row GEMV on the binary
  # and on the s8 tensor cores (cuda_mma_min_rows 0 and 1)
  limit "${T_PROFILE:-300}" "$PY" tools/gpu_profile.py --layers 2 --bits 8 --prompt 2048 --kv-dtype f32 f16 --pdl 0 1 --mma-rows 0 1 \
    2>&1 | tee "$LOG/profile.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if [ "$BENCH" = 1 ]; then
  stamp "== benchmark"
  limit "$T_BENCH" "$PY" - "$LOG" <<'EOF' 2>&1 | tee "$LOG/bench.log"
import json, math, sys
import numpy as np
import torch
import torch.nn.functional as F
import flexquant_rt._core as core
from flexquant_rt import bitplane as bp

out_dir = sys.argv[1]
rng = np.random.default_rng(0)
dev = torch.device("cuda")
L2 = torch.cuda.get_device_properties(0).L2_cache_size
G, MAX_BITS = 128, 8
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # Llama-2-7B: q/k/v/o, gate/up, down


def graph_time_us(fn, launches=128, reps=20):
    """Median per-launch time of fn(i) captured `launches` times in a CUDA graph."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for i in range(launches):
            fn(i)
    times = []
    for rep in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        if rep >= 2:
            times.append(a.elapsed_time(b) * 1000 / launches)
    return float(np.median(times))


def torch_linear_us(n, k, m=1):
    nbytes = n * k * 2
    copies = max(2, math.ceil(4 * L2 / nbytes))
    ws = [torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02 for _ in range(copies)]
    x = torch.randn(m, k, device=dev, dtype=torch.float16)
    us = graph_time_us(lambda i: F.linear(x, ws[i % copies]))
    del ws
    torch.cuda.empty_cache()
    return us, nbytes


sys.path.insert(0, "tools")  # run from the repository root
import bench_ops  # random planes (every bit pattern is a valid code) and fp16 qparams, 8 bits, group 128


def random_linear(n, k):
    return bench_ops.random_linear(rng, n, k)


from bench import gpu_copy_bandwidth_gbs  # the same measurement as tools/bench.py --backend cuda
ceiling = gpu_copy_bandwidth_gbs() / 1e3  # TB/s
print(f"device: {torch.cuda.get_device_name(0)}, L2 {L2 / 2**20:.0f} MiB, copy bandwidth {ceiling:.2f} TB/s (read + write)")
rows, results = [], {"copy_tbs": ceiling, "device": torch.cuda.get_device_name(0), "runs": []}

def bench(planes, qp, n, k, bits, m, path, warps=0, prefetch=0):
    x = rng.standard_normal((m, k)).astype(np.float32)
    r = core.bitplane_matmul_cuda_bench(planes, qp, n, k, MAX_BITS, G, bits, x, path=path, warps=warps,
                                        prefetch=prefetch)
    r.update(n=n, k=k, bits=bits, m=m)
    results["runs"].append(r)
    return r

print("\n## m = 1, group size 128, median per launch in a CUDA graph, weights rotated past L2")
print(f"| shape N x K | bits | path | warps | µs | µs incl. act. prep | GB/s | % of {ceiling:.2f} TB/s | cuBLAS fp16 µs | speed-up |")
print("|---|---|---|---|---|---|---|---|---|---|")
for n, k in SHAPES:
    planes, qp = random_linear(n, k)
    t_fp16, fp16_bytes = torch_linear_us(n, k)
    results["runs"].append(dict(path="torch_fp16", n=n, k=k, m=1, matmul_us=t_fp16, bytes=fp16_bytes))
    for bits in (8, 6, 4):
        for path in ("tc", "mma", "fp32"):
            r = bench(planes, qp, n, k, bits, 1, path)
            gbs = r["bytes"] / r["matmul_us"] / 1e3
            print(f"| {n}x{k} | {bits} | {path} | {r['warps_per_block']} | {r['matmul_us']:.1f} | {r['total_us']:.1f} | {gbs:.0f} | "
                  f"{100 * gbs / 1e3 / ceiling:.0f}% | {t_fp16:.1f} | {t_fp16 / r['matmul_us']:.2f}x |")
    print(f"| {n}x{k} | fp16 | cuBLAS | | {t_fp16:.1f} | | {fp16_bytes / t_fp16 / 1e3:.0f} | "
          f"{100 * fp16_bytes / t_fp16 / 1e6 / ceiling:.0f}% | | |")

WARPS = (1, 2, 4, 8)
print("\n## tc, m = 1: µs by warps per block (split-K), without / with the L2 prefetch of each warp's next")
print("super-chunk (prefetch=1, cp.async.bulk.prefetch; FLEXQUANT_CUDA_PREFETCH=1 in the engine)")
print("| shape | bits | " + " | ".join(f"{w} warps" for w in WARPS) + " | auto |")
print("|---|---|" + "---|" * (len(WARPS) + 1))
for n, k in SHAPES:
    planes, qp = random_linear(n, k)
    for bits in (4, 6, 8):
        cells = []
        for w in (*WARPS, 0):
            r0, r1 = (bench(planes, qp, n, k, bits, 1, "tc", w, pf) for pf in (0, 1))
            cells.append(f"{r0['matmul_us']:.1f} / {r1['matmul_us']:.1f}" + (f" ({r0['warps_per_block']})" if w == 0 else ""))
        print(f"| {n}x{k} | {bits} | " + " | ".join(cells) + " |")

print("\n## batch m: µs (matmul only); tc = binary tensor cores, mma = s8 tensor cores with the codes decoded in")
print("registers (cuda_mma_min_rows in the engine); the same int8 activations; the mma kernel takes")
print("up to 16 rows per launch (tc: 8; its m = 16 is two launches of 8)")
print("mma_a16: the same kernel with fp16 activations (W{k}A16) on the f16 tensor cores")
print("| shape | bits | m | tc | mma | mma / tc | mma_a16 | fp32 | cuBLAS fp16 | cuBLAS / mma | cuBLAS / mma_a16 | mma GB/s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
    planes, qp = random_linear(n, k)
    for bits in (4, 8):
        for m in (1, 2, 4, 8, 16):
            t16, _ = torch_linear_us(n, k, m)
            tc = bench(planes, qp, n, k, bits, min(m, 8), "tc")["matmul_us"] * (2 if m > 8 else 1)
            mm = bench(planes, qp, n, k, bits, m, "mma")
            a16 = bench(planes, qp, n, k, bits, m, "mma_a16")["matmul_us"]
            fp = (bench(planes, qp, n, k, bits, m, "fp32")["matmul_us"] if (n, k) == (11008, 4096) and m <= 8
                  else float("nan"))
            print(f"| {n}x{k} | {bits} | {m} | {tc:.1f} | {mm['matmul_us']:.1f} | {mm['matmul_us'] / tc:.2f} | {a16:.1f} | "
                  f"{fp:.1f} | {t16:.1f} | {t16 / mm['matmul_us']:.2f}x | {t16 / a16:.2f}x | "
                  f"{mm['bytes'] / mm['matmul_us'] / 1e3:.0f} |")

print("\n## accuracy, 1024x4096, G 128: rel. error vs the fp64 product with fp32 activations")
n, k = 1024, 4096
w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
codes, qparams = bp.quantize(w, MAX_BITS, G)
planes = bp.pack_planes(codes, MAX_BITS)
print("| bits | x | tc (int8 act.) | fp32 path |")
print("|---|---|---|---|")
for bits in (8, 6, 4):
    ck = (codes >> (MAX_BITS - bits)).astype(np.float64).reshape(n, k // G, G)
    s_k, m_k = bp.view_params(qparams, bits, MAX_BITS)
    for kind in ("gaussian", "1% outliers x20"):
        x = rng.standard_normal((4, k)).astype(np.float32)
        if kind != "gaussian":
            x[rng.random(x.shape) < 0.01] *= 20
        xg = x.astype(np.float64).reshape(4, k // G, G)
        ref = (np.einsum("ngi,rgi->rng", ck, xg) * s_k[None]).sum(-1) + (m_k[None] * xg.sum(-1)[:, None]).sum(-1)
        errs = [np.linalg.norm(core.bitplane_matmul_cuda(planes, qparams, n, k, MAX_BITS, G, bits, x, path=p) - ref)
                / np.linalg.norm(ref) for p in ("tc", "fp32")]
        results["runs"].append(dict(accuracy=kind, bits=bits, tc=errs[0], fp32=errs[1]))
        print(f"| {bits} | {kind} | {errs[0]:.2e} | {errs[1]:.2e} |")

with open(f"{out_dir}/bench.json", "w") as f:
    json.dump(results, f, indent=1)
EOF
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if [ "$GEMM" = 1 ]; then
  stamp "== tensor-core GEMM benchmark"
  limit "$T_GEMM" "$PY" - "$LOG" <<'EOF' 2>&1 | tee "$LOG/gemm.log"
import json, sys
import numpy as np
import torch
import flexquant_rt._core as core

out_dir = sys.argv[1]
rng = np.random.default_rng(0)
dev = torch.device("cuda")
G, MAX_BITS = 128, 8
# Llama-2-7B q/k/v/o, gate/up, down; Llama-3-8B gate/up; a 70B-class gate/up (N x K)
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (28672, 8192)]
MS = (1, 8, 16, 64, 256, 1024, 4096)
KINDS = (("a8", 8), ("a8", 6), ("a8", 4), ("a16", 8), ("a16", 4))
WG = core.bitplane_gemm_wgmma_supported(G)  # the wgmma A8 GEMM (sm_90a): its columns when it runs here
if WG:
    KINDS += (("a8_wg", 8), ("a8_wg", 4))
else:
    print("(the wgmma GEMM does not run here: no a8_wg columns)")
# the binary-tensor-core GEMM: (weight bits, activation bits)
B1 = ((6, 6), (6, 8), (4, 4), (4, 8))


def cuda_time_us(fn, reps=10, calls=5):
    """Median per call, `calls` calls per timed round (the baselines' operands stay in L2 where
    they fit: a best case for them)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record(); b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / calls)
    return float(np.median(times))


sys.path.insert(0, "tools")  # run from the repository root
import bench_ops  # random planes (every bit pattern is a valid code) and fp16 qparams, 8 bits, group 128


def random_linear(n, k):
    return bench_ops.random_linear(rng, n, k)


runs = []
print("## GEMM, group 128: µs per call (unpack + prepare + gemm); baselines timed in the same run")
print("| N x K | m | cuBLAS fp16 | _int_mm | " + " | ".join(f"{kd.upper()} k={b}" for kd, b in KINDS) +
      " | fp16 / best | A8 k=8 TOP/s | " + ("A8_WG k=8 TOP/s (its GEMM launch) | fp16 / A8_WG k=8 (launch) | "
                                            "fp16 / A8_WG k=8 (whole call) | " if WG else "") +
      "GEMV tc k=4 | GEMV mma k=4 | fp16 / GEMV mma k=4 | GEMV mma_a16 k=4 (W4A16) | fp16 / it | "
      + " | ".join(f"B1 W{w}A{a}" for w, a in B1) + " |")
print("|---|---|---|---|" + "---|" * len(KINDS) + "---|---|" + ("---|---|---|" if WG else "") + "---|---|---|---|---|"
      + "---|" * len(B1))
for n, k in SHAPES:
    planes, qp = random_linear(n, k)
    # both baselines get the weight as a linear layer stores it, (n, k) row-major, used transposed
    # (x @ W.t(), as F.linear): the "TN" layout cuBLAS's int8 kernels want (a row-major (k, n) int8
    # weight measured ~115 TOP/s for _int_mm on the H100, a fraction of its int8 rate)
    w16 = (torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02).t()
    w8 = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8).t()
    for m in MS:
        x = rng.standard_normal((m, k)).astype(np.float32)
        x16 = torch.from_numpy(x).to(dev, torch.float16)
        t16 = cuda_time_us(lambda: x16 @ w16)
        t8 = float("nan")
        if m > 16:  # torch._int_mm needs m > 16
            x8 = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
            t8 = cuda_time_us(lambda: torch._int_mm(x8, w8))
        cells, launch = {}, {}
        for kind, bits in KINDS:
            r = core.bitplane_gemm_cuda_bench(planes, qp, n, k, MAX_BITS, G, bits, x, kind=kind, reps=5)
            r.update(n=n, k=k, m=m, bits=bits, kind=kind)
            runs.append(r)
            cells[(kind, bits)] = r["total_us"]
            launch[(kind, bits)] = r["gemm_us"]
        best = min(cells.values())
        gemv, gemv_mma, gemv_a16 = "", " | ", " | "
        if m <= 64:  # the GEMV takes 8 rows per launch (tc), 16 (mma, mma_a16): launches x one's time
            g = core.bitplane_matmul_cuda_bench(planes, qp, n, k, MAX_BITS, G, 4, x[: min(m, 8)], path="tc", reps=5)
            gemv = f"{g['total_us'] * ((m + 7) // 8):.1f}"
            cols = []
            for path in ("mma", "mma_a16"):
                g = core.bitplane_matmul_cuda_bench(planes, qp, n, k, MAX_BITS, G, 4, x[: min(m, 16)], path=path, reps=5)
                t = g["total_us"] * ((m + 15) // 16)
                runs.append(dict(kind=f"gemv_{path}", n=n, k=k, m=m, bits=4, total_us=t))
                cols.append(f"{t:.1f} | {t16 / t:.2f}x")
            gemv_mma, gemv_a16 = cols
        runs.append(dict(kind="cublas_fp16", n=n, k=k, m=m, total_us=t16))
        runs.append(dict(kind="int_mm", n=n, k=k, m=m, total_us=t8))
        tops = 2 * m * n * k / cells[("a8", 8)] / 1e6
        wl = launch.get(("a8_wg", 8), float("nan"))
        wg = f"{2 * m * n * k / wl / 1e6:.0f} | {t16 / wl:.2f}x | {t16 / cells[('a8_wg', 8)]:.2f}x | " if WG else ""
        b1 = []
        for wb, ab in (B1 if m <= 1024 else ()):  # past that, the B1 rows only cost the run time
            r = core.bitplane_gemm_cuda_bench(planes, qp, n, k, MAX_BITS, G, wb, x, kind="b1", reps=5, act_bits=ab)
            r.update(n=n, k=k, m=m, bits=wb)
            runs.append(r)
            b1.append(f"{r['total_us']:.1f} ({2 * m * n * k / r['gemm_us'] / 1e6:.0f} TOP/s)")
        print(f"| {n}x{k} | {m} | {t16:.1f} | {t8:.1f} | " + " | ".join(f"{cells[c]:.1f}" for c in KINDS) +
              f" | {t16 / best:.2f}x | {tops:.0f} | {wg}{gemv} | {gemv_mma} | {gemv_a16} | " + " | ".join(b1 or ["-"] * len(B1))
              + " |")
    del w16, w8
    torch.cuda.empty_cache()

print("\n## where the time goes, 11008x4096, m = 1024 (µs): unpack / prepare / gemm")
planes, qp = random_linear(11008, 4096)
x = rng.standard_normal((1024, 4096)).astype(np.float32)
for kind in ("a8", "a16") + (("a8_wg",) if WG else ()):
    for bits in (8, 4):
        r = core.bitplane_gemm_cuda_bench(planes, qp, 11008, 4096, MAX_BITS, G, bits, x, kind=kind, reps=5)
        print(f"{kind} k={bits}: {r['unpack_us']:.1f} / {r['prepare_us']:.1f} / {r['gemm_us']:.1f} (total {r['total_us']:.1f})")
with open(f"{out_dir}/gemm.json", "w") as f:
    json.dump(runs, f, indent=1)
EOF
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if [ "$E2E" = 1 ]; then
  stamp "== end-to-end decode benchmark (synthetic $E2E_MODEL)"
  if [ -n "${CONVERT_PID:-}" ]; then
    # wait for the background conversion, but not past DEADLINE
    while kill -0 "$CONVERT_PID" 2>/dev/null; do
      if [ -n "${DEADLINE:-}" ] && [ "$(date +%s)" -ge "$DEADLINE" ]; then
        kill "$CONVERT_PID" 2>/dev/null; pkill -P "$CONVERT_PID" 2>/dev/null
        echo "the conversion did not finish before DEADLINE"
        break
      fi
      sleep 2
    done
    wait "$CONVERT_PID" 2>/dev/null
    cat "$LOG/convert.log"
  fi
  e2e_end=$(( $(date +%s) + T_E2E ))
  left() { local l=$(( e2e_end - $(date +%s) )); echo $(( l > 1 ? l : 1 )); }
  [ -f "$MODEL" ] || { echo "no converted model"; status=1; }
  # the measured dispatcher (GEMV or GEMM per shape, bit-width and rows), saved in the user cache
  # where the benchmark's engines pick it up
  limit "$(left)" "$PY" -c "import sys; from flexquant_rt.cli import main; sys.exit(main(sys.argv[1:]))" tune "$MODEL" --backend cuda \
    2>&1 | tee "$LOG/e2e_tune.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  stamp "tuned"
  # each static row also with PDL, the GEMV's L2 prefetch and both (--variant), then the prompt's
  # variants (2 decode steps: their prefill columns), then the fp16 KV cache (half the attention's
  # reads at 2048)
  VARIANTS=(--variant pdl:FLEXQUANT_CUDA_PDL=1 --variant prefetch:FLEXQUANT_CUDA_PREFETCH=1
            --variant both:FLEXQUANT_CUDA_PDL=1,FLEXQUANT_CUDA_PREFETCH=1)
  limit "$(left)" "$PY" tools/bench.py "$MODEL" --backend cuda --bits 8 6 4 --prompt 2048 --decode 64 "${VARIANTS[@]}" \
    2>&1 | tee "$LOG/e2e.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  stamp "decode benchmark done"
  # (without the tuned table, which names each shape's GEMM itself: here the environment picks them)
  mkdir -p /tmp/gc_no_table
  FLEXQUANT_RT_CACHE=/tmp/gc_no_table limit "$(left)" "$PY" tools/bench.py "$MODEL" --backend cuda --bits 8 4 --prompt 2048 --decode 2 --static-only \
    --variant wgmma:FLEXQUANT_CUDA_WGMMA=1 --variant tiled_attention:FLEXQUANT_CUDA_TILED_ATTENTION=1 \
    --variant both:FLEXQUANT_CUDA_WGMMA=1,FLEXQUANT_CUDA_TILED_ATTENTION=1 \
    2>&1 | tee "$LOG/e2e_prefill.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  stamp "prefill variants done"
  limit "$(left)" "$PY" tools/bench.py "$MODEL" --backend cuda --bits 8 4 --prompt 2048 --decode 64 --kv-dtype f16 \
    --variant both:FLEXQUANT_CUDA_PDL=1,FLEXQUANT_CUDA_PREFETCH=1 \
    2>&1 | tee "$LOG/e2e_f16.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  stamp "fp16-cache decode benchmark done"
  # batched decode on the GPU (several sequences, one pass per step), both runs without the tuned
  # table (an explicit --mma-rows loads none), so that they differ only in the GEMV kernel
  FLEXQUANT_RT_CACHE=/tmp/gc_no_table limit "$(left)" "$PY" tools/bench.py "$MODEL" --backend cuda --bits 8 4 --prompt 128 --decode 32 --batch 1 4 8 16 2>&1 | tee "$LOG/e2e_batch.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  # the same with every GEMV launch on the s8 tensor cores (batch 1: the one-row decode on it)
  limit "$(left)" "$PY" tools/bench.py "$MODEL" --backend cuda --bits 8 4 --prompt 128 --decode 32 --batch 1 4 8 16 \
    --mma-rows 1 2>&1 | tee "$LOG/e2e_batch_mma.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

stamp "gpu_check: $([ $status = 0 ] && echo OK || echo FAILED)"
exit $status
