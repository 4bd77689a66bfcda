#!/usr/bin/env bash
# The GPU check, in one call on a machine with a CUDA GPU and no network (see
# ../.library/device): build from source, CUDA tests, compute-sanitizer memcheck + racecheck on
# every kernel, a short op benchmark; the table is printed last. Logs go to $OUT (or ./gpu-out).
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
status=0
step() { echo "== $1"; }

step "build (CUDAARCHS=${CUDAARCHS:=90})"
python3 -m venv --system-site-packages .venv-gpu
KFAC_EXT_WITH_CUDA=ON CUDAARCHS=$CUDAARCHS .venv-gpu/bin/pip install --no-index --no-build-isolation \
  --no-deps -C build-dir=build/gpu . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
PY=.venv-gpu/bin/python
$PY -c "import kfac_ext, torch; print(kfac_ext.build_info(), torch.cuda.get_device_name())"

step "CUDA tests"
.venv-gpu/bin/pytest tests -q -m cuda -p no:cacheprovider > "$OUT/pytest-cuda.log" 2>&1 || status=1
tail -5 "$OUT/pytest-cuda.log"

for tool in memcheck racecheck; do
  step "compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 9 $PY bench/cuda_smoke.py > "$OUT/sanitizer-$tool.log" 2>&1 \
    || status=1
  tail -4 "$OUT/sanitizer-$tool.log"
done

step "op benchmark (quick)"
$PY bench/bench_ops.py --quick --device cuda --out "$OUT" > "$OUT/bench.md" 2> "$OUT/bench.err" || status=1
echo "gpu_check exit status: $status (0 = all passed)"
cat "$OUT/bench.md"
exit $status
