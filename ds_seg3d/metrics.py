"""Overlap and volume metrics on hard label maps (numpy)."""
from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (nothing to find, nothing found)."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    denom = pred.sum() + truth.sum()
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(pred, truth).sum() / denom)


def dice_per_class(pred: np.ndarray, truth: np.ndarray, labels: dict[str, int]) -> dict[str, float]:
    """Dice for every named label value except background (0)."""
    return {name: dice(pred == v, truth == v) for name, v in labels.items() if v != 0}


def voxel_volume_ml(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3])) / 1000.0)


def volumes_ml(label: np.ndarray, affine: np.ndarray, labels: dict[str, int]) -> dict[str, float]:
    """Volume in millilitres of every named non-background label value on the grid of ``affine``."""
    unit = voxel_volume_ml(affine)
    counts = np.bincount(np.asarray(label).ravel().astype(np.int64), minlength=max(labels.values(), default=0) + 1)
    return {name: float(counts[v] * unit) for name, v in labels.items() if v != 0}


def volume_error_pct(pred_ml: float, true_ml: float) -> float:
    """Signed volume error in percent of the true volume (nan when the truth is empty)."""
    if true_ml == 0:
        return float("nan")
    return 100.0 * (pred_ml - true_ml) / true_ml
