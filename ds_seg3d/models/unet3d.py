"""An nnU-Net-like 3D U-Net written as a flat list of layers whose skips ride along in a tuple.

The tuple that travels between layers is ``(skip_0, ..., skip_k, current)``: the last element is the
feature map being processed, the others wait for their decoder level. ``enc0`` turns the image into
``(f0,)``; every further encoder layer keeps the current map as a skip and appends its own output, so
the tuple grows by one; every decoder layer pops the current map and the last skip, fuses them and
pushes the result, so it shrinks by one; ``head`` turns the last map into logits. A layer that does
not use a skip passes it on untouched, which is what lets a pipeline cut the list anywhere: a skip
just crosses stage boundaries as one more float tensor. No tensor appears twice in a tuple, and the
image itself never travels past ``enc0`` (only graph-produced float tensors cross stages).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ds_seg3d.models.blocks import ConvStack3d
from ds_seg3d.models.layers import Activation, LayerDef, as_tuple, is_positive_int


@dataclass
class UNetShape:
    """The shape of a U-Net (3D here, slice-wise 2D in ``cnn2d``); ``validate()`` explains what is wrong
    before anything is built."""

    in_channels: int = 1
    """Image channels (1 for CT; one per sequence for multi-sequence MRI)."""
    num_classes: int = 2
    """Output channels: background plus foreground labels (logits for softmax)."""
    levels: int = 4
    """Resolution levels including the bottleneck; patches must be divisible by 2**(levels - 1)."""
    base_width: int = 16
    """Channels at full resolution; doubled at every level below."""
    max_width: int = 256
    """Cap on the channels of the coarse levels (nnU-Net caps at 320 for 3D)."""
    convs_per_level: int = 2
    """ConvNormAct blocks per encoder and per decoder level (the first encoder one is strided)."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        kind = type(self).__name__
        for field_name in ("in_channels", "levels", "base_width", "max_width", "convs_per_level"):
            value = getattr(self, field_name)
            if not is_positive_int(value):
                raise ValueError(f"{kind}.{field_name} must be a positive integer, got {value!r}")
        if not is_positive_int(self.num_classes) or self.num_classes < 2:
            raise ValueError(
                f"{kind}.num_classes must be >= 2 (background + foreground), got {self.num_classes!r}"
            )
        if self.max_width < self.base_width:
            raise ValueError(f"{kind}.max_width ({self.max_width}) must be >= base_width ({self.base_width})")

    def widths(self) -> list[int]:
        """Channels per level, finest first."""
        return [min(self.base_width * 2**level, self.max_width) for level in range(self.levels)]


@dataclass
class UNet3DConfig(UNetShape):
    """Shape of the 3D U-Net (the fields and defaults of ``UNetShape``)."""


class EncoderLayer(nn.Module):
    """One encoder level: (skips..., current) -> (skips..., current, new); ``enc0`` replaces the image."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, stride: int, keep_input: bool) -> None:
        super().__init__()
        self.convs = ConvStack3d(in_channels, out_channels, num_convs, first_stride=stride)
        self.keep_input = keep_input

    def forward(self, x: Activation) -> tuple[Tensor, ...]:
        *skips, current = as_tuple(x)
        kept = (current,) if self.keep_input else ()
        return (*skips, *kept, self.convs(current))


class DecoderLayer(nn.Module):
    """One decoder level: (skips..., skip, current) -> (skips..., fused), nnU-Net style.

    Transposed-conv upsampling to the skip's width, channel concatenation ``[up, skip]``, then convs.
    """

    def __init__(self, in_channels: int, skip_channels: int, num_convs: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, skip_channels, 2, stride=2)
        self.convs = ConvStack3d(2 * skip_channels, skip_channels, num_convs)

    def forward(self, x: Activation) -> tuple[Tensor, ...]:
        values = as_tuple(x)
        if len(values) < 2:
            raise ValueError(f"DecoderLayer needs a skip and a feature map, got a tuple of {len(values)}")
        *rest, skip, current = values
        fused = self.convs(torch.cat((self.up(current), skip), dim=1))
        return (*rest, fused)


class HeadLayer(nn.Module):
    """1x1x1 conv to class logits; the pipeline's last layer must return one Tensor, not a tuple."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, num_classes, 1)

    def forward(self, x: Activation) -> Tensor:
        values = as_tuple(x)
        if len(values) != 1:
            raise ValueError(f"HeadLayer expects every skip consumed, got a tuple of {len(values)}")
        return self.conv(values[0])


def build_unet3d_layers(cfg: UNet3DConfig) -> list[LayerDef]:
    """``enc0 .. enc{L-1}`` (the last is the bottleneck), ``dec{L-2} .. dec0``, ``head``."""
    return build_unet_layers(cfg, EncoderLayer, DecoderLayer, HeadLayer)


def build_unet_layers(cfg: UNetShape, encoder: type[nn.Module], decoder: type[nn.Module],
                      head: type[nn.Module]) -> list[LayerDef]:
    """The U-Net's layer list from its level classes (3D here, slice-wise in ``cnn2d``): ``encoder(in, out,
    convs, stride, keep_input)``, ``decoder(in, skip, convs)``, ``head(in, classes)``."""
    cfg.validate()
    widths = cfg.widths()
    layers = []
    in_channels = cfg.in_channels
    for level, width in enumerate(widths):
        stride = 1 if level == 0 else 2
        args = (in_channels, width, cfg.convs_per_level, stride, level > 0)
        layers.append(LayerDef(encoder, args, name=f"enc{level}"))
        in_channels = width
    for level in reversed(range(cfg.levels - 1)):
        args = (widths[level + 1], widths[level], cfg.convs_per_level)
        layers.append(LayerDef(decoder, args, name=f"dec{level}"))
    layers.append(LayerDef(head, (widths[0], cfg.num_classes), name="head"))
    return layers


def check_patch(cfg: UNet3DConfig, patch: Sequence[int]) -> None:
    """Raise ValueError unless every level halves the patch exactly and the bottleneck can be normed."""
    cfg.validate()
    patch = tuple(patch)
    if len(patch) != 3 or not all(is_positive_int(n) for n in patch):
        raise ValueError(f"patch must be three positive integers (X, Y, Z), got {patch!r}")
    patch = tuple(int(n) for n in patch)
    factor = 2 ** (cfg.levels - 1)
    if any(n % factor for n in patch):
        raise ValueError(
            f"patch {patch} must be divisible by 2**(levels - 1) = {factor} along every axis (levels={cfg.levels})"
        )
    bottleneck = [n // factor for n in patch]
    if bottleneck[0] * bottleneck[1] * bottleneck[2] < 2:
        raise ValueError(
            f"patch {patch} is only one voxel at the bottleneck (levels={cfg.levels}); "
            "InstanceNorm needs at least two: use a larger patch or fewer levels"
        )
