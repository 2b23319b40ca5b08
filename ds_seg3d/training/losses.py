"""Segmentation loss: soft Dice over the foreground classes plus cross-entropy (nnU-Net's default), and
nnU-Net's deep supervision over the decoder levels' logits."""
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


class DeepSupervisionLoss:
    """``loss(outputs, labels)`` for a network that returns ``(logits, aux_1, aux_2, ...)``, finest first.

    Each output is scored by ``base`` against the labels resized to its grid (nearest voxel centre),
    weighted 1/2^i and normalised to sum to 1: nnU-Net's deep supervision, whose coarsest decoder level
    has weight 0 and is therefore never computed here (``UNetShape.supervised_levels``). A single Tensor
    (no deep supervision, or eval mode) is scored by ``base`` alone.
    """

    def __init__(self, base):
        self.base = base

    @staticmethod
    def weights(count: int) -> list[float]:
        raw = [1.0 / 2**i for i in range(count)]
        return [w / sum(raw) for w in raw]

    def __call__(self, outputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.base(outputs, labels)
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, logits in zip(self.weights(len(outputs)), outputs):
            target = labels
            if tuple(logits.shape[2:]) != tuple(labels.shape[1:]):
                target = F.interpolate(labels[:, None].float(), size=logits.shape[2:], mode="nearest-exact")[:, 0]
            total = total + weight * self.base(logits, target.long())
        return total


def main_logits(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The full-resolution logits of a network's output, with or without deep supervision."""
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]
