"""An nnU-Net-like 3D U-Net written as a flat list of layers whose skips ride along in a tuple.

The tuple that travels between layers is ``(skip_0, ..., skip_k, current, *aux)``: ``current`` is the
feature map being processed, the skips wait for their decoder level, and ``aux`` (training with deep
supervision only) holds the logits of decoder levels already passed. ``enc0`` turns the image into
``(f0,)``; every further encoder layer keeps the current map as a skip and appends its own output, so
the tuple grows by one; every decoder layer pops the current map and the last skip, fuses them and
pushes the result, so it shrinks by one; ``head`` turns the last map into logits. A layer that does
not use a skip passes it on untouched, which is what lets a pipeline cut the list anywhere: a skip
just crosses stage boundaries as one more float tensor. No tensor appears twice in a tuple, and the
image itself never travels past ``enc0`` (only graph-produced float tensors cross stages).

Each level has its own pooling stride and kernel per axis (``UNetShape.strides``, ``kernels``), as
nnU-Net plans them from the voxel spacing: an axis twice as coarse as the finest is neither pooled nor
convolved across until the others have caught up. With ``deep_supervision`` the decoder levels below
full resolution (all but the coarsest, whose weight nnU-Net sets to 0) also produce logits while
training, and ``head`` returns ``(logits, aux_1, aux_2, ...)`` finest first; in eval mode (prediction,
validation) it returns the full-resolution logits alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ds_seg3d.models.blocks import ConvStack3d
from ds_seg3d.models.layers import Activation, LayerDef, as_tuple, is_positive_int

Axes = tuple[int, int, int]


def _triples(value: object, field: str) -> tuple[Axes, ...]:
    """Nested lists (TOML, JSON) or tuples -> a tuple of (X, Y, Z) int triples."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{field} must be a list of (X, Y, Z) triples, got {value!r}")
    out = []
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 3 or not all(is_positive_int(v) for v in item):
            raise ValueError(f"{field} must hold (X, Y, Z) triples of positive integers, got {item!r}")
        out.append(tuple(int(v) for v in item))
    return tuple(out)  # type: ignore[return-value]


