#!/usr/bin/env bash
# Table 1 on a bare CUDA machine in one time-boxed call: build against the machine's torch,
# materialise CIFAR-10 from a carried folder, resume the grid from a previous state bundle, run
# `mcwt reproduce` until the budget is spent, and leave the new state bundle and the tables in
# one output folder. Call it again (with the bundle it left) until the grid is finished.
#
#   bash scripts/gpu_table1.sh [--dry-run] [STATE_IN]
#
# Environment (defaults in brackets):
#   OUT          output folder [$OUT, else ./gpu_out]; it gets at most 5 files:
#                state.zip (the grid's state: pass it as STATE_IN next time), results.tar.gz
#                (tables, cost, figures, finished runs, logs), status.txt, steps.log, table.md
#   BUDGET_S     wall-clock seconds for the whole call, build included [540]
#   RESERVE_S    seconds kept back for the export and the copies after reproduce stops [45]
#   DATA_DIR     carried folder with cifar10-jpeg.npz + materialize.py [.device_data]
#   ARCHS        [conv2,conv4,conv6]    SEEDS [3]    PROTOCOL full|paper [full]
#   PACK         --pack value [auto: every ready net of one architecture in one pack]
#   STATE_IN     a bundle from an earlier call (or the first argument) [none]
#   PYTHON [python3]  CUDA_HOME [/usr/local/cuda]  TORCH_CUDA_ARCH_LIST [9.0]  MAX_JOBS [16]
#
# Needs: python3 with torch (CUDA) and Pillow preinstalled, nvcc. No network: the build uses the
# machine's torch (no build isolation, no dependency resolution). reproduce exports its state
# itself when it ends or is stopped (SIGINT from the budget's `timeout`); if it had to be killed,
# the state is exported through the library (mcwt_ext.state.export_state) afterwards. Trainings in
# progress restart on the next machine (their checkpoints stay here); finished cells and finished
# IMP rounds are never redone.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
START=$(date +%s)
OUT=${OUT:-$PWD/gpu_out}
BUDGET_S=${BUDGET_S:-540}
RESERVE_S=${RESERVE_S:-45}
DATA_DIR=${DATA_DIR:-.device_data}
ARCHS=${ARCHS:-conv2,conv4,conv6}
SEEDS=${SEEDS:-3}
PROTOCOL=${PROTOCOL:-full}
PACK=${PACK:-auto}
STATE_IN=${STATE_IN:-${1:-}}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/mcwt_table1}
GRID="$WORK/grid"
LOGS="$WORK/logs"
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[$(elapsed) s] $*" | tee -a "$OUT/steps.log"; }
status() { echo "$*" >> "$OUT/status.txt"; }

BUILD=(env CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
       MAX_JOBS="${MAX_JOBS:-16}" "$PYTHON" -m pip install --no-build-isolation --no-deps .)
DATA=("$PYTHON" "$DATA_DIR/materialize.py" "$WORK/data")
reproduce_cmd() {  # REPRODUCE=(...), importing $1 if given
  REPRODUCE=("$PYTHON" -m mcwt_ext.cli reproduce --dataset cifar10 --data-root "$WORK/data" --protocol "$PROTOCOL"
             --arch "$ARCHS" --seeds "$SEEDS" --device cuda --pack "$PACK" --no-progress --out "$GRID"
             ${1:+--import-state "$1"} --export-state "$OUT/state.zip")
}
reproduce_cmd "$STATE_IN"
if [[ $DRY == 1 ]]; then
  echo "[dry-run] build: ${BUILD[*]}"
  echo "[dry-run] data: ${DATA[*]}"
  echo "[dry-run] reproduce (timeout --signal=INT, budget $BUDGET_S s less $RESERVE_S s): ${REPRODUCE[*]}"
  echo "[dry-run] results: $OUT/{state.zip,results.tar.gz,status.txt,steps.log,table.md}"
  exit 0
fi
mkdir -p "$OUT" "$LOGS" "$WORK"
: > "$OUT/status.txt"

