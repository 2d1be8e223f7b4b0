#!/usr/bin/env bash
# Table 1 on a bare CUDA machine in one time-boxed call: check the inputs, build mcwt_ext against
# the machine's torch unless the installed build already matches this checkout (CIFAR-10 is
# decoded meanwhile), resume the grid from the previous call's state bundle, run `mcwt reproduce`
# until the budget is spent, and leave the new bundle, the table (once the grid is finished) and
# one archive of logs and results. Call it again with the bundle it left until the grid is done.
#
#   bash scripts/gpu_table1.sh [STATE_IN]              # BUDGET_S seconds at most
#   bash scripts/gpu_table1.sh --dry-run [STATE_IN]    # print the plan (limits add up to BUDGET_S)
#   bash scripts/gpu_table1.sh --rehearse [STATE_IN]   # the same steps on this CPU (see below)
#   bash scripts/gpu_table1.sh --help
#
# Which to run when. A lease is 15 minutes of device time, 1-2 of them the machine's start, at
# most 10 minutes per call, and a call cut by its limit brings back nothing:
#   - after a change to csrc/ or to a CUDA path: gpu_check.sh first (BUDGET_S 390, call timeout_s
#     420); then, in a second call at once (the machine stays warm 30 s and keeps the build, which
#     this script then skips), BUDGET_S=240 bash scripts/gpu_table1.sh (timeout_s 270). With the
#     start that is 2 + 7 + 4.5 = 13.5 minutes. If the machine went back meanwhile, 240 s cannot
#     hold a build, and the inputs check says so at once.
#   - otherwise this script alone, BUDGET_S 540 (call timeout_s 570): the grid gets 310 s when it
#     must build, 430 s when the build is there.
#
# Data (DATASET cifar10, the default). The call carries a real copy of the JPEG copy of CIFAR-10
# (cifar10-jpeg.npz and its materialize.py, about 53 MiB of the 64 MiB a call carries) in an
# ignored folder: a symbolic link would travel as a link, its target left behind. Once, in the
# repository root (this workplace keeps the files in /work/shared/data/cifar10/):
#     mkdir -p .device_data
#     cp /work/shared/data/cifar10/cifar10-jpeg.npz /work/shared/data/cifar10/materialize.py .device_data/
# then name the folder in the call: carry [".device_data"]. The previous call's state.zip goes
# there too (STATE_IN=.device_data/state.zip). The script checks all of this before anything
# else, and decodes the data (materialize.py: numpy and Pillow) into WORK/data during the build.
#
# Output in $OUT (else ./gpu_out), at most 4 files, written on exit whatever happens (a trap):
# state.zip (the grid's state: STATE_IN of the next call), table.md (once the grid is finished),
# gpu_table1-summary.md (one line per step: exit code, seconds, limit, status) and
# gpu_table1-logs.tar.gz (logs, tables, cost, figures, finished runs). With gpu_check's two files
# that is 6 of the 8 a call brings back.
#
# Stops. `mcwt reproduce --time-budget` starts only packs that can finish (else reach a
# checkpoint) before the grid's time is spent, then exports the state and exits 0; a SIGTERM at
# the grid's limit (timeout) is the backstop, and reproduce exports on it too (or this script
# does, through mcwt_ext.state.export_state, had reproduce been killed). Either is a planned
# stop: the script exits 0 unless a step failed. Finished cells and IMP rounds are never redone;
# a training in progress restarts on the next machine (checkpoints do not travel).
#
# --rehearse runs the same steps on this CPU with the Python in use: digits, conv2, 1 seed, the
# reduced protocol, packs of 4, 30 iterations, a budget of 150 s; the build only if the
# importable build does not match the checkout (and then it fails instead of installing).
# STOP_AFTER_CELLS=N sends the grid SIGTERM once N cells are finished (a stop half way).
#
# Environment [defaults]: BUDGET_S [540; rehearsal 150], OUT [$OUT or ./gpu_out], WORK
# [/tmp/mcwt_table1], DATA_DIR [.device_data], DATASET [cifar10], ARCHS [conv2,conv4,conv6],
# SEEDS [3], PROTOCOL [full|paper; full], PACK [auto], DEVICE [cuda], ITERATIONS, EVAL_EVERY
# [the protocol's], STATE_IN [the argument], EXPORT_GRACE_S [30: reproduce's export after
# SIGTERM], STOP_MARGIN_S [30: the cells' work after the last pack], BUILD [auto|force], PYTHON
# [python3], CUDA_HOME [/usr/local/cuda], TORCH_CUDA_ARCH_LIST [9.0], MAX_JOBS [16].
set -uo pipefail
CALLER=$PWD  # STATE_IN is relative to it; DATA_DIR to the repository
cd "$(dirname "$0")/.."
REPO=$PWD
NAME=gpu_table1
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry; shift ;;
  --rehearse) MODE=rehearse; shift ;;
  --help|-h) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) echo "usage: bash scripts/gpu_table1.sh [--dry-run | --rehearse | --help] [STATE_IN]" >&2; exit 2 ;;
