#!/usr/bin/env bash
# GPU acceptance in one short run (about 6 minutes on one H200), on a bare copy of the tree:
#   1. checks that DALI, CuPy, torch and pytest import, and says what is missing;
#   2. the tests marked `gpu` (hand-over races through torch and DALI, the gather kernel against its
#      NumPy twin, bit-exact patches, resume), their status recorded, while the photo-like images for
#      step 3 are written in parallel;
#   3. benchmarks/engine.py at B 256, P 64: the warm DALI path against its own pipeline's floor, the
#      direct path and the gather kernel against the device's copy bandwidth, reuse 1/8/32/128 end to
#      end against bare nvJPEG, and the multi-crop recipe with its distinct images per batch;
#   4. benchmarks/content.py on the same images: anchors="content" against uniform anchors (reuse and
#      warm throughput, the map's cost per image against the decode).
# It never stops half-way: every step runs and is timed, the short table comes last on stdout, and
# the exit status is non-zero at the end if any step failed. Everything lands in OUT_DIR (default
# benchmarks/out): status.txt, pytest_<device>.txt, engine_<device>.txt and .json, content_<device>.txt,
# .json and content_grid_<device>.png.
#   bash benchmarks/gpu.sh [OUT_DIR]          # needs a CUDA GPU, CuPy, torch and DALI
#   bash benchmarks/gpu.sh --dry-run [OUT]    # the same script on the CPU, small and short (CI)
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # the package from this tree, installed or not
device=gpu; count=800; size=2600x3500; seconds=5; batch=256; cache=12GiB; reuse="1 8 32 128"; test_limit=240
tests="tests/test_handover.py tests/test_gather.py tests/test_sampler.py tests/test_producer.py tests/test_state.py
       tests/test_cache.py tests/test_formats.py tests/test_companions.py tests/test_anchors.py tests/test_torch.py
       tests/test_auto_reuse.py tests/test_augment.py tests/test_content.py"
marker=gpu
if [[ "${1:-}" == "--dry-run" ]]; then
  shift; device=cpu; count=24; size=240x320; seconds=0.5; batch=8; cache=64MiB; reuse="1 32"; test_limit=120
  tests="tests/test_gather.py tests/test_handover.py tests/test_outputs.py"; marker="not gpu"
fi
out="${1:-benchmarks/out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
status="$out/status.txt"
: > "$status"
failed=0
note() { printf '%-34s %s\n' "$1" "$2" | tee -a "$status"; }
started=$(date +%s)

