#!/usr/bin/env bash
# The CUDA check on a bare GPU machine (preinstalled torch, no network) in one time-boxed call:
# build mcwt_ext against the machine's torch unless the installed build already matches this
# checkout, run the CUDA tests (every needs_cuda test; each [cuda] variant of the
# device-parametrised tests carries that mark too) beside compute-sanitizer (memcheck, racecheck,
# synccheck) on the project's own kernels, then every device benchmark on CUDA. The CPU suite is
# CI's. A failing step is reported and the script goes on; it exits 1 if any step failed.
#
#   bash scripts/gpu_check.sh              # the check (BUDGET_S seconds at most)
#   bash scripts/gpu_check.sh --dry-run    # print the plan: each step's limit, adding up to BUDGET_S
#   bash scripts/gpu_check.sh --rehearse   # the same steps on this CPU (see below)
#
# Which to run when. A lease is 15 minutes of device time, 1-2 of them the machine's start, at
# most 10 minutes per call, and a call cut by its limit brings back nothing:
#   - after a change to csrc/ or to a CUDA path: this script first (BUDGET_S 390, call timeout_s
#     420); then, in a second call at once (the machine stays warm 30 s and keeps the build),
#     BUDGET_S=240 bash scripts/gpu_table1.sh [STATE_IN] (timeout_s 270), which skips the build.
#     With the start that is 2 + 7 + 4.5 = 13.5 minutes;
#   - otherwise gpu_table1.sh alone (BUDGET_S 540, timeout_s 570).

# Output in $OUT (else ./gpu_out), written on exit whatever happens (a trap): gpu_check-summary.md
# (one line per step: exit code, seconds, limit, status) and gpu_check-logs.tar.gz (each step's
# log, the tests' junit XML, the benchmark tables). Meanwhile the logs live under WORK.
#
# --rehearse runs the same steps on this CPU with the Python in use: the build only if the
# importable build does not match the checkout (and then it fails instead of installing), the
# CUDA selection (all skipped on a CPU), no sanitizer or benchmark (CUDA only).
#
# Environment [defaults]: BUDGET_S [390], OUT [$OUT or ./gpu_out], WORK [/tmp/mcwt_gpu_check],
# PYTHON [python3], BUILD [auto; force: build even if the installed build matches], CUDA_HOME
# [/usr/local/cuda], TORCH_CUDA_ARCH_LIST [9.0], MAX_JOBS [16], XDIST_WORKERS [4],
# OMP_NUM_THREADS [2: workers x threads stay within 16 cores].
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
NAME=gpu_check
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --rehearse) MODE=rehearse ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--dry-run | --rehearse]" >&2; exit 2 ;;
esac
source "$REPO/scripts/lease_lib.sh"

BUDGET_S=${BUDGET_S:-390}
OUT=${OUT:-$REPO/gpu_out}
WORK=${WORK:-/tmp/mcwt_gpu_check}
LOGS=$WORK/logs
PYTHON=${PYTHON:-python3}
BUILD=${BUILD:-auto}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
XDIST_WORKERS=${XDIST_WORKERS:-4}
SANITIZER=${COMPUTE_SANITIZER:-$CUDA_HOME/bin/compute-sanitizer}
[[ $MODE == rehearse ]] && { XDIST_WORKERS=0; PYTHON=${PYTHON_REHEARSE:-$PYTHON}; }

# pytest from a folder without mcwt_ext/ in it (the installed package is under test), printing
# each test that hangs (faulthandler) and stopped with SIGINT at its limit (summary kept).
PYTEST=("$PYTHON" "${PY_SIGINT[@]}" pytest -p no:cacheprovider -rfEs --tb=short -o faulthandler_timeout=60)
CUDA_TESTS=("$REPO/python_tests" -m needs_cuda)
OPS_TESTS=("$REPO/python_tests/test_ops_sampling.py" "$REPO/python_tests/test_ops_masked_conv.py" -m needs_cuda -x)
SAN=("$SANITIZER" --error-exitcode 1 --print-limit 50 --target-processes all --kernel-name kns=mcwt_ext)
BUILD_CMD=(env MCWT_FORCE_CUDA=1 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v "$REPO")

# The plan: fixed limits, and the CUDA tests (with the sanitizers beside them) get the rest.
ENV_S=15 BUILD_S=150 IMPORT_S=30 PACK_S=15 BENCH_S=(15 15 10 20)  # import: a cold torch import took 16 s on a loaded CPU
TESTS_S=$(( BUDGET_S - ENV_S - BUILD_S - IMPORT_S - PACK_S - BENCH_S[0] - BENCH_S[1] - BENCH_S[2] - BENCH_S[3] ))
(( TESTS_S >= 60 )) || { echo "$NAME: BUDGET_S $BUDGET_S leaves the CUDA tests $TESTS_S s; give at least $(( BUDGET_S - TESTS_S + 60 ))" >&2; exit 2; }
plan_add env $ENV_S "nvidia-smi; python, torch, CUDA, nvcc versions; cores and memory"
plan_add build $BUILD_S "if the installed build is not this checkout's (mcwt_ext/_source.py --check): ${BUILD_CMD[*]}"
plan_add import $IMPORT_S "import mcwt_ext from outside the checkout: CUDA kernels, versions"
plan_add tests-cuda $TESTS_S "${PYTEST[*]} -q -n $XDIST_WORKERS ${CUDA_TESTS[*]} --junitxml=LOGS/tests-cuda.xml"
for tool in memcheck racecheck synccheck; do
  extra=""; [[ $tool == memcheck ]] && extra="PYTORCH_NO_CUDA_MEMORY_CACHING=1 "
  plan_add "sanitizer-$tool" $TESTS_S "$extra${SAN[*]} --tool $tool ${PYTEST[*]} -q ${OPS_TESTS[*]}" tests-cuda