@dataclass
class UNetShape:
    """The shape of a U-Net (3D here, slice-wise 2D in ``cnn2d``); ``validate()`` explains what is wrong
    before anything is built."""

    in_channels: int = 1
    """Image channels (1 for CT; one per sequence for multi-sequence MRI)."""
    num_classes: int = 2
    """Output channels: background plus foreground labels (logits for softmax)."""
    levels: int = 4
    """Resolution levels including the bottleneck."""
    base_width: int = 16
    """Channels at full resolution; doubled at every level below."""
    max_width: int = 256
    """Cap on the channels of the coarse levels (nnU-Net caps at 320 for 3D)."""
    convs_per_level: int = 2
    """ConvNormAct blocks per encoder and per decoder level (the first encoder one is strided)."""
    strides: tuple[Axes, ...] = ()
    """Pooling stride of each level per axis (X, Y, Z), finest first; the first is (1, 1, 1). Empty: 2 on
    every pooled axis below level 0. Patches must be divisible by the product of the strides per axis."""
    kernels: tuple[Axes, ...] = ()
    """Conv kernel of each level per axis (odd sizes). Empty: 3 on every convolved axis."""
    deep_supervision: bool = False
    """While training, the decoder levels above the coarsest two also output logits (see the module)."""

    POOLED_AXES = (True, True, True)
    """Which axes the network may pool and convolve across (the 2D network: X and Y only)."""

    def __post_init__(self) -> None:
        # TOML and run.json give nested lists; the layers and equality checks want tuples.
        if isinstance(self.strides, (list, tuple)) and self.strides:
            self.strides = tuple(tuple(s) if isinstance(s, (list, tuple)) else s for s in self.strides)
        if isinstance(self.kernels, (list, tuple)) and self.kernels:
            self.kernels = tuple(tuple(k) if isinstance(k, (list, tuple)) else k for k in self.kernels)

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
        if not isinstance(self.deep_supervision, bool):
            raise ValueError(f"{kind}.deep_supervision must be true or false, got {self.deep_supervision!r}")
        for field_name in ("strides", "kernels"):
            value = getattr(self, field_name)
            if not value:
                continue
            triples = _triples(value, f"{kind}.{field_name}")
            if len(triples) != self.levels:
                raise ValueError(f"{kind}.{field_name} has {len(triples)} entries for {self.levels} levels")
            for t in triples:
                for axis, (v, pooled) in enumerate(zip(t, self.POOLED_AXES)):
                    if not pooled and v != 1:
                        raise ValueError(f"{kind}.{field_name}: axis {'XYZ'[axis]} must stay 1 here, got {t}")
        if self.strides and _triples(self.strides, "strides")[0] != (1, 1, 1):
            raise ValueError(f"{kind}.strides must start with (1, 1, 1) (the full-resolution level), "
                             f"got {self.strides[0]}")
        if self.kernels and any(k % 2 == 0 for t in _triples(self.kernels, "kernels") for k in t):
            raise ValueError(f"{kind}.kernels must be odd sizes ('same' padding), got {self.kernels}")

    def widths(self) -> list[int]:
        """Channels per level, finest first."""
        return [min(self.base_width * 2**level, self.max_width) for level in range(self.levels)]

    def level_strides(self) -> list[Axes]:
        """Stride per level and axis, finest first (the default when ``strides`` is empty)."""
        if self.strides:
            return list(_triples(self.strides, "strides"))
        pooled = tuple(2 if p else 1 for p in self.POOLED_AXES)
        return [(1, 1, 1)] + [pooled] * (self.levels - 1)  # type: ignore[list-item]

    def level_kernels(self) -> list[Axes]:
        """Kernel per level and axis (the default when ``kernels`` is empty)."""
        if self.kernels:
            return list(_triples(self.kernels, "kernels"))
        return [tuple(3 if p else 1 for p in self.POOLED_AXES)] * self.levels  # type: ignore[list-item]

    def divisor(self) -> Axes:
        """What a patch must be divisible by, per axis: the product of the strides."""
        out = [1, 1, 1]
        for stride in self.level_strides():
            out = [a * b for a, b in zip(out, stride)]
        return tuple(out)  # type: ignore[return-value]

    def supervised_levels(self) -> list[int]:
        """Decoder levels that output auxiliary logits while training (none without deep supervision)."""
        return list(range(1, self.levels - 2)) if self.deep_supervision else []


@dataclass
class UNet3DConfig(UNetShape):
    """Shape of the 3D U-Net (the fields and defaults of ``UNetShape``)."""


def split_aux(x: Activation, count: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(the U-Net tuple, the ``count`` auxiliary logits riding at its end)."""
    values = as_tuple(x)
    if count > len(values) - 1:
        raise ValueError(f"expected {count} auxiliary logits after the feature maps, got a tuple of {len(values)}")
    return values[:len(values) - count], values[len(values) - count:]


class EncoderLayer(nn.Module):
    """One encoder level: (skips..., current) -> (skips..., current, new); ``enc0`` replaces the image."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, stride: int | Axes, keep_input: bool,
                 kernel: int | Axes = 3) -> None:
        super().__init__()
        self.convs = ConvStack3d(in_channels, out_channels, num_convs, first_stride=stride, kernel_size=kernel)
        self.keep_input = keep_input

    def forward(self, x: Activation) -> tuple[Tensor, ...]:
        *skips, current = as_tuple(x)
        kept = (current,) if self.keep_input else ()
        return (*skips, *kept, self.convs(current))


