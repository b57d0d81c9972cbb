#!/usr/bin/env bash
# One GPU window, fully used: the one prepared run for a lent GPU machine, from the
# repository root of a working tree (carry .device-wheels and .device-data with it):
#
#     OUT=/path/to/out bash bench/device_check.sh
#     QUICK=1 OUT=/tmp/x bash bench/device_check.sh      # CI: the same path on a CPU in ~1 min
#
# Phases, each under its own time budget (a phase gets the smaller of its budget and what is
# left of BUDGET_S); a failed or timed-out phase does not stop the later ones:
# 1. install: the package (pip install --no-deps --no-build-isolation -e .) and the peer
#    wheels carried in $WHEELS (bench/fetch_peer_wheels.sh; pip install --no-deps --no-index,
#    each only if that version or a newer one is not installed already);
# 2. tests: tests/ on the GPU (impl="pallas" compiles the real kernels, not interpret mode);
# 3. sweep: python -m fusedvjp.bench.sweep -- each kernel's block-size candidates at the
#    benchmark shapes (bench/sweep_candidates.json, pre-filtered on a CPU), the winners in
#    $OUT/tuning.json (commit it as kernels/tuning.json) and every timing in $OUT/sweep.json;
# 4. bench: python -m fusedvjp.bench with the tuned table (FUSEDVJP_TUNING) and the peers
#    (tokamax, torch, torch.compile, Liger) against the baseline (the users' code -- optax,
#    Flax's LayerNorm, jnp.tanh(x @ w + b), bench/baselines.py -- or xla where faster): wall
#    and device time; the cases the targets
#    judge first, then bf16 before f32 (a time limit drops the rest, not the headline);
# 5. train: the MNIST MLP for each impl (full MNIST if its IDX files are in
#    $DATA_DIR/MNIST/raw, else the shipped 10k sample);
# 6. summary: $OUT/summary.txt (each phase's outcome and seconds), then the benchmark table.
#
# Files under $OUT (the device tool returns at most 8): log.txt, summary.txt, tuning.json,
# sweep.json, bench/results.json, bench/results.md, bench/roofline.png, train/metrics.json.
#
# Environment (defaults): OUT (./runs/device), PYTHON (python3), QUICK (0), BUDGET_S (450),
# INSTALL_S (60), TEST_S (90), SWEEP_S (100), BENCH_S (170) -- training gets what is left --,
# WHEELS (.device-wheels), TESTS (tests), BENCH_DTYPES (bf16,f32), PEERS (auto), TRAIN (1),
# TRAIN_EPOCHS (10), TRAIN_IMPLS ("pallas jnp xla"), DATA_DIR (.device-data).
# QUICK=1: interpret mode on a CPU, tiny shapes, 2 sweep candidates, tests/test_kernels_common.py,
# one training impl for 2 steps on the sample, pip in --dry-run, the package import-checked
# instead of reinstalled: it proves the script and every command in it run, not speed.
set -uo pipefail

QUICK=${QUICK:-0}
OUT=${OUT:-$PWD/runs/device}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-450}
INSTALL_S=${INSTALL_S:-60}
TEST_S=${TEST_S:-90}
SWEEP_S=${SWEEP_S:-100}
BENCH_S=${BENCH_S:-170}
WHEELS=${WHEELS:-.device-wheels}
BENCH_DTYPES=${BENCH_DTYPES:-bf16,f32}
PEERS=${PEERS:-auto}
TRAIN=${TRAIN:-1}
DATA_DIR=${DATA_DIR:-.device-data}
if [[ $QUICK == 1 ]]; then
  TESTS=${TESTS:-tests/test_kernels_common.py}
  TRAIN_EPOCHS=${TRAIN_EPOCHS:-1}
  TRAIN_IMPLS=${TRAIN_IMPLS:-pallas}
  SWEEP_ARGS=(--quick --ops dense_tanh --shapes mnist --dtypes f32)
  BENCH_ARGS=(--quick --ops xent --shapes mnist --dtypes f32 --modes fwd+bwd --targets-first)
  TRAIN_ARGS=(--dataset sample --max-steps 2)
  PIP_DRY=(--dry-run)
else
  TESTS=${TESTS:-tests}
  TRAIN_EPOCHS=${TRAIN_EPOCHS:-10}
  TRAIN_IMPLS=${TRAIN_IMPLS:-pallas jnp xla}
  SWEEP_ARGS=()
  BENCH_ARGS=(--shapes mnist,llm --dtypes "$BENCH_DTYPES" --targets-first)
  TRAIN_ARGS=()
  PIP_DRY=()
