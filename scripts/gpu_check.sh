#!/usr/bin/env bash
# The whole check on a bare CUDA machine with a preinstalled torch and no network, within
# 7 minutes on one H100 (the step timeouts add up to 6 min 55 s; the build took 64 s there).
# Builds mcwt_ext against that torch, runs the whole suite with and without pytest-xdist,
# compute-sanitizer (memcheck, racecheck, synccheck) on the ops' CUDA tests and every
# benchmark with --device cuda, and writes everything into one report folder.
# A failing step is reported loudly and the script goes on, so one run collects every report;
# the exit status is 1 if any step failed.
#
#   bash scripts/gpu_check.sh [REPORT_DIR]     # default: $OUT, else gpu-report-<date>
#   bash scripts/gpu_check.sh --dry-run [DIR]  # print the plan, run nothing
#
# Environment: PYTHON (python3), CUDA_HOME (/usr/local/cuda), TORCH_CUDA_ARCH_LIST (9.0),
# MAX_JOBS (16), XDIST_WORKERS (6). Report: summary.md (one line per step: status, seconds),
# env.txt, build.log, tests-serial.log, tests-xdist.log (+ junit XML), sanitizer-*.log,
# bench-*.md.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
REPORT=${1:-${OUT:-$REPO/gpu-report-$(date -u +%Y%m%dT%H%M%SZ)}}
PYTHON=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
XDIST_WORKERS=${XDIST_WORKERS:-6}
SANITIZER=${COMPUTE_SANITIZER:-$CUDA_HOME/bin/compute-sanitizer}
# Crashes leave a Python stack in the log instead of a bare "node down".
export PYTHONFAULTHANDLER=1
# Tests import the installed package: run pytest from a directory without mcwt_ext/ in it.
RUNDIR=$REPORT/rundir
PYTEST=("$PYTHON" -m pytest "$REPO/python_tests" -p no:cacheprovider -rfEs --tb=short)
OPS_TESTS=("$REPO/python_tests/test_ops_sampling.py" "$REPO/python_tests/test_ops_masked_conv.py")

[[ $DRY == 1 ]] || mkdir -p "$REPORT" "$RUNDIR"
SUMMARY=$REPORT/summary.md
FAILED=0  # set from summary.md at the end
START=$(date +%s)
[[ $DRY == 1 ]] || printf '# gpu_check %s\n\n| step | status | seconds | log |\n|---|---|---|---|\n' \
  "$(date -u +%FT%TZ)" > "$SUMMARY"

# step NAME TIMEOUT_S LOG CMD...: run CMD in $RUNDIR under a timeout, log stdout+stderr, record.
step() {
  local name=$1 limit=$2 log=$3; shift 3
  if [[ $DRY == 1 ]]; then
    echo "[dry-run] $name (timeout ${limit}s) > $log: $*"
    return 0
  fi
  echo "[gpu_check +$(( $(date +%s) - START ))s] $name ..."
  local t0=$(date +%s) rc
  (cd "$RUNDIR" && timeout --kill-after=10 "$limit" "$@") > "$REPORT/$log" 2>&1
  rc=$?
  local status=PASS
  if [[ $rc == 124 || $rc == 137 ]]; then status="TIMEOUT (${limit}s)"; elif [[ $rc != 0 ]]; then status="FAIL (exit $rc)"; fi
  [[ $status == PASS ]] || { echo "!!!!! gpu_check: $name: $status, see $REPORT/$log" >&2; tail -n 20 "$REPORT/$log" >&2; }
  echo "| $name | $status | $(( $(date +%s) - t0 )) | $log |" >> "$SUMMARY"
}

# step_bg: the same, in the background (its summary line is written when it ends).
step_bg() { if [[ $DRY == 1 ]]; then step "$@"; else step "$@" & fi; }

# 0. What this machine is.
step env 10 env.txt bash -c "nvidia-smi; echo; $PYTHON -c 'import torch, sys; print(sys.version); \
print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"GPU\", torch.cuda.get_device_name())'; \
$CUDA_HOME/bin/nvcc --version; nproc; free -g"

# 1. Build against the preinstalled torch (no build isolation, no dependency resolution: no network).
step build 80 build.log env MCWT_FORCE_CUDA=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -v "$REPO"
step import 15 import.log "$PYTHON" -c "from mcwt_ext import _extension as e; assert e.HAS_CUDA_KERNELS, 'no CUDA kernels'; \
print('mcwt_ext', e.BUILT_TORCH_VERSION, 'CUDA', e.BUILT_CUDA_VERSION)"

# 2. The whole suite serially and with xdist, and the sanitizers on the ops' CUDA tests, all at
#    once (16 cores; the sanitizers are slow but use little GPU). Benchmarks come last, alone.
step_bg tests-serial 150 tests-serial.log "${PYTEST[@]}" -q --junitxml="$REPORT/tests-serial.xml"
step_bg tests-xdist 150 tests-xdist.log "${PYTEST[@]}" -q -n "$XDIST_WORKERS" --junitxml="$REPORT/tests-xdist.xml"
for tool in memcheck racecheck synccheck; do
  step_bg "sanitizer-$tool" 150 "sanitizer-$tool.log" "$SANITIZER" --tool "$tool" --error-exitcode 1 \
    --print-limit 50 --target-processes all "$PYTHON" -m pytest "${OPS_TESTS[@]}" -m needs_cuda -q -x \
    -p no:cacheprovider
done
wait

# 3. Every benchmark on the GPU; each prints Markdown tables with the device, torch and ratios.
step bench-sampling 35 bench-sampling.md "$PYTHON" "$REPO/benchmarks/bench_sampling.py" --device cuda
step bench-connectivity 45 bench-connectivity.md "$PYTHON" "$REPO/benchmarks/bench_connectivity.py" --device cuda --quick
step bench-training 20 bench-training.md "$PYTHON" "$REPO/benchmarks/bench_training.py" --device cuda --steps 30
step bench-training-nets 60 bench-training-nets.md "$PYTHON" "$REPO/benchmarks/bench_training.py" --device cuda \
  --nets 1,8,16 --archs conv2,conv6 --cuda-graph --steps 20

[[ $DRY == 1 ]] && exit 0
# Background steps cannot set FAILED in this shell: read every step's status back.
grep -qE '\| (FAIL|TIMEOUT)' "$SUMMARY" && FAILED=1
echo "| total | $([[ $FAILED == 0 ]] && echo PASS || echo FAIL) | $(( $(date +%s) - START )) | |" >> "$SUMMARY"
cat "$SUMMARY"
[[ $FAILED == 0 ]] || echo "!!!!! gpu_check: some steps failed; the report is in $REPORT" >&2
exit $FAILED
