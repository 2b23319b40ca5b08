"""Conv + InstanceNorm + LeakyReLU building blocks shared by the networks (nnU-Net's choices).

InstanceNorm rather than BatchNorm because 3D micro-batches are one or two volumes: batch statistics
would be noise, and per-sample statistics need no synchronisation across pipeline or data ranks.
Convolutions feeding a norm carry no bias: the norm subtracts the per-channel mean, which would
cancel it anyway.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

Size3 = int | Sequence[int]
"""A kernel or stride: one int for every axis, or one per axis (X, Y, Z)."""

NEGATIVE_SLOPE = 0.01
"""LeakyReLU slope (nnU-Net's); a non-zero slope keeps gradients alive through every block."""


def _norm_act(channels: int) -> list[nn.Module]:
    # In-place activation: autograd keeps its output instead of its input, saving one activation
    # tensor per block, and activations are what limits the patch size.
    return [nn.InstanceNorm3d(channels, affine=True), nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)]


def _per_axis(value: Size3) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"expected one value or three (X, Y, Z), got {value!r}")
    return values  # type: ignore[return-value]


class ConvNormAct3d(nn.Sequential):
    """Conv3d + InstanceNorm3d(affine) + LeakyReLU(0.01); 'same' padding for odd kernels at stride 1.

    Kernel and stride may differ per axis: a (3, 3, 1) kernel convolves in-plane only, as nnU-Net does
    on an axis whose voxels are more than twice as coarse as the finest."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size3 = 3,
        stride: Size3 = 1,
        dilation: int = 1,
    ) -> None:
        kernel_size, stride = _per_axis(kernel_size), _per_axis(stride)
        padding = tuple(dilation * (k // 2) for k in kernel_size)
        conv = nn.Conv3d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
        )
        super().__init__(conv, *_norm_act(out_channels))


class UpConvNormAct3d(nn.Sequential):
    """ConvTranspose3d (kernel = stride = factor) + InstanceNorm3d + LeakyReLU.

    Kernel equal to stride gives exactly ``factor`` times the size with no checkerboard overlap.
    """

    def __init__(self, in_channels: int, out_channels: int, factor: Size3 = 2) -> None:
        up = nn.ConvTranspose3d(in_channels, out_channels, factor, stride=factor, bias=False)
        super().__init__(up, *_norm_act(out_channels))


class ConvStack3d(nn.Sequential):
    """``num_convs`` ConvNormAct3d blocks of one kernel; the first may be strided (nnU-Net's downsampling)."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, first_stride: Size3 = 1,
                 kernel_size: Size3 = 3) -> None:
        if num_convs < 1:
            raise ValueError(f"ConvStack3d needs at least one conv, got num_convs={num_convs}")
        blocks = [ConvNormAct3d(in_channels, out_channels, kernel_size, stride=first_stride)]
        blocks += [ConvNormAct3d(out_channels, out_channels, kernel_size) for _ in range(num_convs - 1)]
        super().__init__(*blocks)