fi
RESERVE_S=15  # kept back for the summary
export PYTHONUNBUFFERED=1

mkdir -p "$OUT"
LOG=$OUT/log.txt
SUMMARY=$OUT/summary.txt
: >"$LOG"
STAGES=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - SECONDS - RESERVE_S)); }
cap() { local want=$1 l; l=$(left); ((l < want)) && want=$l; echo "$want"; }
write_summary() {
  {
    echo "device check ($([[ $QUICK == 1 ]] && echo QUICK || echo full)), ${SECONDS}s of a ${BUDGET_S}s budget"
    printf '   %s\n' "${STAGES[@]}"
  } >"$SUMMARY"
}
# stage NAME TIMEOUT_S CMD...: runs CMD under timeout, output to the log, records the outcome.
stage() {
  local name=$1 limit=$2 rc start=$SECONDS
  shift 2
  if ((limit < 10)); then
    STAGES+=("$name: skipped (no time left)")
    say "== $name: skipped, no time left"
    write_summary
    return 1
  fi
  say "== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=$?
  case $rc in
    0) STAGES+=("$name: ok ($((SECONDS - start))s, limit ${limit}s)") ;;
    124 | 137) STAGES+=("$name: TIMED OUT after ${limit}s"); FAILED=1 ;;
    *) STAGES+=("$name: FAILED rc=$rc ($((SECONDS - start))s)"); FAILED=1 ;;
  esac
  write_summary
  return "$rc"
}
has() { "$PY" -c "import $1" >/dev/null 2>&1; }

say "== device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
say "== python: $("$PY" -c 'import sys, jax; print(sys.executable, "jax", jax.__version__, jax.devices())' 2>&1)"

# --- 1. install ----------------------------------------------------------------------------
INSTALL_END=$((SECONDS + $(cap "$INSTALL_S")))
if [[ $QUICK == 1 ]]; then
  stage install-package "$(cap 30)" "$PY" -c "import fusedvjp.bench.sweep; print('package importable (QUICK: not reinstalled)')"
else
  stage install-package "$(cap $((INSTALL_END - SECONDS)))" "$PY" -m pip install --no-deps --no-build-isolation -q -e .
