#!/usr/bin/env bash
# The GPU check, in two parts that each fit one call of at most 5 minutes on a machine with a
# CUDA GPU and no network (see ../.library/device):
#   bash bench/gpu_check.sh 1   build from source; CUDA tests (pytest -m cuda); bench/cuda_smoke.py;
#                               then cuda_smoke.py under compute-sanitizer (memcheck, racecheck,
#                               synccheck, initcheck) if compute-sanitizer works on this runtime
#                               (it is probed first; "compute-sanitizer unavailable: <reason>"
#                               otherwise, and the numeric checks above still count)
#   bash bench/gpu_check.sh 2   build only if kfac_ext._C (with CUDA) does not import; the whole
#                               step on GPT-2 small and ResNet-50 (bench_step.py, inversion every
#                               step and amortised); the op benchmark's large-rows / small-factor /
#                               routing-boundary cases (bench_ops.py --large-rows); the step on
#                               the zoo with what is left of the budget
#   bash bench/gpu_check.sh 3   time to target at GPU sizes (bench/time_to_target.py --size large)
#   bash bench/gpu_check.sh     all three, one after the other
# Each part runs its steps under `timeout`s that together stay inside BUDGET seconds (default
# 285): a step gets what is left of the budget, up to its own cap, and is skipped when under 15 s
# are left. Logs go to $OUT (default ./gpu-out), at most 8 files per part (the device tool
# returns 8 files a call: run the parts as separate calls there). A summary table (step | result |
# seconds | log file) is printed LAST; the exit status is nonzero if any step failed or timed out,
# except a sanitizer that ran out of time (reported "TIMEOUT (incomplete)" or skipped: the plain
# runs before it already checked the numbers and would have caught a hang).
#
# Device facts: Python 3.12, torch 2.11 + CUDA 13 (nvcc 13.0), offline; its python3 is already a
# venv holding torch: install into it (the machine is thrown away afterwards). `-P` keeps the repo
# root off sys.path for `python -m` / `python -c`, so ./kfac_ext (no _C) never shadows the
# installed package; `python bench/x.py` puts bench/ (not the root) first, so it needs no -P.
# Seen on an H200 machine (2026-12-04): nvcc only in /usr/local/cuda/bin, CXX=/opt/gcc/bin/g++
# (GCC 13, links libstdc++ statically unless CMakeLists.txt names torch's), compute-sanitizer
# works; part 1 took 190 s, part 2 200 s (build 40-55 s each).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
BUDGET=${BUDGET:-285}
CUDAARCHS=${CUDAARCHS:-90}
export PYTHONUNBUFFERED=1  # a step cut off by its timeout still leaves what it printed
SUMMARY=()
failed=0
PART_START=$SECONDS

record() { SUMMARY+=("| $1 | $2 | $3 | $4 |"); }

