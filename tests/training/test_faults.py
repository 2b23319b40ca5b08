"""Faults during training under the real launcher (2 ranks = 2 pipeline stages): each ends the job with
one line per rank, a non-zero status and a run folder whose ``latest`` names an intact checkpoint.

- a learning rate that diverges (SGD climbing linearly from 3e-3 to 1e20 over 6 steps, a checkpoint every
  2 steps): exit status 4 and one line naming the step, the rank, its stage and the last good checkpoint,
  which ``latest`` still names; nothing of the diverged state is saved, and ``predict`` can use what is
  left;
- a shard truncated after the build: exit status 2, one line naming the shard and the case from the rank
  that read it, one line from its peer, no traceback and no hang;
- a full or read-only file system under the run folder while saving: exit status 2 and one line naming
  the path; ``latest`` still names the previous complete tag and the half-written one is gone.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_seg3d import checkpoint as ckpt
from ds_seg3d.parallel import divergence
from ds_seg3d.paths import SAMPLE_CT
from ds_seg3d.training.run_log import read_metrics
from tests.launch import REPO_ROOT, deepspeed_launcher, free_port, run_deepspeed
from tests.training.tiny_run import experiment

pytestmark = pytest.mark.multirank

EXPERIMENT = experiment(checkpoint_every=2)
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


def test_a_shard_truncated_after_the_build_is_named_not_hung(kidney_shards: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(kidney_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    case = manifest["splits"]["train"][0]
    shard = shards / manifest["cases"][case]["shard"]
    os.truncate(shard, shard.stat().st_size // 2)
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    proc = run_deepspeed("ds_seg3d.train", ["--data", shards, "--out", tmp_path / "run", "--config", tmp_path / "exp.toml",
                                            "--steps", "20"], num_ranks=2, timeout=180, check=False, module=True)
    assert proc.returncode == 2, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    named = [e for e in errors if str(shard) in e]
    assert len(named) == 1 and "case '" in named[0] and "truncated" in named[0], errors
    assert len(errors) == 2 and "a peer rank ended" in next(e for e in errors if e not in named), errors


@pytest.mark.parametrize("fault, said", [("full", "bytes free there"), ("read-only", "Read-only file system")])
def test_a_checkpoint_that_cannot_be_written_stops_every_rank(kidney_shards: Path, tmp_path: Path, fault: str,
                                                              said: str) -> None:
    """The run folder on a 300 KiB tmpfs (room for one checkpoint of this model, not two), or its
    checkpoints folder mounted read-only, in a mount namespace of the launch's own."""
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    disk = tmp_path / "disk"
    disk.mkdir()
    run = disk / "run"
    if fault == "full":
        mount = f"mount -t tmpfs -o size=300k tmpfs {disk}"
    else:
        ro = run / "checkpoints"
        mount = (f"mount -t tmpfs tmpfs {disk} && mkdir -p {ro} && mount --bind {ro} {ro} && "
                 f"mount -o remount,bind,ro {ro}")
    train = [deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ds_seg3d.train",
             "--data", str(kidney_shards), "--out", str(run), "--config", str(tmp_path / "exp.toml"), "--steps", "12"]
    script = f"{mount} && {shlex.join(train)}; status=$?; " \
             f"cp -r {run} {tmp_path / 'after'} 2>/dev/null; exit $status"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    first = 4 if fault == "full" else 2  # the tmpfs holds the step-2 checkpoint, not the step-4 one
    match = re.match(rf"^error: step {first}: checkpoint {ckpt.step_tag(first)} not saved: (\S+): .*; "
                     r"latest checkpoint: (\S+)$", errors[0])
    assert match and said in errors[0], errors[0]
    assert match[1].startswith(str(run / "checkpoints")), errors[0]
    after = tmp_path / "after"  # what the run folder held when the job ended (the tmpfs is gone with it)
    if fault == "full":
        assert match[2] == ckpt.latest_tag(after) == ckpt.step_tag(2)
        assert ckpt.tags(after) == [ckpt.step_tag(2)]  # the half-written tag was removed
        assert ckpt.damage(after, ckpt.step_tag(2)) is None
    else:
        assert match[2] == "none" and ckpt.latest_tag(after) is None and ckpt.tags(after) == []
    assert max(r["step"] for r in read_metrics(after) if r["kind"] == "train") == first
