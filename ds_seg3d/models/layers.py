"""Lazy layer descriptions, so one flat list runs as ``nn.Sequential`` or as pipeline stages.

A model is an ordered list of :class:`LayerDef`. Nothing is allocated until ``build()``: a pipeline
stage builds only its own slice, and ``LayerDef(cls, args, kwargs)`` maps one-to-one onto DeepSpeed's
``LayerSpec(cls, *args, **kwargs)`` without this package importing DeepSpeed.

Every layer takes and returns an :data:`Activation`: a float Tensor or a tuple of float Tensors.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn

Activation = Union[Tensor, tuple[Tensor, ...]]
"""What travels between layers (and between pipeline stages)."""


@dataclass
class LayerDef:
    """One layer, described by its class and constructor arguments, built on demand."""

    cls: type[nn.Module]
    """The ``nn.Module`` subclass; its forward takes and returns an :data:`Activation`."""
    args: tuple = ()
    """Positional constructor arguments (plain, picklable values)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword constructor arguments (plain, picklable values)."""
    name: str = ""
    """Short human-readable name (``"enc0"``, ``"body7"``); defaults to the class name."""

    def __post_init__(self) -> None:
        if not (isinstance(self.cls, type) and issubclass(self.cls, nn.Module)):
            raise TypeError(f"LayerDef needs an nn.Module subclass, got {self.cls!r}")
        if not self.name:
            self.name = self.cls.__name__

    def build(self) -> nn.Module:
        """Allocate the module; parameter initialisation draws from torch's global RNG."""
        return self.cls(*self.args, **self.kwargs)


def build_sequential(defs: Sequence[LayerDef], seed: int | None = None) -> nn.Sequential:
    """Build the whole list on one device, initialised exactly as a seeded pipeline would be.

    With ``seed`` set, ``torch.manual_seed(seed + i)`` runs before building layer ``i``. This mirrors
    ``deepspeed.pipe.PipelineModule(seed_layers=True, base_seed=seed)``: in DeepSpeed 0.19.8
    (``runtime/pipe/module.py``, ``PipelineModule._build``) each stage calls
    ``ds_utils.set_random_seed(base_seed + layer_idx)`` with ``layer_idx`` the *global* index of the
    layer, before ``LayerSpec.build()``. So the weights do not depend on how the list is partitioned,
    and a single-device run starts from the same weights as any pipelined run. (DeepSpeed also
    reseeds python ``random`` and numpy there, and reseeds per micro-batch in ``forward``; module
    construction here draws only from torch and the layers have no dropout, so neither matters.)
    The global torch RNG is left as the last layer's seeding left it, as in DeepSpeed.

    Submodules are named ``"0"``, ``"1"``, ... like PipelineModule's, so state-dict keys line up.
    """
    modules = []
    for i, layer_def in enumerate(defs):
        if seed is not None:
            torch.manual_seed((seed + i) % 2**63)
        modules.append(layer_def.build())
    return nn.Sequential(*modules)


def as_tuple(x: Activation) -> tuple[Tensor, ...]:
    """Accept a bare Tensor where a 1-tuple is meant.

    DeepSpeed's activation checkpointing unpacks a 1-tuple into a bare Tensor before calling the
    first layer of each checkpointed interval, so tuple-consuming layers must accept both forms.
    """
    if isinstance(x, Tensor):
        return (x,)
    if isinstance(x, tuple) and all(isinstance(t, Tensor) for t in x):
        return x
    raise TypeError(f"expected a Tensor or a tuple of Tensors, got {type(x).__name__}")


def is_positive_int(value: object) -> bool:
    """A whole number >= 1 that is not a bool (config validation of sizes and counts)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
