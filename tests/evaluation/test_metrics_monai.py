"""Dice and HD95 against MONAI's reference implementations (MONAI is a test-only dependency).

MONAI takes one-hot tensors shaped (batch, class, *spatial); every comparison here passes a single
foreground channel with ``include_background=True`` so that channel is scored.
"""
from __future__ import annotations

import math
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage

from ds_seg3d.evaluation.metrics import dice, hd95_mm, spacing_mm, surface_distances_mm
from ds_seg3d.paths import SAMPLE_CT

SEG = SAMPLE_CT / "example_seg.nii.gz"
KIDNEY = 2


def _channel(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))[None, None]


def monai_hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> float:
    with warnings.catch_warnings():  # MONAI warns on empty masks; the tests look at the value
        warnings.simplefilter("ignore")
        out = compute_hausdorff_distance(_channel(pred), _channel(truth), include_background=True,
                                         percentile=95, spacing=list(spacing))
    return float(out.item())


def monai_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    # ignore_empty=False: an empty truth scores 1.0 if the prediction is empty too, else 0.0
    return float(compute_dice(_channel(pred), _channel(truth), include_background=True,
                              ignore_empty=False).item())


def blob(rng: np.random.Generator, shape: tuple[int, ...], sigma: float = 1.5) -> np.ndarray:
    """Smooth random foreground with several components, some touching the array border."""
    return ndimage.gaussian_filter(rng.random(shape), sigma) > 0.5


SHAPES = [(20, 18, 12), (9, 30, 7), (32, 32, 32)]
SPACINGS = [(1.0, 1.0, 1.0), (0.8, 0.8, 3.0), (2.0, 0.5, 1.3)]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_random_blobs_match_monai(shape, spacing):
    rng = np.random.default_rng([*shape, *(round(10 * s) for s in spacing)])
    pred, truth = blob(rng, shape), blob(rng, shape)
    assert pred.any() and truth.any() and (pred != truth).any()
    assert dice(pred, truth) == pytest.approx(monai_dice(pred, truth), abs=1e-6)
    ours = hd95_mm(pred, truth, spacing)
    assert ours > 0
    assert ours == pytest.approx(monai_hd95(pred, truth, spacing), rel=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_noisy_prediction_of_a_blob_matches_monai(seed):
    """A prediction close to the truth: many zero distances, so the percentile interpolates."""
    rng = np.random.default_rng(100 + seed)
    truth = blob(rng, (24, 20, 16), sigma=2.5)
    pred = ndimage.binary_dilation(truth, iterations=int(rng.integers(1, 3))) ^ (rng.random(truth.shape) > 0.97)
    spacing = (0.8, 0.8, 3.0)
    assert dice(pred, truth) == pytest.approx(monai_dice(pred, truth), abs=1e-6)
    assert hd95_mm(pred, truth, spacing) == pytest.approx(monai_hd95(pred, truth, spacing), rel=1e-5)


def test_directed_percentiles_not_pooled():
    """A tight and a loose side: MONAI's max of the two directed percentiles, not the pooled one."""
    truth = np.zeros((40, 12, 12), bool)
    truth[2:26, 2:10, 2:10] = True
    pred = truth.copy()
    pred[34:40, 4:8, 4:8] = True  # a detached fragment: large distances from the prediction side only
    spacing = (1.0, 1.0, 1.0)
    forward, backward = surface_distances_mm(pred, truth, spacing)
    pooled = float(np.percentile(np.concatenate([forward, backward]), 95))
    expected = monai_hd95(pred, truth, spacing)
    assert expected > pooled + 1.0
    assert hd95_mm(pred, truth, spacing) == pytest.approx(expected, rel=1e-5)
    assert hd95_mm(truth, pred, spacing) == pytest.approx(expected, rel=1e-5)


def _single(shape: tuple[int, ...], at: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[at] = True
    return m


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 3.0)])
def test_single_voxels_match_monai_and_geometry(spacing):
    shape = (10, 9, 8)
    a, b = (2, 3, 1), (7, 1, 6)
    pred, truth = _single(shape, a), _single(shape, b)
    expected = float(np.linalg.norm((np.subtract(a, b)) * np.asarray(spacing)))
    assert hd95_mm(pred, truth, spacing) == pytest.approx(expected, rel=1e-6)
    assert hd95_mm(pred, truth, spacing) == pytest.approx(monai_hd95(pred, truth, spacing), rel=1e-5)
    assert dice(pred, truth) == monai_dice(pred, truth) == 0.0
    assert hd95_mm(pred, pred, spacing) == monai_hd95(pred, pred, spacing) == 0.0
    assert dice(pred, pred) == monai_dice(pred, pred) == 1.0


def test_single_voxel_against_a_blob_matches_monai():
    rng = np.random.default_rng(7)
    truth = blob(rng, (16, 16, 10), sigma=2.0)
    pred = _single(truth.shape, tuple(int(i) for i in np.argwhere(truth)[0]))
    for p, t in ((pred, truth), (truth, pred)):
        assert hd95_mm(p, t, (0.8, 0.8, 3.0)) == pytest.approx(monai_hd95(p, t, (0.8, 0.8, 3.0)), rel=1e-5)
        assert dice(p, t) == pytest.approx(monai_dice(p, t), abs=1e-6)


@pytest.mark.parametrize("which", ["empty_pred", "empty_truth", "both_empty"])
def test_empty_masks(which):
    """Dice agrees with MONAI; for HD95 MONAI gives nan, and this project a documented 0.0 or inf."""
    rng = np.random.default_rng(3)
    mask = blob(rng, (12, 10, 8))
    empty = np.zeros_like(mask)
    pred, truth = {"empty_pred": (empty, mask), "empty_truth": (mask, empty), "both_empty": (empty, empty)}[which]
    assert dice(pred, truth) == monai_dice(pred, truth)
    assert math.isnan(monai_hd95(pred, truth, (0.8, 0.8, 3.0)))
    assert hd95_mm(pred, truth, (0.8, 0.8, 3.0)) == (0.0 if which == "both_empty" else math.inf)


@pytest.mark.parametrize("shift", [(1, 0, 0), (2, -1, 1), (0, 3, -2)])
@pytest.mark.parametrize("anisotropic", [False, True])
def test_real_kidney_against_a_shifted_copy_matches_monai(shift, anisotropic):
    img = nib.load(SEG)
    truth = np.asarray(img.dataobj) == KIDNEY
    assert truth.any()
    pred = ndimage.shift(truth, shift, order=0, mode="constant", cval=False)
    spacing = (0.8, 0.8, 3.0) if anisotropic else spacing_mm(img.affine)
    assert spacing_mm(img.affine) == pytest.approx(tuple(float(z) for z in img.header.get_zooms()[:3]))
    assert dice(pred, truth) == pytest.approx(monai_dice(pred, truth), abs=1e-6)
    ours = hd95_mm(pred, truth, spacing)
    assert ours >= min(spacing)
    assert ours == pytest.approx(monai_hd95(pred, truth, spacing), rel=1e-5)
