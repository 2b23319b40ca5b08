#!/usr/bin/env bash
# The end-to-end demo on built-in synthetic data: phantoms -> shards -> the dataset's planned 3D U-Net ->
# 2-stage pipelined training under the deepspeed launcher -> prediction of the test cases -> Dice and
# volume error per case.
# Usage: scripts/demo.sh [OUT]  (run through `make demo`, which sets up .venv first)
set -euo pipefail
OUT=${1:-demo_out}
CASES=${DEMO_CASES:-16}
STEPS=${DEMO_STEPS:-500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

echo "== 1. phantoms (polycystic kidneys, $CASES cases)"
[ -f "$OUT/phantoms/dataset.json" ] || python -m data_tools phantoms "$OUT/phantoms" --task kidney --cases "$CASES" --seed 0

echo "== 2. HDF5 shards"
python -m data_tools build-shards "$OUT/phantoms" "$OUT/shards" --spacing 1.2 1.2 3.0 --seed 0
python -m data_tools inspect "$OUT/shards"

echo "== 3. planning: nnU-Net's topology from the spacing, the patch sized for 2 stages"
# On 2 CPU cores time, not memory, is the limit: 0.15 GiB per rank and widths from 8 keep a step near a
# second (the plan says so in its notes). On GPUs: --budget-gb <GPU memory> and nnU-Net's --base-width 32.
python -m ds_seg3d plan "$OUT/shards" --budget-gb 0.15 --ranks 2 --stages 2 --base-width 8

echo "== 4. training: the planned 3D U-Net, 2 pipeline stages on 2 CPU ranks (deepspeed launcher, gloo)"
rm -rf "$OUT/run"
deepspeed --num_gpus 2 --module ds_seg3d.train --data "$OUT/shards" --out "$OUT/run" \
    --config experiments/kidney_demo.toml --steps "$STEPS"

echo "== 5. prediction of the test split on the original NIfTI grids (test-time mirroring)"
TEST=$(python -c "import json,sys; m=json.load(open(sys.argv[1])); print(' '.join(m['cases'][c]['image'] for c in m['splits']['test']))" "$OUT/shards/manifest.json")
rm -rf "$OUT/pred"
python -m ds_seg3d predict --checkpoint "$OUT/run" --out "$OUT/pred" $TEST

echo "== 6. agreement with the phantom labels"
mkdir -p "$OUT/truth"
for f in $TEST; do cp "$(dirname "$f")/../labelsTr/$(basename "$f")" "$OUT/truth/"; done
python -m ds_seg3d evaluate --pred "$OUT/pred" --truth "$OUT/truth" --labels kidney=1 --out "$OUT/evaluation.csv"
echo "demo finished: $OUT (training curve: $OUT/run/training_curve.png)"
