#!/usr/bin/env bash
# GPU acceptance in one short run (≤ 8 minutes on one GPU): the test suite with its `gpu` tests (the
# hand-over race test, the gather kernel against its NumPy twin, bit-exact patches), then
# benchmarks/engine.py at B 256, P 64 on photo-like images: warm throughput of the DALI path and of
# the direct path against DALI's own hand-over floor, reuse 1/8/32/128 end to end against bare nvJPEG,
# and the GPU form of the multi-crop recipe with its distinct images per batch. The short table comes
# last on stdout; everything lands in OUT_DIR (default benchmarks/out) as txt and json.
#   bash benchmarks/gpu.sh [OUT_DIR]          # needs a CUDA GPU, CuPy, torch and DALI
#   bash benchmarks/gpu.sh --dry-run [OUT]    # the same script on the CPU, small and short (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
device=gpu; count=800; size=2600x3500; seconds=8; batch=256; cache=12GiB; reuse="1 8 32 128"; tests="tests/"
if [[ "${1:-}" == "--dry-run" ]]; then
  shift; device=cpu; count=24; size=240x320; seconds=0.5; batch=8; cache=64MiB; reuse="8 32"
  tests="tests/test_gather.py tests/test_handover.py tests/test_outputs.py"  # the GPU checks skip here
fi
out="${1:-benchmarks/out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
set -o pipefail
$py -m pytest -q -rs $tests 2>&1 | tee "$out/pytest_$device.txt" | tail -n 5
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
$py -m dali_patches.cli synth "$data" --count $count --size $size --format mixed --no-progress
# shellcheck disable=SC2086
$py benchmarks/engine.py "$data" --device $device --batch $batch --patch 64 --cache $cache --reuse $reuse \
  --seconds $seconds --multicrop --json "$out/engine_$device.json" 2>&1 | tee "$out/engine_$device.txt"