done
plan_add bench-sampling "${BENCH_S[0]}" "$PYTHON benchmarks/bench_sampling.py --device cuda --quick"
plan_add bench-connectivity "${BENCH_S[1]}" "$PYTHON benchmarks/bench_connectivity.py --device cuda --quick"
plan_add bench-training "${BENCH_S[2]}" "$PYTHON benchmarks/bench_training.py --device cuda --steps 30"
plan_add bench-training-nets "${BENCH_S[3]}" "$PYTHON benchmarks/bench_training.py --device cuda --nets 1,8 --archs conv2,conv6 --cuda-graph --steps 20"
plan_add pack $PACK_S "the exit trap: LOGS packed into OUT/$NAME-logs.tar.gz beside OUT/$NAME-summary.md"
plan_check
if [[ $MODE == dry ]]; then plan_print; exit 0; fi

rm -rf "$LOGS"
lease_begin
RUNDIR=$WORK/rundir  # no mcwt_ext/ here: imports find the installed package
mkdir -p "$RUNDIR" && cd "$RUNDIR" || exit 2

# env reads versions without importing torch (a cold import took 16 s on a loaded CPU); the
# import step, with the longer limit, says what torch sees.
step env bash -c "nvidia-smi || echo 'no nvidia-smi'; $PYTHON -c 'import sys, importlib.metadata as m; \
print(sys.version); print(\"torch\", m.version(\"torch\"))'; $CUDA_HOME/bin/nvcc --version || true; nproc; free -g"

CUDA_FLAG=--cuda; [[ $MODE == rehearse ]] && CUDA_FLAG=""
t0=$(date +%s)
WHY=$(build_matches $CUDA_FLAG 2>&1)
matches=$? spent=$(( $(date +%s) - t0 ))  # the check is part of the build's time
if [[ $matches == 0 && $BUILD != force ]]; then
  record build 0 "$spent" "$(plan_limit build)" "skipped: $WHY"
elif [[ $MODE == rehearse ]]; then
  record build 1 "$spent" "$(plan_limit build)" "FAIL: a rehearsal does not install; $WHY"
else
  say "building: $WHY"
  SPENT=$spent step build "${BUILD_CMD[@]}"
fi
step import "$PYTHON" -c "import torch; from mcwt_ext import _extension as e; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available() and torch.cuda.get_device_name()); \
assert e.HAS_CUDA_KERNELS or '$MODE' == 'rehearse', 'no CUDA kernels'; \
print('mcwt_ext', e.BUILT_TORCH_VERSION, 'CUDA', e.BUILT_CUDA_VERSION, 'sources', e.BUILT_SOURCE_SHA256)"

# The CUDA tests and the sanitizers at once (16 cores; the sanitizers use little of the GPU).
step tests-cuda --int "${PYTEST[@]}" -q -n "$XDIST_WORKERS" "${CUDA_TESTS[@]}" --junitxml="$LOGS/tests-cuda.xml" &
for tool in memcheck racecheck synccheck; do
  if [[ $MODE == rehearse ]]; then skip "sanitizer-$tool" "CUDA only"; continue; fi
  nocache=(); [[ $tool == memcheck ]] && nocache=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)  # the cache hides overruns
  step "sanitizer-$tool" env "${nocache[@]}" "${SAN[@]}" --tool "$tool" "${PYTEST[@]}" -q "${OPS_TESTS[@]}" &
done
wait

# Every benchmark on the GPU alone; each prints Markdown tables (device, torch, ratios).
if [[ $MODE == rehearse ]]; then
  for b in bench-sampling bench-connectivity bench-training bench-training-nets; do skip "$b" "CUDA only"; done
else
  step bench-sampling "$PYTHON" "$REPO/benchmarks/bench_sampling.py" --device cuda --quick
  step bench-connectivity "$PYTHON" "$REPO/benchmarks/bench_connectivity.py" --device cuda --quick
  step bench-training "$PYTHON" "$REPO/benchmarks/bench_training.py" --device cuda --steps 30
  step bench-training-nets "$PYTHON" "$REPO/benchmarks/bench_training.py" --device cuda --nets 1,8 \
    --archs conv2,conv6 --cuda-graph --steps 20
fi
exit 0  # the exit trap packs the logs; its exit code is 1 if a step failed