fi
# Only the wheels whose distribution is missing or older: a carried wheel must not
# downgrade what the image has.
mapfile -t TO_INSTALL < <("$PY" - "$WHEELS" <<'EOF' 2>>"$LOG"
import importlib.metadata as md, pathlib, re, sys
from packaging.version import Version
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    try:
        have = md.version(re.sub(r"[-_.]+", "-", name))
    except md.PackageNotFoundError:
        have = None
    if have is not None and Version(have) >= Version(version):
        print(f"   {whl.name}: {name} {have} already installed", file=sys.stderr)
    else:
        print(whl)
EOF
)
if ((${#TO_INSTALL[@]})); then
  stage install-peer-wheels "$(cap $((INSTALL_END - SECONDS > 10 ? INSTALL_END - SECONDS : 10)))" \
    "$PY" -m pip install --no-deps --no-index "${PIP_DRY[@]}" "${TO_INSTALL[@]}"
else
  STAGES+=("install-peer-wheels: none to install (${WHEELS}: $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) wheels)")
fi

# --- 2. tests on the GPU --------------------------------------------------------------------
# The TPU kernels' interpret-mode tests are CI's job (they would run on the CPU here).
PYTEST_ARGS=(-q -m "not slow" -k "not mosaic_tpu" -p no:cacheprovider)
has pytest_benchmark || PYTEST_ARGS+=(-p no:benchmark)
for mod in optax hypothesis; do
  if ! has "$mod"; then
    for f in $(grep -l -E "^(import|from) $mod" tests/*.py); do
      PYTEST_ARGS+=("--ignore=$f")
      say "   $mod missing: skipping $f"
    done
  fi
done
TEST_ENV=()
if [[ $QUICK != 1 ]] && has xdist; then
  # Eight workers (16 cores; the tests are compile-bound) share the GPU: no preallocation,
  # each takes what it uses.
  PYTEST_ARGS+=(-n 8)
  TEST_ENV=(XLA_PYTHON_CLIENT_PREALLOCATE=false)
fi
read -ra TEST_PATHS <<<"$TESTS"
stage tests "$(cap "$TEST_S")" env "${TEST_ENV[@]}" "$PY" -m pytest "${TEST_PATHS[@]}" "${PYTEST_ARGS[@]}"

# --- 3. block-size sweep -------------------------------------------------------------------------
SWEEP_LIMIT=$(cap "$SWEEP_S")
stage sweep "$SWEEP_LIMIT" "$PY" -m fusedvjp.bench.sweep "${SWEEP_ARGS[@]}" --out "$OUT" \
  --tuning-out "$OUT/tuning.json" --budget-s $((SWEEP_LIMIT > 40 ? SWEEP_LIMIT - 30 : SWEEP_LIMIT / 2))

# --- 4. benchmark, tuned, with the peers ------------------------------------------------------
BENCH_ENV=(XLA_PYTHON_CLIENT_MEM_FRACTION=0.6)  # leave the peers (torch) room on the same GPU
if [[ -f $OUT/tuning.json ]]; then
  BENCH_ENV+=("FUSEDVJP_TUNING=$OUT/tuning.json")
else
  say "   no $OUT/tuning.json: the benchmark uses kernels/tuning.json"
fi
stage bench "$(cap "$BENCH_S")" env "${BENCH_ENV[@]}" "$PY" -m fusedvjp.bench "${BENCH_ARGS[@]}" --peers "$PEERS" \
  --out "$OUT/bench"

# --- 5. MNIST training per impl ----------------------------------------------------------------
TRAIN_TMP=$(mktemp -d)
if [[ $TRAIN != 1 ]]; then
  STAGES+=("train: off (TRAIN=$TRAIN)")
else
  if ((${#TRAIN_ARGS[@]} == 0)); then
    if "$PY" -c "import sys; from fusedvjp.model import data; sys.exit(not data.mnist_files_present('$DATA_DIR'))"; then
      TRAIN_ARGS=(--dataset mnist --data-dir "$DATA_DIR")
    else
      say "   no MNIST IDX files in $DATA_DIR/MNIST/raw: training on the shipped 10k sample"
      TRAIN_ARGS=(--dataset sample)
    fi
  fi
  read -ra impls <<<"$TRAIN_IMPLS"
  for i in "${!impls[@]}"; do
    impl=${impls[$i]}
    share=$(($(left) / (${#impls[@]} - i)))
    stage "train-$impl" "$share" "$PY" -m fusedvjp.model.train "${TRAIN_ARGS[@]}" --impl "$impl" \
      --epochs "$TRAIN_EPOCHS" --no-progress --out "$TRAIN_TMP/$impl"
  done
  # One file for every impl: {impl: metrics.json} (the plots stay behind).
  "$PY" - "$TRAIN_TMP" "$OUT/train" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(src.glob("*/metrics.json"))}
if runs:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "metrics.json").write_text(json.dumps(runs, indent=1))
print("== training (epoch 1 includes compilation)")
for impl, m in runs.items():
    e = m["epochs"]
    later = [h["seconds"] for h in e[1:]] or [e[0]["seconds"]]
    print(f"   {impl:<7} {len(e)} epochs  loss {e[-1]['loss']:.4f}  test accuracy {e[-1]['test_accuracy']:.4f}"
          f"  epoch 1 {e[0]['seconds']:.1f}s, then {sum(later) / len(later):.2f}s/epoch")
EOF
fi
rm -rf "$TRAIN_TMP"

# --- 6. summary, the benchmark table last --------------------------------------------------------
write_summary
{
  echo "== tuning: $("$PY" - "$OUT/tuning.json" "$OUT/sweep.json" <<'EOF' 2>&1
import json, sys
try:
    sweep = json.load(open(sys.argv[2]))
except OSError:
    print("no sweep.json"); sys.exit()
timed = [b for b in sweep["buckets"] if "results" in b]
print(f"{len(timed)} of {len(sweep['buckets'])} buckets timed on {sweep['device']}; table in {sys.argv[1]}")
EOF
)"
} >>"$SUMMARY"
{
  cat "$SUMMARY"
  if [[ -f $OUT/bench/results.json ]]; then
    "$PY" -m fusedvjp.bench --table "$OUT/bench/results.json"
  else
    echo "no benchmark results"
  fi
} 2>&1 | tee -a "$LOG"
exit "$FAILED"
