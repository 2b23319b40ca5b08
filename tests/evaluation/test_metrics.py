"""Dice, HD95 and volume metrics on hard label maps (MONAI cross-checks: test_metrics_monai.py)."""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from ds_seg3d.evaluation.metrics import (
    dice,
    dice_per_class,
    hd95_mm,
    spacing_mm,
    surface_distances_mm,
    volume_error_pct,
    volumes_ml,
    voxel_volume_ml,
)

RNG = np.random.default_rng(0)
MASK = RNG.random((6, 5, 4)) > 0.5
EMPTY = np.zeros((6, 5, 4), dtype=bool)


@pytest.mark.parametrize("pred, truth, expected", [
    (EMPTY, EMPTY, 1.0),                      # nothing to find, nothing found
    (MASK, EMPTY, 0.0),                       # found something that is not there
    (EMPTY, MASK, 0.0),                       # missed everything
    (MASK, MASK, 1.0),
    (MASK, ~MASK, 0.0),
    (np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]), 0.5),  # 2 * 1 / (2 + 2)
    (np.array([1, 1, 1, 0]), np.array([1, 1, 0, 0]), 0.8),  # 2 * 2 / (3 + 2)
])
def test_dice_edge_cases(pred, truth, expected):
    assert dice(pred, truth) == pytest.approx(expected)
    assert dice(truth, pred) == pytest.approx(expected)  # symmetric


def test_dice_per_class_skips_background():
    truth = np.array([0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 2, 2, 2, 0])
    got = dice_per_class(pred, truth, {"background": 0, "a": 1, "b": 2, "absent": 5})
    assert set(got) == {"a", "b", "absent"}
    assert got["a"] == pytest.approx(2 * 1 / (1 + 2))
    assert got["b"] == pytest.approx(2 * 2 / (3 + 3))
    assert got["absent"] == 1.0


ANISO = np.array([[0.8, 0.0, 0.0, 10.0],
                  [0.0, -0.7, 0.0, -5.0],
                  [0.0, 0.0, 2.5, 3.0],
                  [0.0, 0.0, 0.0, 1.0]])
ROTATED = ANISO.copy()
ROTATED[:3, :3] = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.5, 0.5, 3.0])


@pytest.mark.parametrize("affine, voxel_mm3", [
    (np.eye(4), 1.0),
    (ANISO, 0.8 * 0.7 * 2.5),
    (ROTATED, 1.5 * 0.5 * 3.0),
])
def test_volumes_ml_are_counts_times_voxel_volume(affine, voxel_mm3):
    label = RNG.integers(0, 4, size=(7, 6, 5))
    labels = {"background": 0, "a": 1, "b": 3, "absent": 9}
    got = volumes_ml(label, affine, labels)
    assert voxel_volume_ml(affine) == pytest.approx(voxel_mm3 / 1000.0)
    assert set(got) == {"a", "b", "absent"}
    for name in ("a", "b"):
        assert got[name] == pytest.approx(np.count_nonzero(label == labels[name]) * voxel_mm3 / 1000.0)
    assert got["absent"] == 0.0


def test_volumes_ml_with_no_named_foreground_is_empty():
    assert volumes_ml(np.zeros((3, 3, 3), dtype=np.uint8), np.eye(4), {}) == {}
    assert volumes_ml(np.zeros((3, 3, 3), dtype=np.uint8), np.eye(4), {"background": 0}) == {}


@pytest.mark.parametrize("pred_ml, true_ml, expected", [
    (110.0, 100.0, 10.0),     # over-segmentation: positive
    (75.0, 100.0, -25.0),     # under-segmentation: negative
    (100.0, 100.0, 0.0),
    (0.0, 40.0, -100.0),
])
def test_volume_error_pct_sign(pred_ml, true_ml, expected):
    assert volume_error_pct(pred_ml, true_ml) == pytest.approx(expected)


@pytest.mark.parametrize("pred_ml", [0.0, 12.5])
def test_volume_error_pct_nan_for_empty_truth(pred_ml):
    assert math.isnan(volume_error_pct(pred_ml, 0.0))


@pytest.mark.parametrize("affine", [np.eye(4), ANISO, ROTATED])
def test_spacing_is_the_column_norms_as_nibabel_zooms(affine):
    img = nib.Nifti1Image(np.zeros((4, 3, 2), np.uint8), affine)
    assert spacing_mm(affine) == pytest.approx(tuple(float(z) for z in img.header.get_zooms()))
    assert np.prod(spacing_mm(affine)) / 1000.0 == pytest.approx(voxel_volume_ml(affine))


@pytest.mark.parametrize("axis, spacing", [(0, (2.0, 1.0, 1.0)), (1, (0.8, 0.7, 3.0)), (2, (0.8, 0.8, 3.0))])
@pytest.mark.parametrize("gap", [1, 3])
def test_hd95_of_a_shifted_slab_is_the_shift_in_mm(axis, spacing, gap):
    """Every voxel of a one-voxel-thick slab is surface and faces its shifted copy straight across."""
    truth = np.zeros((9, 9, 9), bool)
    index = [slice(2, 7)] * 3
    index[axis] = 2
    truth[tuple(index)] = True
    pred = np.roll(truth, gap, axis=axis)
    assert hd95_mm(pred, truth, spacing) == pytest.approx(gap * spacing[axis])
    forward, backward = surface_distances_mm(pred, truth, spacing)
    assert len(forward) == len(backward) == 25
    assert np.allclose(forward, gap * spacing[axis]) and np.allclose(backward, gap * spacing[axis])


def test_hd95_is_symmetric_scales_with_spacing_and_follows_axis_permutation():
    rng = np.random.default_rng(5)
    pred, truth = rng.random((10, 8, 6)) > 0.7, rng.random((10, 8, 6)) > 0.7
    spacing = (0.8, 1.1, 3.0)
    d = hd95_mm(pred, truth, spacing)
    assert d > 0
    assert hd95_mm(truth, pred, spacing) == pytest.approx(d)
    assert hd95_mm(pred, truth, tuple(2.5 * s for s in spacing)) == pytest.approx(2.5 * d)
    order = (2, 0, 1)
    assert hd95_mm(pred.transpose(order), truth.transpose(order), tuple(spacing[i] for i in order)) == pytest.approx(d)


def test_hd95_on_a_full_array_measures_its_border_as_surface():
    full = np.ones((6, 5, 4), bool)
    shrunk = full.copy()
    shrunk[-1] = False  # the last plane gone: the far face moves in by one voxel
    assert hd95_mm(full, full, (1.0, 1.0, 1.0)) == 0.0
    assert hd95_mm(full, shrunk, (1.5, 1.0, 1.0)) == pytest.approx(1.5)


@pytest.mark.parametrize("pred, truth, expected", [
    (EMPTY, EMPTY, 0.0),          # nothing to find, nothing found
    (MASK, EMPTY, math.inf),      # a structure that is not there
    (EMPTY, MASK, math.inf),      # a missed structure
])
def test_hd95_empty_masks(pred, truth, expected):
    assert hd95_mm(pred, truth, (1.0, 1.0, 1.0)) == expected


def test_hd95_rejects_mismatched_shapes_and_spacing():
    with pytest.raises(ValueError, match="disagree"):
        hd95_mm(MASK, MASK[:-1], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="disagree"):
        hd95_mm(MASK, MASK, (1.0, 1.0))
