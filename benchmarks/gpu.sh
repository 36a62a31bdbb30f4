#!/usr/bin/env bash
# One command on a GPU machine: the test suite (GPU tests included), per-stage timings, and the
# throughput comparison with nvJPEG decode, the CuPy arena and GPU outputs, including a warm-cache
# figure (reuse 1e6 ≈ no refill). Results land in OUT_DIR (default benchmarks/out).
#   bash benchmarks/gpu.sh [OUT_DIR]          # needs a CUDA GPU, CuPy and DALI installed
#   bash benchmarks/gpu.sh --dry-run [OUT]    # CPU-only smoke run of the same script (CI, no GPU)
# Extra arguments for throughput.py can be passed in THROUGHPUT_ARGS (e.g. "--decode-batch 64").
set -euo pipefail
cd "$(dirname "$0")/.."
device=gpu; count=800; size=1536x2048; seconds=10; batch=256; cache=6GiB; decode="16 64 128"
if [[ "${1:-}" == "--dry-run" ]]; then
  shift; device=cpu; count=40; size=240x320; seconds=1; batch=16; cache=64MiB; decode="4 8"
fi
out="${1:-benchmarks/out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if [[ $device == gpu ]]; then
  $py -m pytest -q -rs tests/ 2>&1 | tee "$out/pytest_gpu.txt"
fi
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
$py -m dali_patches.cli synth "$data" --count $count --size $size
# shellcheck disable=SC2086
$py benchmarks/stages.py "$data" --device $device --batch $batch --cache $cache --decode-batch $decode \
  --threads "$(nproc)" --seconds 3 --json "$out/stages_$device.json" 2>&1 | tee "$out/stages_$device.txt"
# shellcheck disable=SC2086
$py benchmarks/throughput.py "$data" --device $device --batch $batch --patch 64 --cache $cache \
  --reuse 1 8 32 128 1000000 --seconds $seconds --threads "$(nproc)" ${THROUGHPUT_ARGS:-} \
  --json "$out/throughput_$device.json" 2>&1 | tee "$out/throughput_$device.txt"
