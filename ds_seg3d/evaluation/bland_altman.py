"""The Bland-Altman plot of ``ds-seg3d evaluate`` (``FILE.bland_altman.png`` beside ``--out FILE.csv``):
agreement of predicted and true volumes, also drawn for every arm of an experiment."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np


def plot_path(out: Path) -> Path:
    return out.with_name(out.stem + ".bland_altman.png")


def bland_altman_writer(rows: Sequence[dict]) -> Callable[[Path], None]:
    """Agreement of predicted and true volumes, one panel per label.

    x is the mean of the two volumes, y their difference (pred - true) in mL; the solid line is the
    bias (mean difference), the dashed lines the 95% limits of agreement (bias +- 1.96 SD, drawn
    from two cases on).
    """
    def write(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = list(dict.fromkeys(r["label"] for r in rows))
        cols = min(len(labels), 3)
        nrows = math.ceil(len(labels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 4.0 * nrows), squeeze=False)
        for ax in axes.flat[len(labels):]:
            ax.set_visible(False)
        for ax, label in zip(axes.flat, labels):
            pred = np.array([float(r["volume_pred_ml"]) for r in rows if r["label"] == label])
            true = np.array([float(r["volume_true_ml"]) for r in rows if r["label"] == label])
            mean, diff = (pred + true) / 2.0, pred - true
            ax.scatter(mean, diff, s=18)
            bias = float(diff.mean())
            ax.axhline(bias, color="C1", label=f"bias {bias:+.2f} mL")
            if len(diff) > 1:
                sd = float(diff.std(ddof=1))
                for sign in (-1, 1):
                    ax.axhline(bias + sign * 1.96 * sd, color="C1", linestyle="--",
                               label="bias \u00b1 1.96 SD" if sign > 0 else None)
            ax.set_title(f"{label} (n={len(diff)})")
            ax.set_xlabel("mean of predicted and true volume (mL)")
            ax.set_ylabel("predicted - true volume (mL)")
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)
    return write
