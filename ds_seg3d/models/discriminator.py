"""A conditional 3D PatchGAN discriminator: does this segmentation belong to this image?

Adversarial training asks the segmenter for label maps a critic cannot tell from expert ones, which
penalises implausible shapes (holes, fragments, organs in the wrong place) that a voxel-wise loss
prices like any other voxel error. The critic sees the image and the segmentation together
(concatenated channels), as in pix2pix's conditional PatchGAN, so it judges the pair, not the
label map alone.

Strided 4^3 convolutions halve the grid per block (no pooling); the first block has no norm, so the
raw intensities and class probabilities reach the first nonlinearity unnormalised (pix2pix's choice),
and later blocks use InstanceNorm for the same reason as the segmenter: micro-batches of one or two
volumes make batch statistics noise. The LeakyReLU slope is pix2pix's 0.2: a critic needs gradients
for negative pre-activations more than the segmenter does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds_seg3d.models.layers import is_positive_int

NEGATIVE_SLOPE = 0.2
"""LeakyReLU slope of the critic (pix2pix / DCGAN)."""
MAX_WIDTH_FACTOR = 8
"""Channels double per block up to ``width x 8`` (pix2pix's cap): deeper blocks stay affordable in 3D."""


@dataclass
class DiscriminatorConfig:
    """Shape of the discriminator; ``validate()`` names the first bad field before anything is built."""

    in_channels: int = 1
    """Image channels (1 for CT; one per sequence for multi-sequence MRI)."""
    num_classes: int = 2
    """Segmentation channels: the segmenter's classes, background included (soft or one-hot maps)."""
    width: int = 16
    """Channels of the first block; each further block doubles them, up to ``width x 8``."""
    depth: int = 4
    """Strided conv blocks; each halves the grid, so one patch logit sees a ``2^depth``-voxel stride."""
    patch_wise: bool = True
    """True: a map of logits, one per patch (PatchGAN); False: one logit per volume."""

    def validate(self) -> "DiscriminatorConfig":
        """Raise ValueError naming the first bad field; return ``self`` when valid."""
        for field_name in ("in_channels", "width", "depth"):
            value = getattr(self, field_name)
            if not is_positive_int(value):
                raise ValueError(f"DiscriminatorConfig.{field_name} must be a positive integer, got {value!r}")
        if not is_positive_int(self.num_classes) or self.num_classes < 2:
            raise ValueError(
                f"DiscriminatorConfig.num_classes must be >= 2 (background + foreground), got {self.num_classes!r}"
            )
        if not isinstance(self.patch_wise, bool):
            raise ValueError(f"DiscriminatorConfig.patch_wise must be true or false, got {self.patch_wise!r}")
        return self

    def block_widths(self) -> list[int]:
        """Output channels of each strided block."""
        return [self.width * min(2**i, MAX_WIDTH_FACTOR) for i in range(self.depth)]

    def output_spatial(self, spatial: Sequence[int]) -> tuple[int, int, int]:
        """Size of the patch-logit map for an input of ``spatial`` voxels (each block: n -> n // 2).

        Raises ValueError for inputs too small: every block needs at least 2 voxels per axis, and
        InstanceNorm needs more than one voxel in the maps it normalises (blocks 2..depth).
        """
        self.validate()
        size = tuple(int(n) for n in spatial)
        if len(size) != 3 or not all(n >= 1 for n in size):
            raise ValueError(f"input spatial size must be three positive integers (X, Y, Z), got {tuple(spatial)!r}")
        current = size
        for block in range(self.depth):
            current = tuple(n // 2 for n in current)
            too_small = min(current) < 1 or (block > 0 and current[0] * current[1] * current[2] < 2)
            if too_small:
                raise ValueError(
                    f"input {size} is too small for depth={self.depth}: block {block} would output {current}; "
                    f"use at least {2**self.depth} voxels per axis or a smaller depth"
                )
        return current  # type: ignore[return-value]


def _block(in_channels: int, out_channels: int, norm: bool) -> nn.Sequential:
    # Kernel 4, stride 2, padding 1 maps n to n // 2 exactly and covers every voxel (pix2pix).
    conv = nn.Conv3d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=not norm)
    layers: list[nn.Module] = [conv]
    if norm:  # the norm subtracts the per-channel mean, so a conv bias before it would be dead weight
        layers.append(nn.InstanceNorm3d(out_channels, affine=True))
    layers.append(nn.LeakyReLU(NEGATIVE_SLOPE))
    return nn.Sequential(*layers)


class Discriminator3D(nn.Module):
    """Logits that an (image, segmentation) pair is real: ``(B, 1, x, y, z)`` or ``(B, 1)``.

    ``forward(image, seg)`` takes ``image`` ``(B, in_channels, X, Y, Z)`` and ``seg``
    ``(B, num_classes, X, Y, Z)``: softmax probabilities of the segmenter or one-hot labels (see
    ``one_hot_labels``). Both are moved to the discriminator's device and dtype first, which is
    differentiable: the generator's gradient flows back to ``seg`` even when the discriminator runs
    in bf16 or on another device.
    """

    def __init__(self, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        widths = cfg.block_widths()
        channels = [cfg.in_channels + cfg.num_classes, *widths]
        self.blocks = nn.Sequential(
            *[_block(channels[i], channels[i + 1], norm=i > 0) for i in range(cfg.depth)]
        )
        if cfg.patch_wise:
            # 3^3 'same' conv: one logit per position of the coarsest grid, each seeing a patch.
            self.head: nn.Module = nn.Conv3d(widths[-1], 1, kernel_size=3, padding=1)
        else:
            self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(widths[-1], 1))

    def _check_inputs(self, image: Tensor, seg: Tensor) -> None:
        cfg = self.cfg
        if image.dim() != 5 or seg.dim() != 5:
            raise ValueError(
                f"image and seg must be (B, C, X, Y, Z), got {tuple(image.shape)} and {tuple(seg.shape)}"
            )
        if image.shape[1] != cfg.in_channels:
            raise ValueError(f"image has {image.shape[1]} channels, the discriminator expects {cfg.in_channels}")
        if seg.shape[1] != cfg.num_classes:
            raise ValueError(
                f"seg has {seg.shape[1]} channels, the discriminator expects num_classes={cfg.num_classes} "
                "(probabilities or one-hot labels, not a label map)"
            )
        if image.shape[0] != seg.shape[0] or image.shape[2:] != seg.shape[2:]:
            raise ValueError(f"image {tuple(image.shape)} and seg {tuple(seg.shape)} differ in batch or grid")
        cfg.output_spatial(image.shape[2:])

    def forward(self, image: Tensor, seg: Tensor) -> Tensor:
        self._check_inputs(image, seg)
        weight = self.blocks[0][0].weight
        x = torch.cat([image, seg], dim=1).to(device=weight.device, dtype=weight.dtype)
        return self.head(self.blocks(x))


def one_hot_labels(labels: Tensor, num_classes: int) -> Tensor:
    """Integer label maps ``(B, X, Y, Z)`` -> float one-hot ``(B, num_classes, X, Y, Z)``: the 'real' input."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()
