"""The segmentation networks as plain torch: each model is an ordered list of lazily built layers.

The same ``list[LayerDef]`` runs as ``build_sequential(...)`` on one device or, converted one-to-one
into ``LayerSpec`` objects by ``ds_seg3d.parallel``, as DeepSpeed pipeline stages. Nothing here knows
about parallelism.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Union

import torch
from torch import nn

from ds_seg3d.models import cnn2d, deep_cnn, unet3d
from ds_seg3d.models.cnn2d import CNN2DConfig
from ds_seg3d.models.deep_cnn import DeepCNNConfig, receptive_field
from ds_seg3d.models.discriminator import Discriminator3D, DiscriminatorConfig
from ds_seg3d.models.layers import Activation, LayerDef, as_tuple, build_sequential
from ds_seg3d.models.unet3d import UNet3DConfig

ModelConfig = Union[DeepCNNConfig, UNet3DConfig, CNN2DConfig]

MODEL_CONFIGS: dict[str, type] = {"deep_cnn": DeepCNNConfig, "unet3d": UNet3DConfig, "cnn2d": CNN2DConfig}
"""Model name (as written in experiment configs) -> its config dataclass."""

_BUILDERS = {
    "deep_cnn": deep_cnn.build_deep_cnn_layers,
    "unet3d": unet3d.build_unet3d_layers,
    "cnn2d": cnn2d.build_cnn2d_layers,
}
_PATCH_CHECKS = {
    DeepCNNConfig: deep_cnn.check_patch,
    UNet3DConfig: unet3d.check_patch,
    CNN2DConfig: cnn2d.check_patch,
}


def build_layers(name: str, cfg: ModelConfig) -> list[LayerDef]:
    """The model's flat layer list; validates ``cfg`` and that it belongs to ``name``."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)}")
    expected = MODEL_CONFIGS[name]
    if not isinstance(cfg, expected):
        raise ValueError(f"model {name!r} needs a {expected.__name__}, got {type(cfg).__name__}")
    return _BUILDERS[name](cfg)


def check_patch(cfg: ModelConfig, patch: Sequence[int]) -> None:
    """Raise ValueError unless the model maps a ``patch``-sized input to a ``patch``-sized output."""
    for cfg_type, check in _PATCH_CHECKS.items():
        if isinstance(cfg, cfg_type):
            check(cfg, patch)
            return
    raise ValueError(f"no model takes a {type(cfg).__name__}")


def count_parameters(layers: Iterable[Union[LayerDef, nn.Module]]) -> int:
    """Trainable parameters of a layer list, without allocating them (LayerDefs build on 'meta')."""
    total = 0
    for layer in layers:
        if isinstance(layer, LayerDef):
            with torch.device("meta"):
                layer = layer.build()
        total += sum(p.numel() for p in layer.parameters() if p.requires_grad)
    return total


__all__ = [
    "Activation",
    "CNN2DConfig",
    "DeepCNNConfig",
    "Discriminator3D",
    "DiscriminatorConfig",
    "LayerDef",
    "MODEL_CONFIGS",
    "ModelConfig",
    "UNet3DConfig",
    "as_tuple",
    "build_layers",
    "build_sequential",
    "check_patch",
    "count_parameters",
    "receptive_field",
]
