"""The per-label summary of ``ds-seg3d evaluate``: ``FILE.summary.csv`` beside ``--out FILE.csv``, and
the tables it prints (per case, per label)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SUMMARY_FIELDS = ["label", "n_cases", "dice_mean", "dice_median", "hd95_mm_mean", "hd95_mm_median",
                  "hd95_inf_cases", "abs_volume_error_pct_mean", "abs_volume_error_pct_median",
                  "share_under_5pct_volume_error"]


def summary_path(out: Path) -> Path:
    return out.with_name(out.stem + ".summary.csv")


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
