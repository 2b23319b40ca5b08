"""Metrics of a run: a JSON-lines file (one object per event) and the training-curve PNG drawn from it."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


class MetricsLog:
    """Appends ``{"kind": ..., "step": ..., ...}`` lines; only the logging rank creates one."""

    def __init__(self, run: str | Path):
        self.path = Path(run) / METRICS
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    path = Path(run) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curve(run: str | Path, out_name: str = "training_curve.png") -> Path | None:
    """Loss per step and validation Dice per class; later lines of a resumed run replace earlier ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run)
    train = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    val: dict[str, dict[int, float]] = {}
    for r in records:
        if r["kind"] == "val":
            for name, d in r["dice"].items():
                val.setdefault(name, {})[r["step"]] = d
    if not train:
        return None
    adversarial = {r["step"]: r for r in records if r["kind"] == "train" and "d_loss" in r}
    fig, axes = plt.subplots(1, 3 if adversarial else 2, figsize=(15 if adversarial else 10, 4))
    ax1, ax2 = axes[0], axes[1]
    steps = sorted(train)
    ax1.plot(steps, [train[s] for s in steps])
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (Dice + CE)")
    ax1.set_yscale("log")
    for name, series in val.items():
        s = sorted(series)
        ax2.plot(s, [series[k] for k in s], marker="o", label=name)
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation Dice (whole volumes)")
    ax2.set_ylim(0, 1)
    if val:
        ax2.legend()
    if adversarial:
        ax3, s = axes[2], sorted(adversarial)
        for key, label in (("d_loss", "discriminator loss"), ("adv_term", "adversarial term (generator)"),
                           ("d_acc_real", "discriminator accuracy, real"),
                           ("d_acc_fake", "discriminator accuracy, fake")):
            ax3.plot(s, [adversarial[k][key] for k in s], label=label)
        ax3.set_xlabel("step")
        ax3.set_title("adversarial training")
        ax3.legend(fontsize=8)
    fig.tight_layout()
    out = Path(run) / out_name
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
