#!/usr/bin/env bash
# The GPU checks, in one run on one GPU (about 9 minutes on an H100):
#   1. memory: for the 25-layer CNN and the U-Net in bf16, the largest cube that trains with and without
#      activation checkpointing, the planner's prediction beside each measured peak
#      (benchmarks/gpu_memory_check.py);
#   2. the kidney 3D-vs-2D comparison with both networks planned for one GPU as nnU-Net plans them (8 GB,
#      base width 32): Dice, volume error and seconds per step of both arms
#      (python -m ds_seg3d experiment kidney-3d-vs-2d).
# Usage: benchmarks/gpu_checks.sh OUT [STEPS]   (OUT receives results.tgz and the two summaries;
#        SKIP_MEMORY=1 runs the experiment alone)
# Needs torch with CUDA, deepspeed, nibabel, h5py, hdf5plugin, scipy, matplotlib, tqdm importable, the
# `deepspeed` launcher on PATH, and the repository on PYTHONPATH.
set -uo pipefail
OUT=${1:?usage: gpu_checks.sh OUT [STEPS]}
STEPS=${2:-500}
WORK=${WORK:-/tmp/gpu_checks}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$WORK/gpu.txt"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$WORK/gpu.txt"

if [ -z "${SKIP_MEMORY:-}" ]; then
    echo "== 1. memory: largest trainable cube, predicted vs measured"
    start=$(date +%s)
    timeout 230 python3 benchmarks/gpu_memory_check.py --out "$WORK/memory" --timeout 80 --budget-s 170 \
        2>&1 | tee "$WORK/memory.log" | grep -v "^\[20"
    echo "memory check: $(( $(date +%s) - start )) s"
fi

echo "== 2. kidney 3D vs 2D planned for one 8 GB GPU at nnU-Net's widths, bf16, $STEPS steps"
start=$(date +%s)
timeout "${EXP_TIMEOUT:-310}" python3 -m ds_seg3d experiment kidney-3d-vs-2d --out "$WORK/kidney" --cases 20 --steps "$STEPS" \
    --ranks 1 --stages 1 --seed 0 --deepspeed-config ds_configs/pipeline_zero1_gpu_bf16.json \
    --plan-budget-gb 8 --plan-base-width 32 --set train.checkpoint_every=0 \
    --write-md "$WORK/EXPERIMENTS_gpu.md" 2>&1 | tee "$WORK/kidney.log" | grep -v "^\[20"
echo "kidney experiment: $(( $(date +%s) - start )) s"

cp "$WORK/memory/results.json" "$OUT/memory_results.json" 2>/dev/null
cp "$WORK/EXPERIMENTS_gpu.md" "$OUT/" 2>/dev/null
tar czf "$OUT/results.tgz" -C "$WORK" --exclude='*.pt' --exclude='*.h5' --exclude='*.nii.gz' \
    --exclude='checkpoints' --exclude='*.safetensors' . 2>/dev/null
ls -la "$OUT"
