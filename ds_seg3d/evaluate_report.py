"""What ``ds-seg3d evaluate`` writes beside its per-case CSV: a per-label summary and a Bland-Altman plot.

For ``--out FILE.csv`` the summary goes to ``FILE.summary.csv`` (``SUMMARY_FIELDS``) and the plot to
``FILE.bland_altman.png``. Every file is first written under a ``.tmp-`` name and renamed only once all
of them are complete, so a failure leaves no half-written output and no mix of old and new files.
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

SUMMARY_FIELDS = ["label", "n_cases", "dice_mean", "dice_median", "hd95_mm_mean", "hd95_mm_median",
                  "hd95_inf_cases", "abs_volume_error_pct_mean", "abs_volume_error_pct_median",
                  "share_under_5pct_volume_error"]


def summary_path(out: Path) -> Path:
    return out.with_name(out.stem + ".summary.csv")


def plot_path(out: Path) -> Path:
    return out.with_name(out.stem + ".bland_altman.png")


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and median of the finite values; nan when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.median(finite))


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One row per label, in the order labels first appear.

    HD95 statistics skip the ``inf`` of cases where exactly one side is empty (counted in
    ``hd95_inf_cases`` instead), since one such case would make the mean ``inf``. Volume-error
    statistics skip the ``nan`` of cases with an empty truth; those cases still count in the
    denominator of ``share_under_5pct_volume_error``, which is the share of all ``n_cases``.
    """
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        hd = [float(r["hd95_mm"]) for r in mine]
        err = [abs(float(r["volume_error_pct"])) for r in mine]
        d_mean, d_median = _stats([float(r["dice"]) for r in mine])
        h_mean, h_median = _stats(hd)
        e_mean, e_median = _stats(err)
        out.append({"label": label, "n_cases": len(mine),
                    "dice_mean": round(d_mean, 5), "dice_median": round(d_median, 5),
                    "hd95_mm_mean": round(h_mean, 3), "hd95_mm_median": round(h_median, 3),
                    "hd95_inf_cases": sum(math.isinf(h) for h in hd),
                    "abs_volume_error_pct_mean": round(e_mean, 3),
                    "abs_volume_error_pct_median": round(e_median, 3),
                    "share_under_5pct_volume_error": round(sum(e < 5.0 for e in err) / len(mine), 4)})
    return out


def format_cases(rows: Sequence[dict]) -> str:
    lines = [f"{'case':<16}{'label':<12}{'Dice':>8}{'HD95 mm':>9}{'pred mL':>10}{'true mL':>10}{'error %':>9}"]
    lines += [f"{r['case']:<16}{r['label']:<12}{r['dice']:>8.3f}{r['hd95_mm']:>9.2f}{r['volume_pred_ml']:>10.1f}"
              f"{r['volume_true_ml']:>10.1f}{r['volume_error_pct']:>9.2f}" for r in rows]
    return "\n".join(lines)


def format_summary(summary: Sequence[dict]) -> str:
    lines = [f"{'label':<12}{'n':>4}{'Dice mean':>11}{'median':>8}{'HD95 mean':>11}{'median':>8}{'inf':>5}"
             f"{'|vol err| mean %':>18}{'median':>8}{'<5%':>7}"]
    lines += [f"{s['label']:<12}{s['n_cases']:>4}{s['dice_mean']:>11.3f}{s['dice_median']:>8.3f}"
              f"{s['hd95_mm_mean']:>11.2f}{s['hd95_mm_median']:>8.2f}{s['hd95_inf_cases']:>5}"
              f"{s['abs_volume_error_pct_mean']:>18.2f}{s['abs_volume_error_pct_median']:>8.2f}"
              f"{s['share_under_5pct_volume_error']:>7.0%}" for s in summary]
    return "\n".join(lines)


def csv_writer(fields: Sequence[str], rows: Sequence[dict]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(fields))
            w.writeheader()
            w.writerows(rows)
    return write


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


def write_atomically(outputs: dict[Path, Callable[[Path], None]]) -> None:
    """Write every output under a temp name, then rename them all; on any failure remove the temps."""
    temps: dict[Path, Path] = {}
    try:
        for path, write in outputs.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temps[path] = path.with_name(".tmp-" + path.name)
            write(temps[path])
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
