#!/usr/bin/env bash
# GPU check in one command, from the repository root of a working tree:
#
#     OUT=/path/to/out bash bench/device_check.sh
#
# 1. installs the package: pip install --no-deps --no-build-isolation -e .
# 2. runs tests/ on the GPU (impl="pallas" compiles the real kernels, not interpret mode);
#    test files importing optax or hypothesis are skipped where those are missing;
# 3. runs the full benchmark: python -m fusedvjp.bench --shapes mnist,llm --dtypes bf16,f32
#    (bf16 rows first, so a time limit drops f32 rows, not ops);
# 4. trains the MNIST MLP for each impl (TRAIN=1, the default) if MNIST's IDX files are in
#    $DATA_DIR/MNIST/raw (copy them into .device-data/ and carry that folder);
# 5. prints the stage results, the training summary and the benchmark table, last.
#
# Budget: ends inside 8 minutes on an H100, compilation included: every stage runs under
# `timeout`, sized from what is left of BUDGET_S; training runs only while time is left.
# Files under $OUT (the device tool returns at most 8): log.txt (all output),
# bench/results.json, bench/results.md, bench/roofline.png, train/metrics.json.
#
# Environment (defaults): OUT (./runs/device), PYTHON (python3), BUDGET_S (450),
# TEST_TIMEOUT_S (150), BENCH_TIMEOUT_S (240), BENCH_DTYPES (bf16,f32), TRAIN (1),
# TRAIN_EPOCHS (10), TRAIN_IMPLS ("pallas jnp xla"), DATA_DIR (.device-data).
set -uo pipefail

OUT=${OUT:-$PWD/runs/device}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-450}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-150}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-240}
BENCH_DTYPES=${BENCH_DTYPES:-bf16,f32}
TRAIN=${TRAIN:-1}
TRAIN_EPOCHS=${TRAIN_EPOCHS:-10}
TRAIN_IMPLS=${TRAIN_IMPLS:-pallas jnp xla}
DATA_DIR=${DATA_DIR:-.device-data}
RESERVE_S=15  # kept back for the summary
export PYTHONUNBUFFERED=1

mkdir -p "$OUT"
LOG=$OUT/log.txt
: >"$LOG"
STAGES=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - SECONDS - RESERVE_S)); }
cap() { local want=$1 l; l=$(left); ((l < want)) && want=$l; echo "$want"; }
# stage NAME TIMEOUT_S CMD...: runs CMD under timeout, output to the log, records the outcome.
stage() {
  local name=$1 limit=$2 rc start=$SECONDS
  shift 2
  if ((limit < 10)); then
    STAGES+=("$name: skipped (no time left)")
    say "== $name: skipped, no time left"
    return 1
  fi
  say "== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=$?
  case $rc in
    0) STAGES+=("$name: ok ($((SECONDS - start))s)") ;;
    124 | 137) STAGES+=("$name: TIMED OUT after ${limit}s"); FAILED=1 ;;
    *) STAGES+=("$name: FAILED rc=$rc ($((SECONDS - start))s)"); FAILED=1 ;;
  esac
  return "$rc"
}
has() { "$PY" -c "import $1" >/dev/null 2>&1; }

say "== device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
say "== python: $("$PY" -c 'import sys, jax; print(sys.executable, "jax", jax.__version__, jax.devices())' 2>&1)"

if ! stage install 120 "$PY" -m pip install --no-deps --no-build-isolation -q -e .; then
  say "install failed: stopping"
  printf '%s\n' "${STAGES[@]}"
  exit 1
fi

# --- tests on the GPU --------------------------------------------------------------------
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
if has xdist; then
  # Four workers share the GPU: no preallocation, each takes what it uses.
  PYTEST_ARGS+=(-n 4)
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
fi
stage tests "$(cap "$TEST_TIMEOUT_S")" "$PY" -m pytest tests "${PYTEST_ARGS[@]}"
unset XLA_PYTHON_CLIENT_PREALLOCATE

# --- benchmark ---------------------------------------------------------------------------
stage bench "$(cap "$BENCH_TIMEOUT_S")" "$PY" -m fusedvjp.bench --shapes mnist,llm --dtypes "$BENCH_DTYPES" \
  --out "$OUT/bench"

# --- MNIST training per impl -------------------------------------------------------------
TRAIN_TMP=$(mktemp -d)
if [[ $TRAIN != 1 ]]; then
  STAGES+=("train: off (TRAIN=$TRAIN)")
elif ! "$PY" -c "import sys; from fusedvjp.model import data; sys.exit(not data.mnist_files_present('$DATA_DIR'))"; then
  STAGES+=("train: skipped (no MNIST IDX files in $DATA_DIR/MNIST/raw)")
else
  read -ra impls <<<"$TRAIN_IMPLS"
  for i in "${!impls[@]}"; do
    impl=${impls[$i]}
    share=$(($(left) / (${#impls[@]} - i)))
    stage "train-$impl" "$share" "$PY" -m fusedvjp.model.train --dataset mnist --data-dir "$DATA_DIR" \
      --impl "$impl" --epochs "$TRAIN_EPOCHS" --no-progress --out "$TRAIN_TMP/$impl"
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

# --- summary, the benchmark table last -----------------------------------------------------
{
  echo "== stages (${SECONDS}s in all)"
  printf '   %s\n' "${STAGES[@]}"
  if [[ -f $OUT/bench/results.json ]]; then
    "$PY" -m fusedvjp.bench --table "$OUT/bench/results.json"
  else
    echo "no benchmark results"
  fi
} 2>&1 | tee -a "$LOG"
exit "$FAILED"