class DecoderLayer(nn.Module):
    """One decoder level: (skips..., skip, current, *aux) -> (skips..., fused, *aux[, logits]), nnU-Net style.

    Transposed-conv upsampling (kernel = stride = the level's pooling) to the skip's width, channel
    concatenation ``[up, skip]``, then convs; with ``supervised`` a 1x1x1 conv also gives this level's
    logits while training. ``aux_in`` is how many auxiliary logits arrive at the tuple's end.
    """

    def __init__(self, in_channels: int, skip_channels: int, num_convs: int, up: int | Axes = 2,
                 kernel: int | Axes = 3, num_classes: int = 0, supervised: bool = False, aux_in: int = 0) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, skip_channels, up, stride=up)
        self.convs = ConvStack3d(2 * skip_channels, skip_channels, num_convs, kernel_size=kernel)
        self.aux = nn.Conv3d(skip_channels, num_classes, 1) if supervised else None
        self.aux_in = aux_in

    def forward(self, x: Activation) -> tuple[Tensor, ...]:
        values, aux = split_aux(x, self.aux_in if self.training else 0)
        if len(values) < 2:
            raise ValueError(f"DecoderLayer needs a skip and a feature map, got a tuple of {len(values)}")
        *rest, skip, current = values
        fused = self.convs(torch.cat((self.up(current), skip), dim=1))
        if self.aux is not None and self.training:
            aux = (*aux, self.aux(fused))
        return (*rest, fused, *aux)


class HeadLayer(nn.Module):
    """1x1x1 conv to class logits: one Tensor, or with deep supervision while training
    ``(logits, aux_1, ...)`` from the finest level down (the pipeline's last layer returns either)."""

    def __init__(self, in_channels: int, num_classes: int, aux_in: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, num_classes, 1)
        self.aux_in = aux_in

    def forward(self, x: Activation) -> Tensor | tuple[Tensor, ...]:
        values, aux = split_aux(x, self.aux_in if self.training else 0)
        if len(values) != 1:
            raise ValueError(f"HeadLayer expects every skip consumed, got a tuple of {len(values)}")
        logits = self.conv(values[0])
        return (logits, *reversed(aux)) if aux else logits


def build_unet3d_layers(cfg: UNet3DConfig) -> list[LayerDef]:
    """``enc0 .. enc{L-1}`` (the last is the bottleneck), ``dec{L-2} .. dec0``, ``head``."""
    return build_unet_layers(cfg, EncoderLayer, DecoderLayer, HeadLayer)


def build_unet_layers(cfg: UNetShape, encoder: type[nn.Module], decoder: type[nn.Module],
                      head: type[nn.Module]) -> list[LayerDef]:
    """The U-Net's layer list from its level classes (3D here, slice-wise in ``cnn2d``): ``encoder(in, out,
    convs, stride, keep_input, kernel)``, ``decoder(in, skip, convs, up, kernel, classes, supervised,
    aux_in)``, ``head(in, classes, aux_in)``."""
    cfg.validate()
    widths, strides, kernels = cfg.widths(), cfg.level_strides(), cfg.level_kernels()
    supervised = cfg.supervised_levels()
    layers = []
    in_channels = cfg.in_channels
    for level, width in enumerate(widths):
        args = (in_channels, width, cfg.convs_per_level, strides[level], level > 0, kernels[level])
        layers.append(LayerDef(encoder, args, name=f"enc{level}"))
        in_channels = width
    aux = 0
    for level in reversed(range(cfg.levels - 1)):
        args = (widths[level + 1], widths[level], cfg.convs_per_level, strides[level + 1], kernels[level],
                cfg.num_classes, level in supervised, aux)
        layers.append(LayerDef(decoder, args, name=f"dec{level}"))
        aux += level in supervised
    layers.append(LayerDef(head, (widths[0], cfg.num_classes, aux), name="head"))
    return layers


def check_patch(cfg: UNetShape, patch: Sequence[int]) -> None:
    """Raise ValueError unless every level divides the patch exactly and the bottleneck can be normed."""
    cfg.validate()
    patch = tuple(patch)
    if len(patch) != 3 or not all(is_positive_int(n) for n in patch):
        raise ValueError(f"patch must be three positive integers (X, Y, Z), got {patch!r}")
    patch = tuple(int(n) for n in patch)
    divisor = cfg.divisor()
    if any(n % d for n, d in zip(patch, divisor)):
        raise ValueError(
            f"patch {patch} must be divisible by the product of the level strides, {divisor} per axis "
            f"(levels={cfg.levels})"
        )
    bottleneck = [n // d for n, d in zip(patch, divisor)]
    if bottleneck[0] * bottleneck[1] * bottleneck[2] < 2:
        raise ValueError(
            f"patch {patch} is only one voxel at the bottleneck (levels={cfg.levels}); "
            "InstanceNorm needs at least two: use a larger patch or fewer levels"
        )