esac
source "$REPO/scripts/lease_lib.sh"

if [[ $MODE == rehearse ]]; then
  : "${BUDGET_S:=150}" "${DATASET:=digits}" "${ARCHS:=conv2}" "${SEEDS:=1}" "${PACK:=4}" "${DEVICE:=cpu}" "${PROTOCOL:=reduced}"
  : "${ITERATIONS:=30}" "${EVAL_EVERY:=10}" "${EXPORT_GRACE_S:=10}" "${STOP_MARGIN_S:=5}"
fi
BUDGET_S=${BUDGET_S:-540}
OUT=${OUT:-$REPO/gpu_out}
WORK=${WORK:-/tmp/mcwt_table1}
LOGS=$WORK/logs
DATA_DIR=${DATA_DIR:-.device_data}
DATASET=${DATASET:-cifar10}
ARCHS=${ARCHS:-conv2,conv4,conv6}
SEEDS=${SEEDS:-3}
PROTOCOL=${PROTOCOL:-full}
PACK=${PACK:-auto}
DEVICE=${DEVICE:-cuda}
ITERATIONS=${ITERATIONS:-}
EVAL_EVERY=${EVAL_EVERY:-}
STATE_IN=${STATE_IN:-${1:-}}
EXPORT_GRACE_S=${EXPORT_GRACE_S:-30}
STOP_MARGIN_S=${STOP_MARGIN_S:-30}
STOP_AFTER_CELLS=${STOP_AFTER_CELLS:-}
BUILD=${BUILD:-auto}
PYTHON=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
GRID=$WORK/grid
RESULTS=$LOGS/results
[[ $DATA_DIR == /* ]] || DATA_DIR=$REPO/$DATA_DIR
[[ -z $STATE_IN || $STATE_IN == /* ]] || STATE_IN=$CALLER/$STATE_IN

# The build: needed unless the importable mcwt_ext was built from this checkout (CUDA kernels
# too, except in a rehearsal). Asked now: the plan gives the grid the build's time if not.
CUDA_FLAG=--cuda; [[ $MODE == rehearse ]] && CUDA_FLAG=""
BUILD_WHY=$(build_matches $CUDA_FLAG 2>&1) && [[ $BUILD != force ]] && NEED_BUILD=0 || NEED_BUILD=1
NEED_DATA=0
[[ $DATASET == cifar10 && ! -d $WORK/data/cifar-10-batches-py ]] && NEED_DATA=1
BUILD_CMD=(env MCWT_FORCE_CUDA=1 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v "$REPO")
DATA_CMD=("$PYTHON" "$DATA_DIR/materialize.py" "$WORK/data")
reproduce_cmd() {  # REPRODUCE=(...) for SECONDS of --time-budget, importing STATE_IN unless the grid is here
  REPRODUCE=("$PYTHON" -m mcwt_ext.cli reproduce --dataset "$DATASET" --protocol "$PROTOCOL" --arch "$ARCHS"
             --seeds "$SEEDS" --device "$DEVICE" --pack "$PACK" --no-progress --out "$GRID"
             --export-state "$OUT/state.zip" --time-budget "$1")
  [[ $DATASET == cifar10 ]] && REPRODUCE+=(--data-root "$WORK/data")
  [[ -n $ITERATIONS ]] && REPRODUCE+=(--iterations "$ITERATIONS")
  [[ -n $EVAL_EVERY ]] && REPRODUCE+=(--eval-every "$EVAL_EVERY")
  [[ -n $STATE_IN && ! -d $GRID ]] && REPRODUCE+=(--import-state "$STATE_IN")
  return 0
}

# The plan: fixed limits, and the grid gets the rest of the budget.
INPUTS_S=15 ENV_S=10 BUILD_S=150 DATA_S=30 IMPORT_S=30 EXPORT_S=30 PACK_S=15
(( NEED_BUILD )) || BUILD_S=0
SEQ_DATA_S=0; (( NEED_DATA && ! NEED_BUILD )) && SEQ_DATA_S=$DATA_S  # beside the build if there is one
GRID_S=$(( BUDGET_S - INPUTS_S - ENV_S - BUILD_S - SEQ_DATA_S - IMPORT_S - EXPORT_S - PACK_S ))
reproduce_cmd $(( GRID_S - EXPORT_GRACE_S - STOP_MARGIN_S ))
plan_add inputs $INPUTS_S "whether the installed build matches (a cold torch import); DATA_DIR ($DATA_DIR: a real folder with cifar10-jpeg.npz and materialize.py), STATE_IN, budget"
plan_add env $ENV_S "nvidia-smi; python and torch versions"
if (( NEED_BUILD )); then
  plan_add build $BUILD_S "${BUILD_CMD[*]} ($BUILD_WHY)"
  (( NEED_DATA )) && plan_add data $DATA_S "${DATA_CMD[*]}" build
else
  plan_add build 0 "skipped: $BUILD_WHY"
  (( NEED_DATA )) && plan_add data $DATA_S "${DATA_CMD[*]}"
fi
plan_add import $IMPORT_S "import torch (what it sees) and mcwt_ext from outside the checkout"
plan_add grid $GRID_S "the rest of the budget (more if a step ends early): timeout -s TERM $(( GRID_S - EXPORT_GRACE_S )) (KILL $EXPORT_GRACE_S s later) ${REPRODUCE[*]}"
plan_add export $EXPORT_S "if reproduce left no state.zip: mcwt_ext.state.export_state(GRID, OUT/state.zip)"
plan_add pack $PACK_S "the exit trap: tables, cost, figures, finished runs and logs into OUT/$NAME-logs.tar.gz"
plan_check
BUDGET_PROBLEM=""
(( GRID_S - EXPORT_GRACE_S - STOP_MARGIN_S >= 30 )) || BUDGET_PROBLEM="BUDGET_S $BUDGET_S leaves the grid $GRID_S s, too little (a build takes $BUILD_S s of it: run gpu_check.sh first on this machine, or give more)"
if [[ $MODE == dry ]]; then  # the plan, or why the budget cannot hold it
  [[ -z $BUDGET_PROBLEM ]] || { echo "$BUDGET_PROBLEM" >&2; exit 2; }
  plan_print; exit 0
fi

rm -rf "$LOGS"
lease_begin

before_pack() {  # lease_end: the results as far as the grid got, beside the logs
  mkdir -p "$RESULTS"
  for f in table.md table.csv cost.md cost.csv methods.csv overlap.csv config.json; do
    [[ -f $GRID/$f ]] && cp "$GRID/$f" "$RESULTS/"
  done
  [[ -f $GRID/table.md ]] && cp "$GRID/table.md" "$OUT/table.md"
  [[ -d $GRID/figures ]] && cp -r "$GRID/figures" "$RESULTS/"
  [[ -d $GRID ]] && (cd "$GRID" && find . -mindepth 4 -maxdepth 4 -name summary.json | sort) > "$RESULTS/finished_cells.txt"
  return 0
}

# 1. Inputs, before anything that takes time (the build check above counts here).
problems=()
if [[ $DATASET == cifar10 && $NEED_DATA == 1 ]]; then
  if [[ -L ${DATA_DIR%/} ]]; then
    problems+=("DATA_DIR $DATA_DIR is a symbolic link: a call carries the link, not its target; copy the files into a real folder (--help)")
  else
    for f in cifar10-jpeg.npz materialize.py; do
      [[ -f $DATA_DIR/$f && ! -L $DATA_DIR/$f ]] || problems+=("DATA_DIR: $DATA_DIR/$f is missing or a link (--help says how to prepare it)")
    done
  fi
fi
[[ -z $STATE_IN || -f $STATE_IN ]] || problems+=("STATE_IN: $STATE_IN is not a file")
[[ -z $BUDGET_PROBLEM ]] || problems+=("$BUDGET_PROBLEM")
if (( ${#problems[@]} )); then
  printf '%s\n' "${problems[@]}" | tee "$LOGS/inputs.log" >&2
  record inputs 2 "$(elapsed)" "$(plan_limit inputs)"
  exit 2
fi
if [[ -n $STATE_IN ]]; then  # a copy: OUT/state.zip (maybe STATE_IN itself) is rewritten
  cp "$STATE_IN" "$WORK/state.in.zip" && STATE_IN=$WORK/state.in.zip
fi
record inputs 0 "$(elapsed)" "$(plan_limit inputs)"

# env reads versions without importing torch (a cold import took over 5 s on a loaded CPU); the
# import step, with the longer limit, says what torch sees.
step env bash -c "nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo 'no nvidia-smi'; \
$PYTHON -c 'import sys, importlib.metadata as m; print(sys.version); print(\"torch\", m.version(\"torch\"))'"

# 2. The build, with CIFAR-10 decoded beside it.
if (( NEED_BUILD )) && [[ $MODE == rehearse ]]; then
  record build 1 0 0 "FAIL: a rehearsal does not install; $BUILD_WHY"; exit 1
fi
(( NEED_DATA )) && { (cd "$WORK" && step data "${DATA_CMD[@]}") & }
if (( NEED_BUILD )); then
  (cd "$WORK" && step build "${BUILD_CMD[@]}") || { wait; exit 1; }
else
  skip build "$BUILD_WHY"
fi
wait
[[ $DATASET != cifar10 || -d $WORK/data/cifar-10-batches-py ]] || { say "no data; see data.log"; exit 1; }
(cd "$WORK" && step import "$PYTHON" -c "import torch; from mcwt_ext import _extension as e; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available()); \
print('mcwt_ext', e.BUILT_TORCH_VERSION, 'CUDA', e.BUILT_CUDA_VERSION, 'sources', e.BUILT_SOURCE_SHA256)") || exit 1

# 3. The grid, for what is left of the budget less the export and the packing. reproduce stops
#    itself (--time-budget); a SIGTERM at the limit is the backstop.
GRID_S=$(( BUDGET_S - $(elapsed) - EXPORT_S - PACK_S ))
reproduce_cmd $(( GRID_S - EXPORT_GRACE_S - STOP_MARGIN_S ))
rm -f "$OUT/state.zip"
if (( GRID_S - EXPORT_GRACE_S - STOP_MARGIN_S < 10 )); then
  record grid 0 0 "$GRID_S" "skipped: no time left"
  [[ -n $STATE_IN ]] && cp "$STATE_IN" "$OUT/state.zip"
  skip export "no grid run: STATE_IN passed on unchanged"
  exit 0
fi
say "grid (limit $GRID_S s): ${REPRODUCE[*]}"
t0=$(date +%s)
(cd "$WORK" && exec timeout --signal=TERM --kill-after="$EXPORT_GRACE_S" $(( GRID_S - EXPORT_GRACE_S )) \
  "${REPRODUCE[@]}") > "$LOGS/grid.log" 2>&1 &
RPID=$!  # the timeout: a SIGTERM to it reaches reproduce
if [[ -n $STOP_AFTER_CELLS ]]; then
  (while sleep 0.2; do
     n=$(find "$GRID" -mindepth 4 -maxdepth 4 -name summary.json 2>/dev/null | wc -l)
     (( n >= STOP_AFTER_CELLS )) && { kill -TERM "$RPID"; break; }
   done) &
  WATCHER=$!
fi
wait "$RPID"; rc=$?
[[ -n $STOP_AFTER_CELLS ]] && kill "$WATCHER" 2>/dev/null
seconds=$(( $(date +%s) - t0 ))
if [[ $rc == 0 ]] && grep -q "time budget spent" "$LOGS/grid.log"; then
  record grid 0 "$seconds" "$GRID_S" "stopped: time budget spent (planned; $(grep -o '[0-9]* cells left' "$LOGS/grid.log"))"
elif [[ $rc == 0 ]]; then
  record grid 0 "$seconds" "$GRID_S"
elif [[ $rc == 124 || $rc == 137 ]]; then
  record grid "$rc" "$seconds" "$GRID_S" "stopped: SIGTERM at the limit (planned)"
elif [[ $rc == 130 && -n $STOP_AFTER_CELLS ]]; then
  record grid "$rc" "$seconds" "$GRID_S" "stopped: SIGTERM after $STOP_AFTER_CELLS cells (rehearsal)"
else
  record grid "$rc" "$seconds" "$GRID_S"
fi

# 4. The state, had reproduce been killed before it could export.
if [[ -f $OUT/state.zip ]]; then
  skip export "reproduce exported it ($(stat -c %s "$OUT/state.zip") bytes)"
elif [[ -d $GRID ]]; then
  step export "$PYTHON" -c "import sys; from mcwt_ext.state import export_state; m = export_state(sys.argv[1], sys.argv[2]); \
print(len(m['masks']), 'mask sets,', len(m['files']), 'files')" "$GRID" "$OUT/state.zip"
elif [[ -n $STATE_IN ]]; then
  cp "$STATE_IN" "$OUT/state.zip"
  skip export "no grid: STATE_IN passed on unchanged"
else
  skip export "no grid"
fi
exit 0  # the exit trap packs the results and logs; its exit code is 1 if a step failed
