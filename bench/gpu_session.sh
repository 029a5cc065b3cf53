#!/usr/bin/env bash
# Every GPU measurement of issue #20, in one run: for a session that is lent a GPU for minutes.
#
#   bench/gpu_session.sh WHEEL_DIR [--small] [--parts step,study]
#
# WHEEL_DIR holds the wheels of what the GPU machine lacks (made beforehand, where there is a
# network: bench/gpu_wheels.sh WHEEL_DIR 3.12); they are installed into $SITE and put on PYTHONPATH
# with the repository, so ctexp runs from this tree with the machine's own torch. Then, each step
# logged to $OUT/NAME.log and a failing step not stopping the others:
#
#   step:  bench/step_equivalence.py (the compiled one-pass update replayed as a CUDA graph against
#          dense gradients and fused AdamW, fp32, reference shape); bench/train_throughput.py at batch
#          32 (also with --update dense --graph off, today's step, for the ratio) and at batch 1024;
#          --full at batch 32 (76,800 states x 8 epochs);
#   study: bench/seed_scale.py --sweep (the 1B-shaped checkpoint, ctexp extract and ctexp run as
#          whole commands, phases; ctexp sweep at 1, 2, 4 workers, 2-epoch trials).
#
# The last lines are each step's key=value line. --small runs every step at small shapes, to try the
# script on a CPU first (DEVICE=cpu). Environment: PYTHON (python3), DEVICE (cuda), OUT (the device
# tool's output folder, else ./gpu-session-out), SITE (/tmp/ctexp-site).
set -uo pipefail
WHEELS=${1:?usage: bench/gpu_session.sh WHEEL_DIR [--small] [--parts step,study]}
shift
SMALL=0
PARTS=step,study
while [ $# -gt 0 ]; do
  case "$1" in
    --small) SMALL=1 ;;
    --parts) PARTS=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$ROOT/gpu-session-out}
SITE=${SITE:-/tmp/ctexp-site}
mkdir -p "$OUT"
cd "$ROOT" || exit 1
export PYTHONUNBUFFERED=1

"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
  || { echo "installing the wheels from $WHEELS failed" >&2; exit 1; }
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
  nvidia-smi -L 2>/dev/null || true
  echo "load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cpus"
} | tee "$OUT/machine.log"
"$PYTHON" -c "import ctexp.cli, mlflow, optuna, sqlalchemy, alembic, pydantic" || { echo "ctexp does not import" >&2; exit 1; }

if [ "$SMALL" = 1 ]; then
  SHAPE=(--hidden 128 --vocab 2000 --layers 4)
  STUDY=(--small --problems 40 --epochs 2 --sweep --sweep-trials 2 --sweep-epochs 1)
else
  SHAPE=()
  STUDY=(--sweep --sweep-trials 4 --sweep-epochs 2)
fi

step() {  # NAME SECONDS COMMAND...: run, log, keep going
  local name=$1 seconds=$2
  shift 2
  echo "== $name: $*"
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

if [[ ",$PARTS," == *",step,"* ]]; then
  step equivalence 240 "$PYTHON" bench/step_equivalence.py --device "$DEVICE" "${SHAPE[@]}"
  step throughput-32 300 "$PYTHON" bench/train_throughput.py --device "$DEVICE" --batch-size 32 "${SHAPE[@]}"
  step throughput-32-dense 300 "$PYTHON" bench/train_throughput.py --device "$DEVICE" --batch-size 32 \
    --update dense --graph off --reference-steps 2 "${SHAPE[@]}"
  step throughput-1024 300 "$PYTHON" bench/train_throughput.py --device "$DEVICE" --batch-size 1024 \
    --reference-steps 2 "${SHAPE[@]}"
  step full 400 "$PYTHON" bench/train_throughput.py --device "$DEVICE" --batch-size 32 --full --reference-steps 2 \
    "${SHAPE[@]}"
fi
if [[ ",$PARTS," == *",study,"* ]]; then
  [ "$SMALL" = 1 ] && STUDY+=(--device cpu) || STUDY+=(--device "$DEVICE")
  step seed-scale 600 "$PYTHON" bench/seed_scale.py "${STUDY[@]}"
fi

echo "== summary"
for log in "$OUT"/*.log; do
  [ "$(basename "$log")" = machine.log ] && continue
  echo "$(basename "$log" .log): $(grep -E '^[A-Za-z0-9_]+=|^step_equivalence |^full: |^sweep ' "$log" | tr '\n' ' ')"
done | tee "$OUT/summary.txt"
