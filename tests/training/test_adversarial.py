"""Adversarial training: the discriminator as its own DeepSpeed engine beside the pipelined segmenter.

Real ranks under the deepspeed launcher: 2 stages x 1 and 2 stages x 2 data-parallel replicas. Both
engines' losses move, discriminator replicas stay identical, the adversarial term alone moves the
first stage (its gradient crosses the pipe) while leaving the discriminator untouched, and a resumed
run continues both engines exactly as the uninterrupted run did.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ds_seg3d import checkpoint as ckpt
from ds_seg3d.training.adversarial import AdversarialLoss, frozen
from ds_seg3d.training.run_log import read_metrics
from tests.launch import run_deepspeed
from tests.training.test_train import EXPERIMENT, _ds_config

pytestmark = pytest.mark.multirank

STEPS, MIDDLE, PATCH = 6, 3, "32,32,16"


def _args(shards: Path, run: Path, tmp: Path, stages_dp: tuple[int, int]) -> list[str]:
    (tmp / "exp.toml").write_text(EXPERIMENT + "\n[adversarial]\nwarmup_steps = 2\nweight = 0.5\nwidth = 4\ndepth = 2\n")
    return ["--data", str(shards), "--out", str(run), "--config", str(tmp / "exp.toml"),
            "--deepspeed_config", str(_ds_config(tmp)), "--steps", str(STEPS), "--adversarial",
            "--set", "train.checkpoint_every=3", "--set", "train.val_every=0"]


def _train_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if r["kind"] == "train"}


@pytest.mark.parametrize("dp", [1, 2])
def test_both_engines_train_and_stay_apart(kidney_shards: Path, tmp_path: Path, dp: int) -> None:
    run = tmp_path / "run"
    ranks = 2 * dp
    # with one replica, the discriminator also takes the R1 penalty and label smoothing: the penalty's
    # gradient of a gradient must pass DeepSpeed's hooks on the engine's outputs
    terms = [] if dp == 2 else ["--set", "adversarial.gradient_penalty=1.0", "--set", "adversarial.label_smoothing=0.1"]
    run_deepspeed("adversarial_check.py", [*_args(kidney_shards, run, tmp_path, (2, dp)), *terms,
                                           "--check-out", str(tmp_path / "check"), "--check-patch", PATCH],
                  num_ranks=ranks, timeout=900)
    records = _train_records(run)
    assert sorted(records) == list(range(1, STEPS + 1))
    assert len({round(r["loss"], 6) for r in records.values()}) > 1
    assert len({round(r["d_loss"], 6) for r in records.values()}) > 1
    assert all(r["adv_term"] == 0.0 for s, r in records.items() if s <= 2)  # warm-up: segmentation only
    assert all(r["adv_term"] > 0.0 for s, r in records.items() if s > 2)
    assert all(0.0 <= r["d_acc_real"] <= 1.0 and 0.0 <= r["d_acc_fake"] <= 1.0 for r in records.values())

    checks = [json.loads((tmp_path / "check" / f"rank{r}.json").read_text()) for r in range(ranks)]
    last = [c for c in checks if c["last"]]
    assert len(last) == dp and all("d_sum" in c for c in last)
    assert all("d_sum" not in c for c in checks if not c["last"])
    assert len({(c["d_sum"], c["d_sum_sq"], tuple(c["d_first"])) for c in last}) == 1, "replicas differ"
    assert all(c["d_unchanged"] and c["d_grad_free"] for c in last), "the segmenter's step touched D"
    assert all(c["seg_changed"] for c in checks if c["stage"] == 0), "no adversarial gradient reached stage 0"
    assert (run / ckpt.DISCRIMINATOR / f"{ckpt.step_tag(STEPS)}.pt").is_file()
    assert (run / "training_curve.png").is_file()

    if dp == 2:  # resume both engines from the middle checkpoint of a copy of this run
        resumed = tmp_path / "resumed"
        shutil.copytree(run, resumed)
        shutil.rmtree(ckpt.checkpoint_root(resumed) / ckpt.step_tag(STEPS))
        ckpt.write_latest(resumed, ckpt.step_tag(MIDDLE))
        (resumed / "metrics.jsonl").write_text("")
        args = [a if a != str(run) else str(resumed) for a in _args(kidney_shards, run, tmp_path, (2, dp))]
        run_deepspeed("ds_seg3d.train", [*args, "--resume"], num_ranks=ranks, timeout=900, module=True)
        got = _train_records(resumed)
        assert sorted(got) == list(range(MIDDLE + 1, STEPS + 1))
        for step, r in got.items():
            for key in ("loss", "d_loss", "adv_term"):
                assert r[key] == pytest.approx(records[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_frozen_discriminator_takes_no_generator_gradient() -> None:
    """In-process: the adversarial term's gradient reaches the logits, never the discriminator."""
    import torch

    from ds_seg3d.models.discriminator import Discriminator3D, DiscriminatorConfig

    torch.manual_seed(0)
    d = Discriminator3D(DiscriminatorConfig(num_classes=2, width=4, depth=2))
    loss_fn = AdversarialLoss(lambda logits, labels: logits.sum() * 0.0, num_classes=2, weight=1.0, warmup_steps=0)
    loss_fn.discriminator, loss_fn.step = d, 1
    logits = torch.randn(1, 2, 16, 16, 8, requires_grad=True)
    images = torch.randn(1, 1, 16, 16, 8)
    loss_fn(logits, (torch.zeros(1, 16, 16, 8, dtype=torch.long), images)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())
    assert all(p.requires_grad for p in d.parameters())  # restored after the frozen call
    assert len(loss_fn.take_stash()) == 1 and loss_fn.stash == []
    with frozen(d):
        assert not any(p.requires_grad for p in d.parameters())

