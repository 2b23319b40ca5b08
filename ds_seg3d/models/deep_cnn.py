"""A plain deep 3D CNN: a strided stem, dilated conv blocks, upsampling, a 1x1x1 head.

No skips and no tuples: each layer maps a Tensor to a Tensor, which makes it the simplest network to
pipeline and the one whose activation memory is easiest to reason about. The stem's stride and the
cycling dilations give a receptive field that covers a whole organ (``receptive_field``) while the
depth and width stay those of the reference network class (25 conv layers, 32 channels).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ds_seg3d.models.blocks import ConvNormAct3d, UpConvNormAct3d
from ds_seg3d.models.layers import LayerDef, is_positive_int


@dataclass
class DeepCNNConfig:
    """Shape of the deep CNN; ``validate()`` explains what is wrong before anything is built."""

    in_channels: int = 1
    """Image channels (1 for CT; one per sequence for multi-sequence MRI)."""
    num_classes: int = 2
    """Output channels: background plus foreground labels (logits for softmax)."""
    depth: int = 25
    """Conv layers in total, counting the stem, the upsampling conv and the 1x1x1 head."""
    width: int = 32
    """Channels of every hidden layer."""
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    """Dilations cycled through the body blocks; they grow the receptive field at no memory cost."""
    downsample: int = 2
    """Stride of the stem (and factor of the upsampling): the body runs on a grid this much coarser."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for field_name in ("in_channels", "width", "downsample"):
            value = getattr(self, field_name)
            if not is_positive_int(value):
                raise ValueError(f"DeepCNNConfig.{field_name} must be a positive integer, got {value!r}")
        if not is_positive_int(self.num_classes) or self.num_classes < 2:
            raise ValueError(
                f"DeepCNNConfig.num_classes must be >= 2 (background + foreground), got {self.num_classes!r}"
            )
        if not is_positive_int(self.depth) or self.depth < 3:
            raise ValueError(
                f"DeepCNNConfig.depth must be >= 3 (stem, upsampling conv and head), got {self.depth!r}"
            )
        dilations = tuple(self.dilations) if isinstance(self.dilations, (tuple, list)) else ()
        if not dilations or not all(is_positive_int(d) for d in dilations):
            raise ValueError(
                f"DeepCNNConfig.dilations must be a non-empty sequence of positive integers, got {self.dilations!r}"
            )


def _stem_kernel(stride: int) -> int:
    # Odd kernel at least as wide as the stride, so no input voxel is skipped and, with padding
    # kernel // 2, a size divisible by the stride shrinks exactly by it.
    return stride + 1 if stride % 2 == 0 else max(stride, 3)


def _body_dilations(cfg: DeepCNNConfig) -> list[int]:
    dilations = tuple(cfg.dilations)
    return [dilations[i % len(dilations)] for i in range(cfg.depth - 3)]


def build_deep_cnn_layers(cfg: DeepCNNConfig) -> list[LayerDef]:
    """One pipeline layer per conv block: ``stem``, ``body0`` ..., ``up``, ``head`` (``depth`` layers)."""
    cfg.validate()
    s = cfg.downsample
    layers = [LayerDef(ConvNormAct3d, (cfg.in_channels, cfg.width, _stem_kernel(s), s), name="stem")]
    for i, dilation in enumerate(_body_dilations(cfg)):
        layers.append(LayerDef(ConvNormAct3d, (cfg.width, cfg.width), {"dilation": dilation}, name=f"body{i}"))
    layers.append(LayerDef(UpConvNormAct3d, (cfg.width, cfg.width, s), name="up"))
    layers.append(LayerDef(nn.Conv3d, (cfg.width, cfg.num_classes, 1), name="head"))
    return layers


def receptive_field(cfg: DeepCNNConfig) -> int:
    """Edge length, in input voxels, of the cube of input that one output voxel sees.

    The stem sees ``kernel`` voxels and multiplies the step by ``downsample``; each 3^3 body conv
    with dilation d adds 2 * d steps; the kernel = stride transposed conv and the 1x1x1 head add
    nothing. (InstanceNorm's statistics span the whole patch, but that is context, not field.)
    """
    cfg.validate()
    field = _stem_kernel(cfg.downsample)
    for dilation in _body_dilations(cfg):
        field += 2 * dilation * cfg.downsample
    return field


def check_patch(cfg: DeepCNNConfig, patch: Sequence[int]) -> None:
    """Raise ValueError unless the upsampled output has exactly the patch's size."""
    cfg.validate()
    patch = tuple(patch)
    if len(patch) != 3 or not all(is_positive_int(n) for n in patch):
        raise ValueError(f"patch must be three positive integers (X, Y, Z), got {patch!r}")
    patch = tuple(int(n) for n in patch)
    s = cfg.downsample
    if any(n % s for n in patch):
        raise ValueError(f"patch {patch} must be divisible by downsample={s} along every axis")
    coarse = [n // s for n in patch]
    if coarse[0] * coarse[1] * coarse[2] < 2:
        raise ValueError(
            f"patch {patch} is only one voxel after downsample={s}; InstanceNorm needs at least two"
        )
