#!/usr/bin/env bash
# The hash of every source the CUDA backend's archive is built from (cuda/, cpp/, CMakeLists.txt):
# tools/prebuild_cuda.sh stores it beside the archive, tools/gpu_check.sh links the archive only
# when the sources it sees hash the same.
set -euo pipefail
cd "$(dirname "$0")/.."
find cuda cpp CMakeLists.txt -type f \( -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.cpp' -o -name 'CMakeLists.txt' \) \
  | LC_ALL=C sort | while read -r f; do printf '%s\n' "$f"; cat "$f"; done | sha256sum | cut -d' ' -f1
