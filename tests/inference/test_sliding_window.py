"""Sliding-window inference: the window plan, padding, Gaussian blending, and exact reconstruction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ds_seg3d.inference.sliding_window import (
    WindowAccumulator,
    argmax_labels,
    gaussian_weight,
    pad_to_roi,
    sliding_window_inference,
    window_batches,
    window_starts,
)

torch.set_num_threads(1)

# One axis: (size, roi, overlap, starts worked out by hand from "even spread, last window at the border")
AXIS_CASES = [
    (10, 4, 0.5, [0, 2, 4, 6]),   # step 2 -> ceil(6 / 2) + 1 = 4 windows, spacing 6 / 3
    (10, 4, 0.0, [0, 3, 6]),      # step 4 -> ceil(6 / 4) + 1 = 3 windows, spacing 6 / 2
    (5, 4, 0.5, [0, 1]),          # one voxel past the window: two windows
    (4, 4, 0.5, [0]),             # exactly one window
    (3, 4, 0.5, [0]),             # smaller than the window: padded, one window
    (9, 3, 0.0, [0, 3, 6]),       # tiles exactly
    (16, 8, 0.25, [0, 4, 8]),     # step 6 -> ceil(8 / 6) + 1 = 3 windows, spacing 4
]


@pytest.mark.parametrize("size, roi, overlap, expected", AXIS_CASES)
def test_window_starts_one_axis_by_hand(size, roi, overlap, expected):
    got = window_starts((size, roi, roi), (roi, roi, roi), overlap)
    assert sorted({s[0] for s in got}) == expected
    assert len(got) == len(expected)


GRID_CASES = [
    ((37, 20, 9), (16, 8, 4), 0.5),
    ((37, 20, 9), (16, 8, 4), 0.0),
    ((37, 20, 9), (16, 8, 4), 0.25),
    ((50, 13, 31), (12, 12, 12), 0.6),
    ((7, 64, 5), (8, 16, 6), 0.9),
    ((3, 2, 1), (4, 4, 4), 0.5),
]


@pytest.mark.parametrize("shape, roi, overlap", GRID_CASES)
def test_window_starts_cover_every_voxel_and_end_at_border(shape, roi, overlap):
    padded = [max(s, r) for s, r in zip(shape, roi)]
    starts = window_starts(shape, roi, overlap)
    covered = np.zeros(padded, dtype=np.int32)
    for st in starts:
        assert all(0 <= s and s + r <= p for s, r, p in zip(st, roi, padded))
        covered[tuple(slice(s, s + r) for s, r in zip(st, roi))] += 1
    assert (covered > 0).all()
    assert len(set(starts)) == len(starts)
    for axis in range(3):
        axis_starts = sorted({st[axis] for st in starts})
        assert axis_starts[0] == 0
        assert axis_starts[-1] + roi[axis] == padded[axis]  # the last window ends at the border
        # Count: the fewest windows whose stride is at most roi * (1 - overlap).
        step = max(1, int(roi[axis] * (1 - overlap)))
        extra = padded[axis] - roi[axis]
        assert len(axis_starts) == (1 if extra == 0 else math.ceil(extra / step) + 1)
        assert all(b - a <= step for a, b in zip(axis_starts, axis_starts[1:]))
    per_axis = [len({st[a] for st in starts}) for a in range(3)]
    assert len(starts) == per_axis[0] * per_axis[1] * per_axis[2]


def test_more_overlap_never_gives_fewer_windows():
    counts = [len(window_starts((40, 33, 27), (8, 8, 8), ov)) for ov in (0.0, 0.25, 0.5, 0.75)]
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_pad_to_roi_pads_far_ends_only():
    image = torch.arange(2 * 3 * 5 * 2, dtype=torch.float32).reshape(2, 3, 5, 2) + 1
    padded = pad_to_roi(image, (4, 4, 4))
    assert padded.shape == (2, 4, 5, 4)
    assert torch.equal(padded[:, :3, :, :2], image)
    assert padded[:, 3:].abs().sum() == 0 and padded[:, :, :, 2:].abs().sum() == 0
    assert pad_to_roi(image, (2, 2, 2)) is image


def test_window_batches_shapes_and_contents():
    image = torch.randn(1, 10, 7, 5, generator=torch.Generator().manual_seed(0))
    roi, batch = (4, 4, 4), 3
    seen = []
    for starts, windows in window_batches(image, roi, batch, 0.5):
        assert windows.shape == (len(starts), 1) + roi and 1 <= len(starts) <= batch
        for st, w in zip(starts, windows):
            assert torch.equal(w, image[:, st[0]:st[0] + 4, st[1]:st[1] + 4, st[2]:st[2] + 4])
        seen += starts
    assert seen == window_starts((10, 7, 5), roi, 0.5)


@pytest.mark.parametrize("roi", [(9, 7, 5), (8, 6, 4), (1, 5, 3)])
def test_gaussian_weight_peaks_in_the_centre(roi):
    w = gaussian_weight(roi)
    assert w.shape == roi and w.dtype == torch.float32
    assert w.max().item() == pytest.approx(1.0) and w.min().item() >= 1e-3
    centre = tuple(slice((r - 1) // 2, r // 2 + 1) for r in roi)  # 1 or 2 voxels per axis
    assert torch.allclose(w[centre], torch.ones_like(w[centre]))
    outside = torch.ones(roi, dtype=torch.bool)
    outside[centre] = False
    assert (w[outside] < 1.0).all()
    assert w[0, 0, 0] == w.min()  # the corner is the farthest point from the centre
    for axis in range(3):
        assert torch.allclose(w, w.flip(axis))


def test_window_accumulator_result_sums_to_one_over_classes():
    shape, roi, k = (11, 6, 3), (5, 5, 5), 4
    acc = WindowAccumulator(shape, k, roi)
    starts = window_starts(shape, roi, 0.5)
    logits = torch.randn(len(starts), k, *roi, generator=torch.Generator().manual_seed(1)) * 4
    acc.add(starts[:2], logits[:2])
    acc.add(starts[2:], logits[2:])
    probs = acc.result()
    assert probs.shape == (k,) + shape
    assert torch.allclose(probs.sum(0), torch.ones(shape), atol=1e-5)
    assert (probs >= 0).all()


def test_window_accumulator_single_window_is_plain_softmax():
    roi = (4, 3, 5)
    logits = torch.randn(1, 3, *roi, generator=torch.Generator().manual_seed(2))
    acc = WindowAccumulator(roi, 3, roi)
    acc.add([(0, 0, 0)], logits)
    assert torch.allclose(acc.result(), torch.softmax(logits[0], 0), atol=1e-6)


def _voxelwise_predictor(num_classes: int, calls: list):
    """Logits that depend only on each voxel's own intensity, so every window agrees on every voxel."""
    def predict(windows: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(windows.shape))
        return F.one_hot(windows[:, 0].round().long(), num_classes).movedim(-1, 1).float() * 3.0
    return predict


