"""How many epochs of the real run fit in the seconds left, from a probe run of 2 epochs x N steps.

The probe's first epoch pays the warm-up (CUDA context, cuDNN's algorithm search: 20 steps took 9.6 s on the
H200, against 0.7 s once warm), so the step time is epoch 2's and the warm-up is charged once.
The probe validates after both epochs; the real run validates every ``val_every`` epochs of its recipe.
Usage: epochs.py PROBE_RUN_DIR PROBE_LOG PROBE_WALL_S SECONDS_LEFT STEPS_PER_EPOCH_FILE [KEY=VALUE...]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from payload import CONFIG, answer_help

from training.config import load_config

CHECKPOINT = 0.2  # s: ~14 MB of weights and optimiser state, with margin

answer_help(__doc__)
run, log, wall, left = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
per_epoch = int(Path(sys.argv[5]).read_text())
val_every = load_config(CONFIG, [a for a in sys.argv[6:] if "=" in a]).val_every
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
first, second = records[0]["seconds"], records[1]["seconds"]
bars = re.findall(r"(\d+)/(\d+) \[[^\]]*?([\d.]+)(s/batch|batch/s)", log.read_text(errors="replace"))
steps, _, value, unit = [b for b in bars if b[0] == b[1]][-1]  # epoch 2's finished bar
t_step = float(value) if unit == "s/batch" else 1 / float(value)
t_val = max(0.5, (second - first) - int(steps) * t_step)
warm_up = max(0.0, first - (second - first))
fixed = wall - second  # start-up, loading, and the finish (cohort + calibration)
epoch = per_epoch * t_step + t_val / val_every + CHECKPOINT  # the checkpoint is written every epoch
epochs = int((left - fixed - warm_up) / (epoch * 1.08))
estimate = {"t_step": t_step, "t_val": t_val, "warm_up": warm_up, "fixed": fixed, "epoch": epoch,
            "steps_per_epoch": per_epoch, "val_every": val_every, "left": left, "epochs": epochs}
print(json.dumps(estimate), file=sys.stderr)
print(max(1, min(epochs, 200)))