say "machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" \
  | tee -a "$OUT/steps.log"

pack_results() {  # everything but the bundle in one archive: OUT stays at <= 5 files
  for f in table.md table.csv cost.md cost.csv config.json; do
    [[ -f "$GRID/$f" ]] && cp "$GRID/$f" "$LOGS/"
  done
  [[ -f "$GRID/table.md" ]] && cp "$GRID/table.md" "$OUT/table.md"
  [[ -d "$GRID/figures" ]] && cp -r "$GRID/figures" "$LOGS/"
  [[ -d "$GRID" ]] && find "$GRID" -name summary.json -path '*seed_*' | sed "s|$GRID/||" | sort > "$LOGS/finished_runs.txt"
  tar -czf "$OUT/results.tar.gz" -C "$WORK" logs
}

# 1. Build against the preinstalled torch (C++ and CUDA kernels).
say "building"
if ! "${BUILD[@]}" > "$LOGS/build.log" 2>&1; then
  say "build failed (see logs/build.log in results.tar.gz)"; status "build: failed"; pack_results; exit 1
fi
(cd / && "$PYTHON" -c "from mcwt_ext import _extension as e; print('mcwt_ext built: CUDA', e.BUILT_CUDA_VERSION)") \
  | tee -a "$OUT/steps.log"
status "build: ok after $(elapsed) s"

# 2. CIFAR-10 from the carried JPEG copy.
if [[ ! -d "$WORK/data/cifar-10-batches-py" ]]; then
  say "materialising CIFAR-10"
  if ! "${DATA[@]}" > "$LOGS/data.log" 2>&1; then
    say "materialize failed (see logs/data.log)"; status "data: failed"; pack_results; exit 1
  fi
fi

# 3. The previous state, if any: reproduce imports it into the fresh grid directory (on the same
#    machine, the grid is already here). The new bundle replaces $OUT/state.zip.
if [[ -n "$STATE_IN" ]]; then
  [[ -f "$STATE_IN" ]] || { say "STATE_IN $STATE_IN does not exist"; status "import: missing"; exit 1; }
  cp "$STATE_IN" "$WORK/state.in.zip"
  if [[ -d "$GRID" ]]; then reproduce_cmd ""; say "grid already here; not importing"; else
    reproduce_cmd "$WORK/state.in.zip"; say "resuming from $STATE_IN"; fi
fi
rm -f "$OUT/state.zip"

# 4. The grid until the budget (less the reserve) is spent. SIGINT: reproduce stops and exports.
LEFT=$(( BUDGET_S - RESERVE_S - $(elapsed) ))
if (( LEFT < 30 )); then say "no time left for the grid"; status "grid: no time"; pack_results; exit 1; fi
say "reproduce for at most $LEFT s"
timeout --signal=INT --kill-after=$(( RESERVE_S / 2 )) "$LEFT" "${REPRODUCE[@]}" > "$LOGS/reproduce.log" 2>&1
RC=$?
say "reproduce exited with $RC (0: grid finished; 124/130: stopped by the budget)"
status "reproduce: rc $RC after $(elapsed) s"

# 5. The state, had reproduce been killed before it could export.
if [[ ! -f "$OUT/state.zip" && -d "$GRID" ]]; then
  say "exporting through the library"
  "$PYTHON" -c "import sys; from mcwt_ext.state import export_state; m = export_state(sys.argv[1], sys.argv[2]); \
print(len(m['masks']), 'mask sets,', len(m['files']), 'files')" "$GRID" "$OUT/state.zip" 2>&1 | tee -a "$OUT/steps.log"
fi
[[ -f "$OUT/state.zip" ]] && status "state: $(stat -c %s "$OUT/state.zip") bytes"

# 6. Tables, cost, figures and logs as far as the grid got.
pack_results
status "finished runs: $(wc -l < "$LOGS/finished_runs.txt" 2>/dev/null || echo 0)"
say "done; $(tr '\n' ';' < "$OUT/status.txt")"
exit $RC
