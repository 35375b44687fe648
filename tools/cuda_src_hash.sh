#!/usr/bin/env bash
# The hash of what the CUDA backend's archive is built from: every source under cuda/ and cpp/,
# CMakeLists.txt, and the nvcc version (tools/prebuild_cuda.sh compiles for sm_90a alone, fixed).
# tools/prebuild_cuda.sh stores it beside the archive, tools/gpu_check.sh links the archive only
# when what it sees hashes the same.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  nvcc --version | tail -2
  find cuda cpp CMakeLists.txt -type f \( -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.cpp' -o -name 'CMakeLists.txt' \) \
    | LC_ALL=C sort | while read -r f; do printf '%s\n' "$f"; cat "$f"; done
} | sha256sum | cut -d' ' -f1