# run_step NAME CAP LOG COMMAND [soft]: runs COMMAND (a bash string) with its output in $OUT/LOG
# under a timeout of min(CAP, seconds left in this part's budget); "soft": a timeout, or a skip
# for want of time, does not fail the check. Returns COMMAND's status (2: skipped).
run_step() {
  local name=$1 cap=$2 log=$3 cmd=$4 soft=${5:-}
  local left=$((BUDGET - (SECONDS - PART_START)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    echo "== $name: skipped, ${left}s of the ${BUDGET}s budget left"
    record "$name" "SKIP (no time left)" 0 "-"
    [[ -n $soft ]] || failed=1
    return 2
  fi
  echo "== $name (timeout ${limit}s) > $OUT/$log"
  local start=$SECONDS rc
  timeout -k 5 "$limit" bash -c "$cmd" >"$OUT/$log" 2>&1
  rc=$?
  local took=$((SECONDS - start))
  if ((rc == 0)); then
    record "$name" PASS "$took" "$OUT/$log"
  elif ((rc == 124 || rc == 137)) && [[ -n $soft ]]; then
    record "$name" "TIMEOUT (${limit}s, incomplete)" "$took" "$OUT/$log"
  else
    if ((rc == 124 || rc == 137)); then
      record "$name" "TIMEOUT (${limit}s)" "$took" "$OUT/$log"
    else
      record "$name" "FAIL (exit $rc)" "$took" "$OUT/$log"
    fi
    failed=1
    tail -n 15 "$OUT/$log"
  fi
  return $rc
}

# Sets NVCC to the CUDA compiler the build will use: $CUDACXX, else nvcc on PATH, else the newest
# /usr/local/cuda*/bin/nvcc (on the device it may not be on PATH); exports CUDACXX and PATH for it.
find_nvcc() {
  local candidate
  NVCC=""
  for candidate in "${CUDACXX:-}" "$(command -v nvcc 2>/dev/null)" /usr/local/cuda/bin/nvcc \
      $(ls -d /usr/local/cuda*/bin/nvcc 2>/dev/null | sort -rV); do
    if [[ -n $candidate && -x $candidate ]]; then NVCC=$candidate; break; fi
  done
  if [[ -z $NVCC ]]; then
    echo "nvcc not found (CUDACXX, PATH, /usr/local/cuda*/bin)"
    return 1
  fi
  export CUDACXX=$NVCC PATH="$(dirname "$NVCC"):$PATH"
  echo "nvcc: $NVCC ($("$NVCC" --version | grep -m1 -o 'release [0-9.]*'))"
}

build() {
  find_nvcc || { record "find nvcc" "FAIL (not found)" 0 "-"; failed=1; return 1; }
  run_step "build (CUDAARCHS=$CUDAARCHS, $NVCC)" "$1" build.log \
    "KFAC_EXT_WITH_CUDA=ON CUDAARCHS=$CUDAARCHS $PY -m pip install --no-index --no-build-isolation --no-deps \
       -C build-dir=build/gpu . && \
     $PY -P -c 'import kfac_ext, torch; print(kfac_ext.build_info(), torch.__version__, torch.cuda.get_device_name())'"
}

# Sets SANITIZER (the binary) and FILTER (its --kernel-name option, possibly empty) if
# compute-sanitizer runs a trivial CUDA program here; prints why not otherwise.
probe_sanitizer() {
  local log="$OUT/sanitizer-probe.log" start=$SECONDS reason="" filter limit
  local trivial="$PY -P -c \"import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()\""
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  : >"$log"
  if [[ -z $SANITIZER ]]; then
    reason="compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
  fi
  # Only the project's kernels (namespace kfac) are instrumented: torch's own are not ours to
  # check and would take minutes. If this version rejects the option, probe again without it.
  for filter in "--kernel-name kns=kfac" ""; do
    [[ -z $reason ]] || break
    limit=$((BUDGET - (SECONDS - PART_START)))
    ((limit > 45)) && limit=45
    if ((limit < 15)); then reason="no time left in the budget"; break; fi
    echo "== $SANITIZER --tool memcheck $filter <trivial torch program>" >>"$log"
    if timeout -k 5 "$limit" bash -c "$SANITIZER --tool memcheck --error-exitcode 9 $filter $trivial" >>"$log" 2>&1; then
      FILTER=$filter
      record "compute-sanitizer probe" "PASS (filter: ${filter:-none})" $((SECONDS - start)) "$log"
      return 0
    fi
    reason=$(grep -v -e '^== ' -e 'error-exitcode' "$log" | grep -m1 -iE "not supported|error|unrecognized|unknown|invalid" | sed 's/^[= ]*//')
    [[ -n $reason ]] || reason="no answer within ${limit}s"
    # Our own "== <command>" header lines name --kernel-name too: only the sanitizer's answer counts.
    if [[ -n $filter ]] && grep -v '^== ' "$log" | grep -qiE "kernel-name|unrecognized|unknown option|invalid option"; then
      reason=""  # the option, not the device: try without it
    fi
  done
  reason=${reason//|/}
  echo "compute-sanitizer unavailable: $reason"
  record "compute-sanitizer probe" "SKIP (unavailable: ${reason:0:120})" $((SECONDS - start)) "$log"
  SANITIZER=""
}

part1() {
  PART_START=$SECONDS
  build 150 || { BUILD_FAILED=1; return 1; }
  local xdist=""
  $PY -P -c "import xdist" >/dev/null 2>&1 && xdist="-n 4"
  run_step "CUDA tests (pytest -m cuda)" 100 pytest-cuda.log \
    "$PY -P -m pytest tests -q -m cuda -p no:cacheprovider $xdist" && tail -n 1 "$OUT/pytest-cuda.log"
  run_step "cuda_smoke.py" 60 cuda-smoke.log "$PY bench/cuda_smoke.py" && tail -n 1 "$OUT/cuda-smoke.log"
  probe_sanitizer
  [[ -n $SANITIZER ]] || return 0
  # memcheck without torch's caching allocator: otherwise an overrun lands in a neighbouring
  # tensor of the same cached block and goes unseen (cuda_smoke.py then skips its graph capture,
  # which needs that allocator; the other tools cover it). racecheck covers shared memory only.
  local tool opts cap env
  for tool in memcheck racecheck synccheck; do
    opts="--tool $tool --error-exitcode 9 $FILTER" cap=60 env=""
    [[ $tool == memcheck ]] && cap=75 env="PYTORCH_NO_CUDA_MEMORY_CACHING=1"
    run_step "compute-sanitizer $tool" $cap "sanitizer-$tool.log" \
      "$env $SANITIZER $opts $PY bench/cuda_smoke.py" soft && tail -n 1 "$OUT/sanitizer-$tool.log"
  done
  # initcheck runs unfiltered (memory written by kernels it does not instrument would otherwise
  # look uninitialized to it), so it also reports reads inside libraries: cuSOLVER's float64
  # sytrd4_gpu reads workspace it never wrote (seen on an H200, thousands of reports, none with a
  # wrong result). Only a report in one of our kernels (namespace kfac) fails the step; the log
  # counts the reports per kernel.
  run_step "compute-sanitizer initcheck (kfac kernels)" 60 sanitizer-initcheck.log \
    "$SANITIZER --tool initcheck --print-limit 1000000 --show-backtrace no $PY bench/cuda_smoke.py \
       >/tmp/initcheck-raw.log 2>&1; rc=\$?; initcheck_summary /tmp/initcheck-raw.log; \
     ((rc == 0)) && ! grep -A1 -E '^=+ (Uninitialized|Invalid)' /tmp/initcheck-raw.log | grep -q 'kfac::'" \
    soft && tail -n 1 "$OUT/sanitizer-initcheck.log"
}

# Reports per kernel in an initcheck log, most frequent first, then the total.
initcheck_summary() {
  tail -n 3 "$1"
  grep -A1 -E '^=+ (Uninitialized|Invalid)' "$1" | grep -E '^=+ +at ' \
    | sed -E 's/^=+ +at //; s/\+0x[0-9a-f]+$//' | cut -c1-100 | sort | uniq -c | sort -rn
  echo "initcheck: $(grep -cE '^=+ (Uninitialized|Invalid)' "$1") reports," \
    "$(grep -A1 -E '^=+ (Uninitialized|Invalid)' "$1" | grep -c 'kfac::') in kfac kernels"
}
export -f initcheck_summary

part2() {
  PART_START=$SECONDS
  [[ -z ${BUILD_FAILED:-} ]] || return 1
  if ! $PY -P -c "import kfac_ext._C, kfac_ext; assert kfac_ext.build_info()['built_with_cuda']" >/dev/null 2>&1; then
    build 130 || return 1
  fi
  # Most important first, each writing its rows as they come: the whole step on the models users
  # train (GPT-2 small, ResNet-50), leaving 75 s for the op benchmark (the routing thresholds),
  # then the zoo with whatever is left.
  local left=$((BUDGET - (SECONDS - PART_START)))
  run_step "step benchmark (GPT-2 small, ResNet-50)" $((left - 75)) bench-step.log \
    "$PY bench/bench_step.py --device cuda --models gpt2,resnet --min-run-time 0.1 --rounds 1 --out $OUT"
  run_step "op benchmark (--large-rows)" 75 bench-ops.log \
    "$PY bench/bench_ops.py --large-rows --device cuda --min-run-time 0.05 --out $OUT"
  run_step "step benchmark (zoo)" 120 bench-step-zoo.log \
    "$PY bench/bench_step.py --device cuda --models transformer,mlp,cnn --min-run-time 0.1 --rounds 1 --out $OUT" soft
  echo
  grep -hE '^(\||step-cuda)' "$OUT/bench-step.log" "$OUT/bench-step-zoo.log" 2>/dev/null
  echo
  grep -E '^(\||ops-cuda)' "$OUT/bench-ops.log" 2>/dev/null
}

# Time to target at GPU sizes (bench/time_to_target.py --size large): the transformer workloads,
# AdamW, K-FAC's rules and SOAP (pytorch_optimizer: the device is offline, so fetch its wheel here
# first, `pip download --no-deps -d gpu-wheels pytorch_optimizer==4.1.0`, and carry gpu-wheels/),
# learning rates swept, 2 seeds. Tables and JSON are written per workload.
part3() {
  PART_START=$SECONDS
  if ! $PY -P -c "import kfac_ext._C, kfac_ext; assert kfac_ext.build_info()['built_with_cuda']" >/dev/null 2>&1; then
    build 130 || return 1
  fi
  if ! $PY -P -c "import pytorch_optimizer" >/dev/null 2>&1 && ls gpu-wheels/pytorch_optimizer-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps gpu-wheels/pytorch_optimizer-*.whl
  fi
  run_step "time to target (GPU sizes)" 600 time-to-target.log \
    "$PY bench/time_to_target.py --device cuda --size large --workloads ${TTT_WORKLOADS:-char-transformer,gpt2-tied} --out $OUT"
  grep -E '^(\*\*|\|)' "$OUT/time-to-target.log"
}

case ${1:-all} in
  1) part1 ;;
  2) part2 ;;
  3) part3 ;;
  all) part1; part2; part3 ;;
  *) echo "usage: bash bench/gpu_check.sh [1|2|3]" >&2; exit 2 ;;
esac

echo
echo "gpu_check part ${1:-1, 2 and 3} summary ($OUT):"
echo "| step | result | seconds | log file |"
echo "|---|---|---:|---|"
printf '%s\n' "${SUMMARY[@]}"
exit $failed
