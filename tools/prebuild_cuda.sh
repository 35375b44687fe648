#!/usr/bin/env bash
# Compiles the CUDA backend (cuda/*.cu) for the H100 alone (sm_90a) on this machine into
# .whl/libflexquant_cuda.a, and its sources' hash (tools/cuda_src_hash.sh) into
# .whl/libflexquant_cuda.src. tools/gpu_check.sh on the lent GPU then links that archive instead of
# compiling (FLEXQUANT_CUDA_PREBUILT, CMakeLists.txt): the compile (~45 s on the H100 machine per
# call, each call a fresh machine) leaves the device time. Needs the same nvcc major as the device
# (13); .whl/ is git-ignored and travels with `carry: [".whl"]`. Rerun after any change to cuda/ or
# cpp/: a stale archive is not used (the hash differs), the device then compiles as before.
set -euo pipefail
cd "$(dirname "$0")/.."
B=build/prebuilt_cuda
h=$(bash tools/cuda_src_hash.sh)  # before the build: an edit during it must not get the new hash
FLEXQUANT_CUDA_GENCODE="-gencode=arch=compute_90a,code=sm_90a" cmake -S . -B "$B" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DFLEXQUANT_BUILD_PYTHON=OFF -DFLEXQUANT_BUILD_EXAMPLES=OFF -DFLEXQUANT_CUDA=ON >/dev/null
cmake --build "$B" --target flexquant_cuda
mkdir -p .whl
cp "$B/libflexquant_cuda.a" .whl/libflexquant_cuda.a
if [ "$(bash tools/cuda_src_hash.sh)" != "$h" ]; then
  rm -f .whl/libflexquant_cuda.a .whl/libflexquant_cuda.src
  echo "the sources changed during the build: rerun" >&2
  exit 1
fi
echo "$h" > .whl/libflexquant_cuda.src
echo "prebuilt: .whl/libflexquant_cuda.a ($(du -h .whl/libflexquant_cuda.a | cut -f1)), sources $(cat .whl/libflexquant_cuda.src)"
