"""Segmentation loss: soft Dice over the foreground classes plus cross-entropy (nnU-Net's default)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean foreground Dice, computed over the whole batch ("batch Dice") from softmax probabilities.

    Batch Dice keeps the term defined on patches without foreground, which are common with random crops.
    """
    num_classes = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(labels.long(), num_classes).movedim(-1, 1).to(probs.dtype)
    dims = (0,) + tuple(range(2, logits.ndim))
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return 1.0 - dice[1:].mean()


class DiceCELoss:
    """``loss(logits, labels)``: weighted sum of soft Dice and cross-entropy; picklable, no parameters."""

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0):
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits.float(), labels.long())
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, labels)
        return loss
