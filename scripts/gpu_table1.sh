#!/usr/bin/env bash
# Table 1 on a bare CUDA machine in one time-boxed call: build against the machine's torch,
# materialise CIFAR-10 from a carried folder, resume the grid from a previous state bundle, run
# `mcwt reproduce` until the budget is spent, and leave the new state bundle and the tables in
# one output folder. Call it again (with the bundle it left) until the grid is finished.
#
#   bash scripts/gpu_table1.sh [STATE_IN]
#
# Environment (defaults in brackets):
#   OUT          output folder [$OUT, else ./gpu_out]: state.zip, tables/, log/, status.txt
#   BUDGET_S     wall-clock seconds for the whole call, build included [540]
#   RESERVE_S    seconds kept back for the export and copies after reproduce stops [45]
#   DATA_DIR     carried folder with cifar10-jpeg.npz + materialize.py [.device_data]
#   ARCHS        [conv2,conv4,conv6]    SEEDS [3]    PROTOCOL full|paper [full]
#   PACK         --pack value [auto]
#   STATE_IN     a bundle from an earlier call (or the first argument) [none]
#
# Needs: python3 with torch (CUDA) and Pillow preinstalled, nvcc at /usr/local/cuda. No network:
# the build uses the machine's torch (no build isolation, no dependency resolution).
#
# DRAFT: `--pack`, `--export-state`, `--import-state` and `--protocol paper` are not `mcwt
# reproduce` flags yet (issue 10); the state is also exported through the library
# (mcwt_ext.state.export_state), so a call cut short by the budget still leaves its bundle.
set -uo pipefail
cd "$(dirname "$0")/.."
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
WORK=${WORK:-/tmp/mcwt_table1}
GRID="$WORK/grid"
mkdir -p "$OUT/log" "$OUT/tables" "$WORK"
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[$(elapsed) s] $*" | tee -a "$OUT/log/steps.log"; }
status() { echo "$*" >> "$OUT/status.txt"; }
: > "$OUT/status.txt"

say "machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" \
  | tee -a "$OUT/log/steps.log"

# 1. Build against the preinstalled torch (C++ and CUDA kernels).
say "building"
if ! CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip install --no-build-isolation --no-deps . > "$OUT/log/build.log" 2>&1; then
  say "build failed (see log/build.log)"; status "build: failed"; exit 1
fi
(cd / && python3 -c "from mcwt_ext import _extension as e; print('mcwt_ext built: CUDA', e.BUILT_CUDA_VERSION)") \
  | tee -a "$OUT/log/steps.log"
status "build: ok after $(elapsed) s"

# 2. CIFAR-10 from the carried JPEG copy.
if [[ ! -d "$WORK/data/cifar-10-batches-py" ]]; then
  say "materialising CIFAR-10"
  if ! python3 "$DATA_DIR/materialize.py" "$WORK/data" > "$OUT/log/data.log" 2>&1; then
    say "materialize failed (see log/data.log)"; status "data: failed"; exit 1
  fi
fi

# 3. The previous state, if any.
IMPORT=()
if [[ -n "$STATE_IN" ]]; then
  [[ -f "$STATE_IN" ]] || { say "STATE_IN $STATE_IN does not exist"; status "import: missing"; exit 1; }
  IMPORT=(--import-state "$STATE_IN")
  say "resuming from $STATE_IN"
fi

# 4. The grid, until the budget (less the reserve) is spent. SIGINT first: reproduce stops
#    cleanly; checkpoints of the training in progress stay on this machine only.
LEFT=$(( BUDGET_S - RESERVE_S - $(elapsed) ))
if (( LEFT < 30 )); then say "no time left for the grid"; status "grid: no time"; exit 1; fi
say "reproduce for at most $LEFT s"
timeout --signal=INT --kill-after=20 "$LEFT" \
  python3 -m mcwt_ext.cli reproduce --dataset cifar10 --data-root "$WORK/data" --protocol "$PROTOCOL" \
    --arch "$ARCHS" --seeds "$SEEDS" --device cuda --pack "$PACK" --no-progress --out "$GRID" \
    "${IMPORT[@]}" --export-state "$OUT/state.zip" > "$OUT/log/reproduce.log" 2>&1
RC=$?
say "reproduce exited with $RC (124/130: stopped by the budget)"
status "reproduce: rc $RC after $(elapsed) s"

# 5. The state, whatever happened (reproduce exports only when it returns normally).
if [[ ! -f "$OUT/state.zip" || "$OUT/state.zip" -ot "$GRID/config.json" || $RC -ne 0 ]]; then
  if [[ -d "$GRID" ]]; then
    python3 -c "import sys; from mcwt_ext.state import export_state; m = export_state(sys.argv[1], sys.argv[2]); \
print(len(m['masks']), 'mask sets,', len(m['files']), 'files')" "$GRID" "$OUT/state.zip" \
      2>&1 | tee -a "$OUT/log/steps.log"
  fi
fi
[[ -f "$OUT/state.zip" ]] && status "state: $(stat -c %s "$OUT/state.zip") bytes"

# 6. Tables, cost and figures as far as the grid got.
for f in table.md table.csv cost.md cost.csv config.json; do
  [[ -f "$GRID/$f" ]] && cp "$GRID/$f" "$OUT/tables/"
done
[[ -d "$GRID/figures" ]] && cp -r "$GRID/figures" "$OUT/tables/"
find "$GRID" -name summary.json -path '*seed_*' | sed "s|$GRID/||" | sort > "$OUT/finished_runs.txt" 2>/dev/null
status "finished runs: $(wc -l < "$OUT/finished_runs.txt")"
say "done; $(cat "$OUT/status.txt" | tr '\n' ';')"
exit $RC
