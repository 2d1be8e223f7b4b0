# What gpu_check.sh and gpu_table1.sh share (sourced, never run): a plan of steps whose time
# limits add up to the script's budget, each step run under its limit with its log in a work
# folder, and on exit, whatever happened (a trap), the logs packed into one archive beside one
# summary in $OUT. A lent GPU machine brings back at most 8 files from $OUT, and nothing at all
# from a call cut by its limit: so nothing else is written there, and no step outlives the plan.
#
# The caller sets NAME (prefix of its two output files), OUT, LOGS (the work folder packed at
# exit), BUDGET_S, PYTHON and REPO, then calls plan_add for each step, plan_check, and (unless
# --dry-run) lease_begin. Summary columns: step, exit code, seconds, limit, status.

PLAN_NAMES=() PLAN_LIMITS=() PLAN_WHAT=() PLAN_BESIDE=()
START=$(date +%s)  # the budget counts from the script's start

# plan_add NAME LIMIT_S WHAT [BESIDE]: a step; BESIDE names the step it runs in parallel with
# (it shares that step's time, so it does not count again toward the budget).
plan_add() {
  PLAN_NAMES+=("$1") PLAN_LIMITS+=("$2") PLAN_WHAT+=("$3") PLAN_BESIDE+=("${4:-}")
}

plan_limit() {  # plan_limit NAME: its limit in seconds
  local i
  for i in "${!PLAN_NAMES[@]}"; do
    [[ ${PLAN_NAMES[$i]} == "$1" ]] && { echo "${PLAN_LIMITS[$i]}"; return 0; }
  done
  echo "plan_limit: no step $1" >&2; return 1
}

plan_total() {  # the seconds of the sequential steps
  local i total=0
  for i in "${!PLAN_NAMES[@]}"; do
    [[ -z ${PLAN_BESIDE[$i]} ]] && total=$(( total + PLAN_LIMITS[i] ))
  done
  echo "$total"
}

plan_print() {
  local i
  for i in "${!PLAN_NAMES[@]}"; do
    if [[ -n ${PLAN_BESIDE[$i]} ]]; then
      echo "[plan] ${PLAN_NAMES[$i]} ${PLAN_LIMITS[$i]} s (beside ${PLAN_BESIDE[$i]}): ${PLAN_WHAT[$i]}"
    else
      echo "[plan] ${PLAN_NAMES[$i]} ${PLAN_LIMITS[$i]} s: ${PLAN_WHAT[$i]}"
    fi
  done
  echo "[plan] total $(plan_total) s of the budget $BUDGET_S s"
}

plan_check() {  # the sequential limits must add up to the budget exactly
  local total; total=$(plan_total)
  if (( total != BUDGET_S )); then
    echo "$NAME: the plan's limits add up to $total s, not the budget $BUDGET_S s" >&2
    exit 2
  fi
}

lease_begin() {
  mkdir -p "$OUT" "$LOGS" || exit 2
  SUMMARY=$LOGS/summary.md
  printf '# %s, %s\n\nBudget %s s on %s. Steps (limits add up to the budget; a step beside another shares its time):\n\n| step | exit | seconds | limit | status |\n|---|---|---|---|---|\n' \
    "$NAME" "$(date -u +%FT%TZ)" "$BUDGET_S" "$(hostname)" > "$SUMMARY"
  trap lease_end EXIT
  trap 'exit 143' TERM
  trap 'exit 130' INT
}

elapsed() { echo $(( $(date +%s) - START )); }

say() { echo "[$NAME +$(elapsed)s] $*"; }

# record NAME EXIT SECONDS LIMIT [STATUS]: one summary line (STATUS from EXIT if not given).
record() {
  local status=${5:-}
  if [[ -z $status ]]; then
    case $2 in
      0) status=ok ;;
      124|137) status="TIMEOUT after $4 s" ;;
      *) status=FAIL ;;
    esac
  fi
  echo "| $1 | $2 | $3 | $4 | $status |" >> "$SUMMARY"
  [[ $status == ok || $status == skipped* || $status == stopped* ]] || say "$1: $status (exit $2), see $1.log"
}

skip() { record "$1" 0 0 "$(plan_limit "$1")" "skipped: $2"; say "$1 skipped: $2"; }

# step NAME [--int] CMD...: CMD under NAME's limit (less SPENT seconds already used for it),
# output in LOGS/NAME.log; returns its exit code. The signal at the limit is TERM, or with --int
# SIGINT (pytest then prints its summary), with a grace before KILL inside the limit. A step in
# the background (&) is recorded when it ends.
step() {
  local name=$1 sig=TERM grace=5 limit t0 rc; shift
  if [[ $1 == --int ]]; then sig=INT grace=15; shift; fi
  limit=$(( $(plan_limit "$name") - ${SPENT:-0} )) || return 2
  say "$name (limit $limit s)"
  t0=$(date +%s)
  timeout --signal=$sig --kill-after=$grace $(( limit - grace )) "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  record "$name" "$rc" $(( $(date +%s) - t0 )) "$limit"
  return $rc
}

# `"$PYTHON" "${PY_SIGINT[@]}" pytest ...`: pytest that a limit's SIGINT stops with its summary,
# also in the background (sigint_module.py).
PY_SIGINT=("$REPO/scripts/sigint_module.py")

# build_matches [--cuda]: whether the importable mcwt_ext was built from this checkout (setup.py,
# pyproject.toml, csrc/, the package's Python files; with CUDA kernels); prints why (mcwt_ext/_source.py).
build_matches() {
  (cd / && "$PYTHON" "$REPO/mcwt_ext/_source.py" --check "$REPO" "$@")
}

lease_end() {
  local rc=$? pids t0 packed failed=0
  trap - EXIT TERM INT
  pids=$(jobs -pr)
  [[ -n $pids ]] && kill $pids 2>/dev/null  # our own background steps, by their ids
  t0=$(date +%s)
  declare -F before_pack > /dev/null && before_pack  # the caller's results, beside the logs
  timeout $(( $(plan_limit pack) - 2 )) tar -czf "$OUT/$NAME-logs.tar.gz" --exclude=summary.md \
    -C "$(dirname "$LOGS")" "$(basename "$LOGS")"
  packed=$?
  record pack "$packed" $(( $(date +%s) - t0 )) "$(plan_limit pack)"
  grep -qE '\| (FAIL|TIMEOUT)' "$SUMMARY" && failed=1
  (( rc == 0 && failed == 1 )) && rc=1
  echo "| total | $rc | $(elapsed) | $BUDGET_S | $([[ $rc == 0 ]] && echo ok || echo 'FAILED') |" >> "$SUMMARY"
  cp "$SUMMARY" "$OUT/$NAME-summary.md"
  cat "$SUMMARY"
  exit $rc
}
