"""Preemption under the real launcher: a signal mid-run makes every rank finish its step, save and exit;
``--resume`` then continues exactly as the uninterrupted run.

2 ranks = 2 pipeline stages, a constant learning rate (so that the number of steps asked for does not
change the schedule), checkpoints only at the end. The signals go only to processes of each test's own
launch (found as descendants of its ``deepspeed`` process).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from ds_seg3d import checkpoint as ckpt
from ds_seg3d.parallel import preemption
from ds_seg3d.training.run_log import read_metrics
from tests.launch import REPO_ROOT, deepspeed_launcher, free_port, run_deepspeed
from tests.training.tiny_run import experiment

pytestmark = pytest.mark.multirank

STEPS, LONG = 24, 2000
EXPERIMENT = experiment(checkpoint_every=0)
LINE = re.compile(r"^preempted: (.+) on rank (\d+); stopped after step (\d+) and saved checkpoint (\S+) in "
                  r"[0-9.]+ s; exit status (\d+), continue with --resume$")


def _args(shards: Path, tmp: Path, run: Path, steps: int) -> list[str]:
    cfg = json.loads((REPO_ROOT / "ds_configs" / "pipeline_zero1_cpu_fp32.json").read_text())
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 2e-3, "warmup_max_lr": 2e-3,
                                                         "warmup_num_steps": 1}}
    (tmp / "ds.json").write_text(json.dumps(cfg))
    (tmp / "exp.toml").write_text(EXPERIMENT)
    return ["--data", str(shards), "--out", str(run), "--config", str(tmp / "exp.toml"),
            "--deepspeed_config", str(tmp / "ds.json"), "--steps", str(steps)]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}


def _logged(run: Path) -> int:
    """Training steps logged so far (read while the run writes)."""
    path = run / "metrics.jsonl"
    return path.read_text().count('"kind": "train"') if path.is_file() else 0


def _signalled(args: list[str], run: Path, target: str, signum: int) -> tuple[subprocess.CompletedProcess, float]:
    """Launch 2 ranks, send ``signum`` to ``target`` ("rank1", "launcher": the per-node launcher, or
    "runner": the ``deepspeed`` command) once 3 steps are logged; the finished launch (its output ends
    when the last rank has) and the seconds from the signal to that end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ds_seg3d.train",
           *args]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _logged(run) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before 3 steps"
            time.sleep(0.2)
        if target == "runner":  # the deepspeed command itself
            victim = psutil.Process(proc.pid)
        else:
            wanted = "--local_rank=1" if target == "rank1" else "deepspeed.launcher.launch"
            victim = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                          if wanted in " ".join(p.cmdline()))
        victim.send_signal(signum)
        sent = time.monotonic()
        out, _ = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, None), time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _saved_at(out: str, run: Path) -> int:
    """The step of the one 'preempted:' line, checked against ``latest`` and its manifest."""
    lines = [line for line in out.splitlines() if line.startswith("preempted:")]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    match = LINE.match(lines[0])
    assert match, lines[0]
    step = int(match[3])
    assert match[4] == ckpt.latest_tag(run) == ckpt.step_tag(step)
    assert ckpt.damage(run, ckpt.step_tag(step)) is None
    assert (ckpt.checkpoint_root(run) / ckpt.step_tag(step) / ckpt.MANIFEST).is_file()
    assert max(_losses(run)) == step  # no step after the one it stopped at
    return step


def test_a_signal_to_a_rank_saves_and_resume_continues_exactly(kidney_shards: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    run_deepspeed("ds_seg3d.train", _args(kidney_shards, tmp_path, whole, STEPS), num_ranks=2, timeout=600,
                  module=True)
    want = _losses(whole)

    run = tmp_path / "run"
    done, seconds = _signalled(_args(kidney_shards, tmp_path, run, LONG), run, "rank1", signal.SIGUSR1)
    assert done.returncode == preemption.EXIT_CODE, done.stdout[-3000:]
    assert "SIGUSR1 on rank 1" in done.stdout
    step = _saved_at(done.stdout, run)
    assert 3 <= step < STEPS, f"stopped at step {step}: the test needs it inside the short run"
    assert seconds < 30

    resumed = run_deepspeed("ds_seg3d.train", [*_args(kidney_shards, tmp_path, run, STEPS), "--resume"],
                            num_ranks=2, timeout=600, module=True)
    kept = json.loads((run / "run.json").read_text())["topology"]["boundaries"]
    assert len(kept) == 3 and f"pipeline partition: the run's own boundaries {kept} (resumed)" in resumed.stdout
    got = _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), (s, got[s], want[s])


@pytest.mark.parametrize("target, said", [("launcher", "SIGTERM on rank"),
                                          ("runner", "the end of the deepspeed launcher on rank")])
def test_sigterm_to_a_launcher_saves_on_every_rank(kidney_shards: Path, tmp_path: Path, target: str,
                                                   said: str) -> None:
    """The node's launcher forwards SIGTERM to its ranks (and ends with status 1 once they have saved); the
    deepspeed command dies at once (143) without telling the ranks, which see their launcher's parent gone."""
    run = tmp_path / "run"
    done, seconds = _signalled(_args(kidney_shards, tmp_path, run, LONG), run, target, signal.SIGTERM)
    assert done.returncode != 0, done.stdout[-3000:]
    assert said in done.stdout
    step = _saved_at(done.stdout, run)
    assert step < LONG and seconds < 30