@pytest.mark.parametrize("shape, roi, batch, overlap", [
    ((13, 9, 7), (6, 4, 4), 2, 0.5),
    ((13, 9, 7), (6, 4, 4), 64, 0.0),
    ((3, 5, 2), (4, 4, 4), 1, 0.5),    # smaller than the window on two axes: padding
    ((4, 4, 4), (4, 4, 4), 4, 0.25),   # exactly one window
])
def test_sliding_window_reproduces_voxelwise_argmax(shape, roi, batch, overlap):
    k = 4
    truth = torch.randint(0, k, shape, generator=torch.Generator().manual_seed(3))
    image = truth[None].float()
    calls: list = []
    probs = sliding_window_inference(image, roi, batch, _voxelwise_predictor(k, calls), overlap=overlap)
    assert probs.shape == (k,) + shape
    expected = torch.softmax(F.one_hot(truth, k).movedim(-1, 0).float() * 3.0, 0)
    assert torch.allclose(probs, expected, atol=1e-5)
    labels = argmax_labels(probs)
    assert labels.dtype == np.uint8 and np.array_equal(labels, truth.numpy())
    # The predictor saw full windows in batches of at most ``batch``, each window once.
    assert all(c[1:] == (1,) + roi and c[0] <= batch for c in calls)
    assert sum(c[0] for c in calls) == len(window_starts(shape, roi, overlap))


def test_sliding_window_blends_disagreeing_windows_towards_the_centre():
    # A predictor that always votes for class 1 at the window centre and class 0 at its rim:
    # blended probabilities stay valid and every voxel gets a defined label.
    def predict(windows: torch.Tensor) -> torch.Tensor:
        w = gaussian_weight(windows.shape[2:])
        return torch.stack([1 - w, w], 0)[None].expand(windows.shape[0], -1, -1, -1, -1) * 4.0

    probs = sliding_window_inference(torch.zeros(1, 20, 9, 6), (8, 8, 6), 3, predict, overlap=0.5)
    assert probs.shape == (2, 20, 9, 6)
    assert torch.allclose(probs.sum(0), torch.ones(20, 9, 6), atol=1e-5)
    assert probs[1, 9, 4, 2] > probs[1, 0, 0, 0]  # interior beats the volume's corner


def test_mirror_combinations_are_every_subset_once():
    from ds_seg3d.inference.sliding_window import mirror_combinations

    combos = mirror_combinations((0, 1, 2))
    assert combos[0] == () and len(combos) == 8 and len(set(combos)) == 8
    assert mirror_combinations((0, 1)) == [(), (0,), (1,), (0, 1)]


def test_mirroring_makes_any_predictor_flip_equivariant():
    from ds_seg3d.inference.sliding_window import flip_windows, mirrored

    torch.manual_seed(0)
    weight = torch.randn(2, 1, 3, 3, 3)

    def lopsided(windows: torch.Tensor) -> torch.Tensor:  # a conv with an asymmetric kernel: not equivariant
        return F.conv3d(windows, weight, padding=1)

    x = torch.randn(1, 1, 8, 6, 4)
    tta = mirrored(lopsided, (0, 1, 2))
    for axes in [(0,), (1, 2), (0, 1, 2)]:
        assert not torch.allclose(lopsided(flip_windows(x, axes)), flip_windows(lopsided(x), axes), atol=1e-4)
        assert torch.allclose(tta(flip_windows(x, axes)), flip_windows(tta(x), axes), atol=1e-5)
    # the average of the 8 flipped predictions, each flipped back
    manual = sum(flip_windows(lopsided(flip_windows(x, c)), c) for c in
                 [(), (0,), (1,), (0, 1), (2,), (0, 2), (1, 2), (0, 1, 2)]) / 8
    assert torch.allclose(tta(x), manual, atol=1e-6)
    assert mirrored(lopsided, ()) is lopsided


def test_sliding_windows_with_mirroring_cover_the_volume_like_without():
    probs = sliding_window_inference(torch.randn(1, 20, 9, 6), (8, 8, 6), 2, lambda w: w.repeat(1, 2, 1, 1, 1),
                                     overlap=0.5, mirror_axes=(0, 1, 2))
    plain = sliding_window_inference(torch.randn(1, 20, 9, 6), (8, 8, 6), 2, lambda w: w.repeat(1, 2, 1, 1, 1),
                                     overlap=0.5)
    assert probs.shape == plain.shape == (2, 20, 9, 6)
    assert torch.allclose(probs.sum(0), torch.ones(20, 9, 6), atol=1e-5)