# 0. DALI may come from an unpacked folder on PYTHONPATH whose nvidia/__init__.py would hide the
#    image's own nvidia.* packages (or be hidden by them): make such a copy inside this tree extend
#    the package path instead.
IFS=: read -r -a entries <<< "${PYTHONPATH}"
for entry in "${entries[@]}"; do
  init="$entry/nvidia/__init__.py"
  if [[ -f "$init" && "$(cd "$entry" && pwd)" == "$repo"/* ]] && ! grep -q extend_path "$init"; then
    echo '__path__ = __import__("pkgutil").extend_path(__path__, __name__)' > "$init"
  fi
done

# 1. What this machine has.
t0=$(date +%s)
missing=$($py - <<'EOF'
import importlib
names = {"nvidia.dali": "DALI (nvidia-dali-cuda130)", "cupy": "CuPy (cupy-cuda13x)", "torch": "torch",
         "pytest": "pytest", "numpy": "numpy", "PIL": "Pillow", "tqdm": "tqdm"}
missing = []
for module, name in names.items():
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure to import is "missing"
        missing.append(f"{name} ({type(e).__name__}: {e})")
print("; ".join(missing))
EOF
)
if [[ -n "$missing" ]]; then note "imports" "MISSING: $missing"; else note "imports" "ok"; fi
if [[ "$device" == gpu ]]; then
  gpu=$($py -c "import cupy; print(cupy.cuda.runtime.getDeviceProperties(0)['name'].decode())" 2>&1 | tail -1)
  note "device" "$gpu"
fi
needed="nvidia.dali, numpy, PIL, tqdm"
[[ "$device" == gpu ]] && needed="$needed, cupy, torch"
if ! essential=$($py -c "import $needed" 2>&1); then
  note "step 1 (checks)" "$(( $(date +%s) - t0 )) s"
  note "result" "FAILED: nothing can be measured without $needed: $(echo "$essential" | tail -n 1)"
  exit 1
fi
if [[ "$device" == gpu ]]; then  # nvJPEG and nvImageCodec load only when a mixed decoder is built
  if smoke=$($py benchmarks/smoke_mixed.py 2>&1); then note "nvJPEG (mixed decoder)" "ok, $(echo "$smoke" | tail -n 1)"
  else failed=1; note "nvJPEG (mixed decoder)" "FAILED: $(echo "$smoke" | tail -n 1)"; fi
fi
note "step 1 (checks)" "$(( $(date +%s) - t0 )) s"

# 2. The GPU tests, while the images are written.
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
t0=$(date +%s)
workers=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))  # half the cores: the tests run beside it
( $py -m dali_patches.cli synth "$data" --count $count --size $size --format mixed --workers $workers \
    --no-progress > "$out/synth.txt" 2>&1; echo $? > "$out/synth.rc" ) &
synth_pid=$!
if $py -c "import pytest" 2>/dev/null; then
  # shellcheck disable=SC2086
  timeout $test_limit $py -m pytest -q -rs -p no:cacheprovider -m "$marker" $tests > "$out/pytest_$device.txt" 2>&1
  rc=$?
  summary=$(tail -n 1 "$out/pytest_$device.txt")
  if [[ $rc -eq 124 ]]; then summary="timed out after ${test_limit} s ($summary)"; fi
  if [[ $rc -ne 0 ]]; then failed=1; note "tests" "FAILED (exit $rc): $summary"; else note "tests" "$summary"; fi
else
  failed=1; note "tests" "NOT RUN: pytest is missing"
fi
note "step 2 (tests)" "$(( $(date +%s) - t0 )) s"
t0=$(date +%s)
wait $synth_pid
if [[ "$(cat "$out/synth.rc")" != 0 ]]; then
  failed=1; note "images" "FAILED: $(tail -n 1 "$out/synth.txt")"
fi
note "images" "$(tail -n 1 "$out/synth.txt") (waited $(( $(date +%s) - t0 )) s more)"

# 3. The engine against its bounds.
t0=$(date +%s)
# shellcheck disable=SC2086
$py benchmarks/engine.py "$data" --device $device --batch $batch --patch 64 --cache $cache --reuse $reuse \
  --seconds $seconds --multicrop --json "$out/engine_$device.json" > "$out/engine_$device.txt" 2>&1
rc=$?
if [[ $rc -ne 0 ]]; then failed=1; note "engine" "FAILED (exit $rc): $(tail -n 1 "$out/engine_$device.txt")"; fi
note "step 3 (engine)" "$(( $(date +%s) - t0 )) s"

# 4. anchors="content" against uniform anchors on the same images: throughput, warm, the map's cost.
t0=$(date +%s)
$py benchmarks/content.py --data "$data" --device $device --batch $batch --patch 64 --cache $cache \
  --seconds $seconds --repeats 1 --json "$out/content_$device.json" --figure "$out/content_grid_$device.png" \
  > "$out/content_$device.txt" 2>&1
rc=$?
if [[ $rc -ne 0 ]]; then failed=1; note "content" "FAILED (exit $rc): $(tail -n 1 "$out/content_$device.txt")"; fi
note "step 4 (content)" "$(( $(date +%s) - t0 )) s"
note "total" "$(( $(date +%s) - started )) s"

echo
echo "=== status"
cat "$status"
echo "=== content ($device)"
tail -n 6 "$out/content_$device.txt"
echo "=== engine ($device)"
grep -v "it/s\]\|img/s\]" "$out/engine_$device.txt" | tail -n 20
exit $failed
