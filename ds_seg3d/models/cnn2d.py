"""A slice-wise 2D U-Net baseline that runs wherever the 3D networks run.

It answers "does the third dimension help?" with everything else held equal: the same shards,
patches, loss, training loop, pipeline stages, sliding-window prediction and metrics. So it keeps
the 3D U-Net's shape as a flat list of layers whose skips ride along in a tuple
``(skip_0, ..., skip_k, current)`` (see ``ds_seg3d.models.unet3d``), and every tensor between layers
stays 5D ``(B, C, X, Y, Z)``. Inside a layer, Z is folded into the batch, ``(B, C, X, Y, Z) ->
(B*Z, C, X, Y)``, the 2D convolutions and per-slice InstanceNorm run on the axial slices, and the
result is unfolded. No operation mixes slices, so a ``(X, Y, Z)`` patch is a batch of Z independent
2D samples and a 3D sliding window predicts exactly slice by slice. Only X and Y are downsampled.

Layers fold once on entry and unfold once on exit rather than per conv block: each fold or unfold
may copy, and activations are what limits the patch. The unfolded output is made contiguous
because pipeline stages send it as a plain buffer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ds_seg3d.models.blocks import NEGATIVE_SLOPE
from ds_seg3d.models.layers import Activation, LayerDef, as_tuple, is_positive_int
from ds_seg3d.models.unet3d import Axes, UNetShape, build_unet_layers, split_aux


@dataclass
class CNN2DConfig(UNetShape):
    """Shape of the 2D U-Net: the fields of the 3D one (``UNetShape``), wider by default; strides and
    kernels keep Z at 1 (slices never mix), so Z is free and X, Y follow the strides."""

    POOLED_AXES = (True, True, False)

    base_width: int = 28
    """Channels at full resolution; doubled at every level below. About sqrt(3) times the 3D
    U-Net's, since a 3x3 kernel has a third of the weights of a 3x3x3 one."""
    max_width: int = 448
    """Cap on the channels of the coarse levels."""


def to_slices(x: Tensor) -> Tensor:
    """``(B, C, X, Y, Z) -> (B*Z, C, X, Y)``: every axial slice becomes its own sample.

    A view (no copy) when B == 1, the usual 3D micro-batch.
    """
    if x.dim() != 5:
        raise ValueError(f"expected a (B, C, X, Y, Z) tensor, got shape {tuple(x.shape)}")
    b, c, nx, ny, nz = x.shape
    return x.permute(0, 4, 1, 2, 3).reshape(b * nz, c, nx, ny)


def from_slices(y: Tensor, depth: int) -> Tensor:
    """``(B*Z, C, X, Y) -> (B, C, X, Y, Z)``, contiguous: the inverse of :func:`to_slices`."""
    bz, c, nx, ny = y.shape
    return y.reshape(bz // depth, depth, c, nx, ny).permute(0, 2, 3, 4, 1).contiguous()


def _in_plane(value: int | Axes) -> tuple[int, int]:
    """(X, Y) of a per-axis size (its Z is 1 on slices), or one int for both."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class ConvNormAct2d(nn.Sequential):
    """Conv2d (no bias: the norm cancels it) + InstanceNorm2d(affine) + in-place LeakyReLU(0.01)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int | Axes = 1, kernel: int | Axes = 3) -> None:
        kernel = _in_plane(kernel)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, stride=_in_plane(stride),
                      padding=tuple(k // 2 for k in kernel), bias=False),
            nn.InstanceNorm2d(out_channels, affine=True),
            nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
        )


class ConvStack2d(nn.Sequential):
    """``num_convs`` ConvNormAct2d blocks; the first may be strided (downsampling X and Y)."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, first_stride: int | Axes = 1,
                 kernel: int | Axes = 3) -> None:
        if num_convs < 1:
            raise ValueError(f"ConvStack2d needs at least one conv, got num_convs={num_convs}")
        blocks = [ConvNormAct2d(in_channels, out_channels, stride=first_stride, kernel=kernel)]
        blocks += [ConvNormAct2d(out_channels, out_channels, kernel=kernel) for _ in range(num_convs - 1)]
        super().__init__(*blocks)


class SliceEncoderLayer(nn.Module):
    """One encoder level on slices: (skips..., current) -> (skips..., current, new)."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, stride: int | Axes, keep_input: bool,
                 kernel: int | Axes = 3) -> None:
        super().__init__()
        self.convs = ConvStack2d(in_channels, out_channels, num_convs, first_stride=stride, kernel=kernel)
        self.keep_input = keep_input

    def forward(self, x: Activation) -> tuple[Tensor, ...]:
        *skips, current = as_tuple(x)
        kept = (current,) if self.keep_input else ()
        return (*skips, *kept, from_slices(self.convs(to_slices(current)), current.shape[-1]))


