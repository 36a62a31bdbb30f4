#!/usr/bin/env bash
# One command on a GPU machine: the test suite (GPU tests included), per-stage timings, the peer
# comparison (peers.py: tf.data and DataLoader where installed, DALI, dali_patches at reuse 1-128 and
# warm, all with nvJPEG decode, the CuPy arena and GPU outputs) at B=64 and the core engine's
# throughput table at B=256, and a soak run (host RSS and GPU memory over 20M patches, flat within
# ±2 %). Results (txt, json, png) land in OUT_DIR (default benchmarks/out).
#   bash benchmarks/gpu.sh [OUT_DIR]          # needs a CUDA GPU, CuPy and DALI installed
#   bash benchmarks/gpu.sh --dry-run [OUT]    # CPU-only smoke run of the same script (CI, no GPU)
# Extra arguments for peers.py and throughput.py can be passed in BENCH_ARGS (e.g. "--decode-batch 16").
set -euo pipefail
cd "$(dirname "$0")/.."
device=gpu; count=800; size=1536x2048; seconds=10; batch=256; cache=6GiB; decode="16 64 128"; peer_cache=2GiB; soak_patches=20000000; soak_tolerance=2
if [[ "${1:-}" == "--dry-run" ]]; then
  shift; device=cpu; count=80; size=240x320; seconds=1; batch=16; cache=64MiB; decode="4 8"; peer_cache=64MiB; soak_patches=20000; soak_tolerance=50  # a smoke run: too short to judge drift
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
peer_batch=$(( batch < 64 ? batch : 64 ))
# shellcheck disable=SC2086
$py benchmarks/peers.py "$data" --device $device --batch $peer_batch --patch 64 --cache $peer_cache \
  --reuse 1 8 32 128 --seconds $seconds --threads "$(nproc)" ${BENCH_ARGS:-} \
  --json "$out/peers_$device.json" --plot "$out/peers_$device.png" 2>&1 | tee "$out/peers_$device.txt"
$py benchmarks/soak.py "$data" --device $device --patches $soak_patches --tolerance $soak_tolerance --batch $batch --cache $peer_cache \
  --json "$out/soak_$device.json" --plot "$out/soak_$device.png" 2>&1 | tee "$out/soak_$device.txt"
# shellcheck disable=SC2086
$py benchmarks/throughput.py "$data" --device $device --batch $batch --patch 64 --cache $cache \
  --reuse 1 8 32 128 --seconds $seconds --threads "$(nproc)" ${BENCH_ARGS:-} \
  --json "$out/throughput_$device.json" 2>&1 | tee "$out/throughput_$device.txt"
