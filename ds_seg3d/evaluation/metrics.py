"""Overlap, surface-distance and volume metrics on hard label maps (numpy, scipy, nibabel)."""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
from scipy import ndimage


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


def spacing_mm(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size along each array axis: the column norms of ``affine[:3, :3]``.

    Column norms rather than the diagonal so that oblique and permuted affines give the true step
    between neighbouring voxels; for an axis-aligned affine they equal the header zooms.
    """
    return tuple(float(s) for s in nib.affines.voxel_sizes(np.asarray(affine, dtype=np.float64)))


def _surface(mask: np.ndarray) -> np.ndarray:
    # scipy's default structuring element (face connectivity), as MONAI's get_mask_edges uses it;
    # border_value=0 makes foreground on the array border part of the surface, as in MONAI.
    return mask ^ ndimage.binary_erosion(mask)


def surface_distances_mm(pred: np.ndarray, truth: np.ndarray,
                         spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (mm): every prediction surface voxel to the nearest truth surface
    voxel, and every truth surface voxel to the nearest prediction surface voxel.

    Both masks must be non-empty. The work is done on the bounding box of the union plus one voxel,
    which leaves the surfaces and their distances unchanged but keeps large volumes cheap.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    box = tuple(slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(pred | truth))
    edge_pred, edge_truth = _surface(pred[box]), _surface(truth[box])
    to_truth = ndimage.distance_transform_edt(~edge_truth, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~edge_pred, sampling=spacing)
    return to_truth[edge_pred], to_pred[edge_truth]


def hd95_mm(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two boolean masks.

    Matches MONAI's ``compute_hausdorff_distance(percentile=95, spacing=...)``: surfaces are each mask
    XOR its binary erosion (scipy's default face-connected element); the 95th percentile (linear
    interpolation) is taken of each directed set of surface distances, and the larger of the two is
    the result -- not the percentile of the pooled distances. Distances are exact Euclidean in mm,
    with ``spacing`` the voxel size along each array axis (see ``spacing_mm``).

    Empty masks, where MONAI returns nan for both: both empty gives 0.0 (nothing to find, nothing
    found, as Dice gives 1.0); exactly one empty gives ``inf`` (no surface to measure to), so that a
    missed or hallucinated structure ranks worst rather than vanishing from a nan-skipping mean.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape or len(spacing) != pred.ndim:
        raise ValueError(f"hd95_mm: shapes {pred.shape}, {truth.shape} and spacing {tuple(spacing)} disagree")
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return 0.0
    if has_pred != has_truth:
        return math.inf
    forward, backward = surface_distances_mm(pred, truth, spacing)
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))
