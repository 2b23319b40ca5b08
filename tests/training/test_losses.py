"""Dice + cross-entropy loss: limits, gradients, the background rule and a hand computation."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ds_seg3d.training.losses import DiceCELoss, soft_dice_loss

torch.set_num_threads(1)


def _labels(num_classes: int, shape=(2, 6, 5, 4), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, shape, generator=g)


def _confident_logits(labels: torch.Tensor, num_classes: int, margin: float = 30.0) -> torch.Tensor:
    """Logits that put (almost) all probability on ``labels``."""
    return F.one_hot(labels, num_classes).movedim(-1, 1).float() * margin


@pytest.mark.parametrize("num_classes", [2, 4])
def test_perfect_confident_logits_give_near_zero(num_classes):
    labels = _labels(num_classes)
    loss = DiceCELoss()(_confident_logits(labels, num_classes), labels)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert 0.0 <= loss.item() < 1e-4


@pytest.mark.parametrize("num_classes", [2, 4])
def test_wrong_confident_logits_give_large_loss(num_classes):
    labels = _labels(num_classes)
    wrong = (labels + 1) % num_classes
    loss = DiceCELoss()(_confident_logits(wrong, num_classes), labels)
    # CE of a confidently wrong voxel is ~margin; every foreground Dice is ~0.
    assert loss.item() > 25.0
    dice_only = DiceCELoss(dice_weight=1.0, ce_weight=0.0)(_confident_logits(wrong, num_classes), labels)
    assert dice_only.item() == pytest.approx(1.0, abs=1e-4)


def test_weights_combine_the_two_terms():
    labels = _labels(3)
    logits = torch.randn(2, 3, 6, 5, 4, generator=torch.Generator().manual_seed(1))
    ce = F.cross_entropy(logits, labels)
    sd = soft_dice_loss(logits, labels)
    assert DiceCELoss(0.0, 1.0)(logits, labels).item() == pytest.approx(ce.item(), rel=1e-6)
    assert DiceCELoss(1.0, 0.0)(logits, labels).item() == pytest.approx(sd.item(), rel=1e-6)
    assert DiceCELoss(0.3, 2.0)(logits, labels).item() == pytest.approx(0.3 * sd.item() + 2.0 * ce.item(), rel=1e-6)


def test_gradient_flows_to_every_logit():
    labels = _labels(3)
    logits = torch.randn(2, 3, 6, 5, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    DiceCELoss()(logits, labels).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert (logits.grad.abs().sum(dim=1) > 0).all()
    # One gradient step lowers the loss.
    with torch.no_grad():
        stepped = logits - 10.0 * logits.grad
    assert DiceCELoss()(stepped, labels).item() < DiceCELoss()(logits, labels).item()


def test_bf16_logits_give_float32_loss_with_gradient():
    labels = _labels(2)
    logits = torch.randn(2, 2, 6, 5, 4, generator=torch.Generator().manual_seed(3)).bfloat16().requires_grad_()
    loss = DiceCELoss()(logits, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad is not None and logits.grad.abs().sum() > 0


def _hand_dice_per_class(logits: np.ndarray, labels: np.ndarray, smooth: float = 1e-5) -> list[float]:
    """Soft Dice per class over the whole batch, written out with loops."""
    k = logits.shape[1]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    out = []
    for c in range(k):
        inter = denom = 0.0
        for idx in np.ndindex(labels.shape):
            p = probs[(idx[0], c) + idx[1:]]
            t = 1.0 if labels[idx] == c else 0.0
            inter += p * t
            denom += p + t
        out.append((2 * inter + smooth) / (denom + smooth))
    return out


def test_soft_dice_matches_hand_computation_and_ignores_background():
    labels = torch.tensor([[[0, 1, 2], [2, 2, 0]]])  # (B=1, X=2, Y=3): 2D works too
    logits = torch.tensor([[[[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]],
                            [[0.0, 2.0, -1.0], [1.0, -2.0, 0.0]],
                            [[-1.0, 0.0, 1.5], [2.5, 0.5, -1.0]]]])
    per_class = _hand_dice_per_class(logits.numpy().astype(np.float64), labels.numpy())
    expected = 1.0 - (per_class[1] + per_class[2]) / 2
    with_background = 1.0 - sum(per_class) / 3
    got = soft_dice_loss(logits, labels).item()
    assert got == pytest.approx(expected, abs=1e-6)
    assert abs(got - with_background) > 1e-3  # the example separates the two definitions


def test_background_only_patch_predicted_as_background_costs_nothing():
    # Only the foreground classes count: a patch without foreground, confidently predicted as
    # background, has a Dice term of ~0 whatever the background overlap.
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    assert soft_dice_loss(_confident_logits(labels, 3), labels).item() < 1e-4
    # Moving background probability onto one foreground class shows up in the loss.
    fg = labels.clone()
    fg[0, 0] = 1
    assert soft_dice_loss(_confident_logits(fg, 3), labels).item() > 0.4


def test_loss_object_pickles():
    loss = pickle.loads(pickle.dumps(DiceCELoss(0.25, 0.75)))
    assert (loss.dice_weight, loss.ce_weight) == (0.25, 0.75)


def test_deep_supervision_weights_halve_and_sum_to_one():
    from ds_seg3d.training.losses import DeepSupervisionLoss

    assert DeepSupervisionLoss.weights(1) == [1.0]
    w = DeepSupervisionLoss.weights(3)
    assert abs(sum(w) - 1) < 1e-12 and w[0] == 2 * w[1] == 4 * w[2]


def test_deep_supervision_scores_each_level_against_resized_labels():
    from ds_seg3d.training.losses import DeepSupervisionLoss

    torch.manual_seed(0)
    labels = torch.zeros(2, 8, 8, 4, dtype=torch.long)
    labels[:, 2:6, 2:6, 1:3] = 1
    full, half = torch.randn(2, 2, 8, 8, 4), torch.randn(2, 2, 4, 4, 2)
    base = DiceCELoss()
    loss = DeepSupervisionLoss(base)
    coarse = labels[:, 1::2, 1::2, 1::2]  # the voxel nearest each coarse centre
    want = (2 / 3) * base(full, labels) + (1 / 3) * base(half, coarse)
    assert torch.allclose(loss((full, half), labels), want)
    assert torch.equal(loss(full, labels), base(full, labels))  # a single Tensor: the base loss alone
    # a perfect coarse output lowers the loss: the auxiliary level is scored, not ignored
    perfect = torch.stack([1 - coarse, coarse], 1).float() * 20 - 10
    assert loss((full, perfect), labels) < loss((full, half), labels)
