"""A run whose learning rate diverges stops at the step it diverged, on every rank, under the real launcher.

2 ranks = 2 pipeline stages, SGD whose learning rate climbs linearly from 3e-3 to 1e20 over 6 steps, a
checkpoint every 2 steps: the job must end with exit status 4 and one line naming the step, the rank,
its stage and the last good checkpoint, which ``latest`` still names; nothing of the diverged state
is saved, and ``predict`` can use what is left.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_seg3d import checkpoint as ckpt
from ds_seg3d.parallel import divergence
from ds_seg3d.paths import SAMPLE_CT
from ds_seg3d.training.run_log import read_metrics
from tests.launch import REPO_ROOT, run_deepspeed

pytestmark = pytest.mark.multirank

EXPERIMENT = """
[data]
patch = [32, 32, 16]
[model]
name = "unet3d"
params = { levels = 3, base_width = 4, max_width = 16, convs_per_level = 1 }
[train]
stages = 2
val_every = 0
checkpoint_every = 2
log_every = 1
"""
LINE = re.compile(r"^error: step (\d+): non-finite (loss|weights) on rank (\d+) \(stage (\d+)\); "
                  r"last good checkpoint: (\S+)$")


def test_a_diverging_run_stops_at_once_on_every_rank(kidney_shards: Path, tmp_path: Path) -> None:
    cfg = json.loads((REPO_ROOT / "ds_configs" / "pipeline_zero1_cpu_fp32_sgd.json").read_text())
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 3e-3, "warmup_max_lr": 1e20,
                                                         "warmup_num_steps": 6, "warmup_type": "linear"}}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    run = tmp_path / "run"
    proc = run_deepspeed("ds_seg3d.train", ["--data", kidney_shards, "--out", run, "--config", tmp_path / "exp.toml",
                                            "--deepspeed_config", tmp_path / "ds.json", "--steps", "20"],
                         num_ranks=2, timeout=600, check=False, module=True)
    assert proc.returncode == divergence.EXIT_CODE, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    match = LINE.match(errors[0])
    assert match, errors[0]
    step, rank, stage, last_good = int(match[1]), int(match[3]), int(match[4]), match[5]
    assert 1 < step < 20 and stage == rank  # 2 ranks, 2 stages: rank r holds stage r

    # Stopped at that step: no later step logged, no checkpoint of it or after it, ``latest`` unchanged.
    assert max(r["step"] for r in read_metrics(run) if r["kind"] == "train") < step
    saved = 2 * ((step - 1) // 2)  # the last checkpoint step before the diverged one
    assert saved > 0, f"diverged at step {step}, before the first checkpoint: the test needs one"
    assert last_good == ckpt.latest_tag(run) == ckpt.step_tag(saved)
    assert sorted(p.name for p in ckpt.checkpoint_root(run).glob("step*"))[-1] == last_good
    for layer_file in (ckpt.checkpoint_root(run) / last_good).glob("layer_*-model_states.pt"):
        state = torch.load(layer_file, map_location="cpu", weights_only=True)
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()), layer_file

    # The last good checkpoint still predicts.
    out = tmp_path / "pred"
    pred = subprocess.run([sys.executable, "-m", "ds_seg3d", "predict", "--checkpoint", str(run), "--out", str(out),
                           str(SAMPLE_CT / "example_ct_sm.nii.gz")], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert pred.returncode == 0, pred.stderr[-2000:]
    assert len(list(out.glob("*.nii.gz"))) == 1
