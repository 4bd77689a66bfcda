#!/usr/bin/env bash
# The GPU check, in one call on a machine with a CUDA GPU and no network (see
# ../.library/device): build from source, CUDA tests, compute-sanitizer memcheck + racecheck on
# every kernel, a short op benchmark; the table is printed last. Logs go to $OUT (or ./gpu-out).
#   bash bench/gpu_check.sh
# The device's python3 is already a venv holding torch: install into it (the machine is thrown
# away afterwards). `-P` keeps the repo root off sys.path, so ./kfac_ext (no _C) never shadows
# the installed package.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
status=0
step() { echo "== $1"; }

step "build (CUDAARCHS=${CUDAARCHS:=90})"
KFAC_EXT_WITH_CUDA=ON CUDAARCHS=$CUDAARCHS timeout 300 $PY -m pip install --no-index --no-build-isolation \
  --no-deps -C build-dir=build/gpu . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
$PY -P -c "import kfac_ext, torch; print(kfac_ext.build_info(), torch.__version__, torch.cuda.get_device_name())"

step "CUDA tests"
timeout 240 $PY -P -m pytest tests -q -m cuda -p no:cacheprovider > "$OUT/pytest-cuda.log" 2>&1 || status=1
tail -5 "$OUT/pytest-cuda.log"

# memcheck without torch's caching allocator: otherwise an overrun lands in a neighbouring
# tensor of the same cached block and goes unseen. racecheck covers shared memory only.
step "compute-sanitizer memcheck"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY -P bench/cuda_smoke.py > "$OUT/sanitizer-memcheck.log" 2>&1 || status=1
tail -4 "$OUT/sanitizer-memcheck.log"
step "compute-sanitizer racecheck"
timeout 240 compute-sanitizer --tool racecheck --error-exitcode 9 \
  $PY -P bench/cuda_smoke.py > "$OUT/sanitizer-racecheck.log" 2>&1 || status=1
tail -4 "$OUT/sanitizer-racecheck.log"

step "op benchmark (quick)"
timeout 200 $PY -P bench/bench_ops.py --quick --device cuda --out "$OUT" > "$OUT/bench.md" 2> "$OUT/bench.err" \
  || status=1
echo "gpu_check exit status: $status (0 = all passed)"
cat "$OUT/bench.md"
exit $status
