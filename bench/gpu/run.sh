#!/bin/bash
# The GPU run, on the device: unpack the payload, probe, then gpu.toml from scratch for as many epochs as fit.
# From the repo root, with $OUT a folder for what should come back:
#   BUDGET=540 bash bench/gpu/run.sh            # seconds for everything; EPOCHS=95 skips the probe
# Environment: PY (python3), VISAGE_WORK_DIR (/tmp/work), VISAGE_SHARED_DATA (/tmp/shared/data), EXTRA (overrides).
set -u
T0=$(date +%s)
BUDGET=${BUDGET:-540}
export VISAGE_WORK_DIR=${VISAGE_WORK_DIR:-/tmp/work} VISAGE_SHARED_DATA=${VISAGE_SHARED_DATA:-/tmp/shared/data}
export PYTHONPATH=$PWD${SHIM:+:$SHIM} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PY:-python3}
W=$VISAGE_WORK_DIR
LOG=$OUT/run.log
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, numpy, PIL; print(torch.__version__, numpy.__version__, PIL.__version__, torch.cuda.is_available())"
  nproc; } >> "$LOG" 2>&1
if ! $PY -c "import pydantic" 2> /dev/null; then  # pydantic & co. (bench/gpu/wheels.py): not in the device's image
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl \
    >> "$LOG" 2>&1 || { say "installing .gpu/wheels failed"; tail -20 "$LOG"; exit 1; }
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
STAMP=$(cat .gpu/payload/*.npy | md5sum)
if [ "$(cat "$W/payload.md5" 2>/dev/null)" != "$STAMP" ]; then  # a warm machine keeps the last call's work dir
  $PY bench/gpu/unpack.py >> "$LOG" 2>&1 || { say "unpack failed"; tail -30 "$LOG"; exit 1; }
  echo "$STAMP" > "$W/payload.md5"
fi
say "unpacked"
TRAIN="$PY -m torch.distributed.run --nproc-per-node 1 bench/gpu/launch.py train --config training/configs/gpu.toml"
E=${EPOCHS:-}
if [ -z "$E" ]; then
  P0=$(date +%s)
  rm -rf "$W/runs/probe"
  timeout 200 $TRAIN --run-dir "$W/runs/probe" --max-steps 20 ${EXTRA:-} epochs=2 val_every=1 > "$OUT/probe.log" 2>&1
  say "probe rc $? in $(( $(date +%s) - P0 )) s"
  E=$($PY bench/gpu/epochs.py "$W/runs/probe" "$OUT/probe.log" $(( $(date +%s) - P0 )) \
      $(( BUDGET - ($(date +%s) - T0) - 20 )) "$W/steps_per_epoch" ${EXTRA:-} 2>> "$LOG") \
    || { say "no estimate"; tail -40 "$OUT/probe.log"; exit 1; }
fi
say "training $E epochs"
timeout $(( BUDGET - ($(date +%s) - T0) - 8 )) $TRAIN --run-dir "$W/runs/gpu" epochs="$E" ${EXTRA:-} > "$OUT/train.log" 2>&1
say "train rc $?"
for f in metrics.jsonl training.png last.pt bundle.pt config.json; do cp "$W/runs/gpu/$f" "$OUT/" 2>/dev/null; done
tr '\r' '\n' < "$OUT/train.log" | grep -v "batch/s\|s/batch" | tail -25
say "done"