class SliceDecoderLayer(nn.Module):
    """One decoder level on slices: (skips..., skip, current, *aux) -> (skips..., fused, *aux[, logits]).

    Transposed-conv upsampling of X and Y to the skip's width, concatenation ``[up, skip]``, convs; the
    auxiliary logits of deep supervision as in the 3D ``DecoderLayer``.
    """

    def __init__(self, in_channels: int, skip_channels: int, num_convs: int, up: int | Axes = 2,
                 kernel: int | Axes = 3, num_classes: int = 0, supervised: bool = False, aux_in: int = 0) -> None:
        super().__init__()
        up = _in_plane(up)
        self.up = nn.ConvTranspose2d(in_channels, skip_channels, up, stride=up)
        self.convs = ConvStack2d(2 * skip_channels, skip_channels, num_convs, kernel=kernel)
        self.aux = nn.Conv2d(skip_channels, num_classes, 1) if supervised else None
        self.aux_in = aux_in

    def forward(self, x: Activation) -> tuple[Tensor, ...]:
        values, aux = split_aux(x, self.aux_in if self.training else 0)
        if len(values) < 2:
            raise ValueError(f"SliceDecoderLayer needs a skip and a feature map, got a tuple of {len(values)}")
        *rest, skip, current = values
        depth = current.shape[-1]
        fused = self.convs(torch.cat((self.up(to_slices(current)), to_slices(skip)), dim=1))
        if self.aux is not None and self.training:
            aux = (*aux, from_slices(self.aux(fused), depth))
        return (*rest, from_slices(fused, depth), *aux)


class SliceHeadLayer(nn.Module):
    """1x1 conv to class logits: one Tensor, or ``(logits, aux_1, ...)`` with deep supervision while training."""

    def __init__(self, in_channels: int, num_classes: int, aux_in: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 1)
        self.aux_in = aux_in

    def forward(self, x: Activation) -> Tensor | tuple[Tensor, ...]:
        values, aux = split_aux(x, self.aux_in if self.training else 0)
        if len(values) != 1:
            raise ValueError(f"SliceHeadLayer expects every skip consumed, got a tuple of {len(values)}")
        logits = from_slices(self.conv(to_slices(values[0])), values[0].shape[-1])
        return (logits, *reversed(aux)) if aux else logits


def build_cnn2d_layers(cfg: CNN2DConfig) -> list[LayerDef]:
    """``enc0 .. enc{L-1}`` (the last is the bottleneck), ``dec{L-2} .. dec0``, ``head``: the 3D U-Net's list."""
    return build_unet_layers(cfg, SliceEncoderLayer, SliceDecoderLayer, SliceHeadLayer)


def check_patch(cfg: CNN2DConfig, patch: Sequence[int]) -> None:
    """Raise ValueError unless every level divides X and Y exactly and a bottleneck slice can be normed.

    Z is never downsampled, so any Z >= 1 works (one slice is a valid 2D batch).
    """
    cfg.validate()
    patch = tuple(patch)
    if len(patch) != 3 or not all(is_positive_int(n) for n in patch):
        raise ValueError(f"patch must be three positive integers (X, Y, Z), got {patch!r}")
    patch = tuple(int(n) for n in patch)
    dx, dy, _ = cfg.divisor()
    if patch[0] % dx or patch[1] % dy:
        raise ValueError(
            f"patch {patch} must be divisible by the product of the level strides, ({dx}, {dy}) along X and Y "
            f"(levels={cfg.levels})"
        )
    if (patch[0] // dx) * (patch[1] // dy) < 2:
        raise ValueError(
            f"patch {patch} leaves slices of one pixel at the bottleneck (levels={cfg.levels}); "
            "InstanceNorm needs at least two: use a larger X, Y or fewer levels"
        )
