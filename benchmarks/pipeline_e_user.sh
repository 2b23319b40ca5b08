#!/usr/bin/env bash
# 2-stage pipeline efficiency through the user's command: the same U-Net (4 levels, widths 16-128, patch
# 64 x 64 x 32, the default partition) trained with `--grad-accum 8` on 1 rank (1 stage) and on 2 ranks
# (2 stages); seconds per step from each run's metrics.jsonl (median of steps 3-12), E = t1 / (2 * t2).
# Usage: OMP_NUM_THREADS=1 bash benchmarks/pipeline_e_user.sh SHARDS [WORKDIR]   (about 2 minutes on 2 cores)
set -euo pipefail
SHARDS=${1:?usage: pipeline_e_user.sh SHARDS [WORKDIR]}
WORK=${2:-$(mktemp -d)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK"
cat > "$WORK/exp.toml" <<'TOML'
[data]
patch = [64, 64, 32]
[model]
name = "unet3d"
params = { levels = 4, base_width = 16, max_width = 128, convs_per_level = 2 }
[train]
val_every = 0
checkpoint_every = 1000
log_every = 1
TOML
for n in 1 2; do
  rm -rf "$WORK/r$n"
  deepspeed --num_gpus "$n" --module ds_seg3d.train --data "$SHARDS" --out "$WORK/r$n" --config "$WORK/exp.toml" \
      --stages "$n" --steps 12 --grad-accum 8 > "$WORK/r$n.log" 2>&1 || { echo "error: run on $n rank(s) failed: $WORK/r$n.log" >&2; exit 1; }
done
python - "$WORK" <<'PY'
import json, statistics, sys
work, t = sys.argv[1], {}
for n in (1, 2):
    rows = [json.loads(l) for l in open(f"{work}/r{n}/metrics.jsonl") if '"train"' in l]
    t[n] = statistics.median((b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(rows[1:], rows[2:]))
    print(f"{n} rank(s), {n} stage(s): {t[n]:.2f} s per step (median of steps 3-12)")
print(f"E = {t[1] / (2 * t[2]):.2f} (ideal at 8 micro-batches: {8 / 9:.2f})")
PY
