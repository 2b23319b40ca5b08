"""What each layer of a flat list keeps for backward, measured on a small input and scaled to the patch.

``profile_layers`` runs the layers once on a reduced input with saved-tensor hooks and records, per layer,
the activation storages it saves that no earlier layer saved, the float bytes it receives and returns,
its parameter bytes and its largest saved storage (``LayerProfile``); ``scale_profile`` scales those to
the real patch; ``stage_profile`` does both with a reduced shape the network accepts. The memory
partition (``partition``) and the planner rank splits from these numbers.

Pure torch: no DeepSpeed import.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any, Protocol

import torch
from torch import Tensor, nn

MIN_PROFILE_EDGE = 8
"""Smallest spatial edge a reduced profiling shape may have (see ``stage_profile``)."""


class LayerLike(Protocol):
    """What a layer description must offer (``ds_seg3d.models.layers.LayerDef`` does)."""

    cls: type[nn.Module]
    args: tuple
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class LayerProfile:
    """Bytes one layer costs for one micro-batch of the profiled input shape."""

    name: str
    saved_bytes: int
    """Activation storages saved for backward that no earlier layer already saved."""
    input_bytes: int
    """Float tensors the layer receives (what a stage starting here must buffer)."""
    output_bytes: int
    """Float tensors the layer returns (what crosses a stage boundary after it)."""
    param_bytes: int
    """Trainable and frozen parameters and buffers (model state, independent of the input size)."""
    largest_bytes: int = 0
    """The largest single storage the layer saves for backward (already counted or not): its
    gradient is in flight while the layer's backward runs."""


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return list(chain.from_iterable(_tensors(v) for v in value))
    raise TypeError(f"layers must pass Tensors or tuples of Tensors, got {type(value).__name__}")


def _unique_bytes(tensors: Sequence[Tensor]) -> int:
    """Bytes of distinct tensors (a skip passed through unchanged is one tensor, not two)."""
    seen: dict[tuple[int, tuple[int, ...]], int] = {}
    for t in tensors:
        seen.setdefault((t.data_ptr(), tuple(t.shape)), t.numel() * t.element_size())
    return sum(seen.values())


def _layer_name(index: int, layer_def: LayerLike) -> str:
    return getattr(layer_def, "name", "") or f"{layer_def.cls.__name__}{index}"


def _never_unpacked(packed: Any) -> Tensor:
    raise RuntimeError("profile_layers runs no backward pass; its graph holds placeholders only")


def profile_layers(
    defs: Sequence[LayerLike],
    sample_input_shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> list[LayerProfile]:
    """Run one forward pass (no backward) on a random input and record each layer's bytes.

    Use a small shape: activation bytes scale with the voxel count (see ``scale_profile``), so
    a 32^3 profile predicts a 128^3 run. Layers are built in training mode because that is what
    they save for backward when training. The global RNG state is left untouched.
    """
    if len(defs) == 0:
        raise ValueError("cannot profile an empty list of layers")
    profiles: list[LayerProfile] = []
    # Every layer output stays referenced until the end, so an address counted as a saved output is
    # never reused by a later tensor; saved intermediates are released after their own layer.
    keep_alive: list[Any] = []
    counted: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x: Any = torch.randn(tuple(sample_input_shape), dtype=dtype, device=device)
        keep_alive.append(x)
        for index, layer_def in enumerate(defs):
            layer = layer_def.cls(*layer_def.args, **layer_def.kwargs).to(device=device, dtype=dtype).train()
            state = list(chain(layer.parameters(), layer.buffers()))
            state_ptrs = {t.untyped_storage().data_ptr() for t in state}
            saved: dict[int, int] = {}
            largest = 0
            held: list[Tensor] = []  # this layer's saved tensors: no address is reused while it runs

            def pack(t: Tensor) -> None:
                # The graph gets a placeholder, not the tensor: no backward runs here, and a saved
                # output would otherwise form a cycle (tensor -> grad_fn -> tensor) that outlives
                # the profile and stays allocated during training.
                nonlocal largest
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if storage.nbytes() and ptr not in state_ptrs:
                    saved.setdefault(ptr, storage.nbytes())
                    largest = max(largest, storage.nbytes())
                    held.append(t)
                return None

            input_bytes = _unique_bytes([t for t in _tensors(x) if t.is_floating_point()])
            with torch.autograd.graph.saved_tensors_hooks(pack, _never_unpacked):
                x = layer(x)
            outputs = _tensors(x)
            for t in outputs:
                if not t.is_floating_point():
                    raise ValueError(
                        f"layer {index} ({_layer_name(index, layer_def)}) returns a {t.dtype} tensor; "
                        "only float tensors may travel between pipeline stages"
                    )
            new = {ptr: n for ptr, n in saved.items() if ptr not in counted}
            keep_alive.append(x)
            alive = {t.untyped_storage().data_ptr() for t in chain.from_iterable(_tensors(v) for v in keep_alive)}
            counted = {ptr for ptr in counted | set(new) if ptr in alive}
            held.clear()
            profiles.append(
                LayerProfile(
                    name=_layer_name(index, layer_def),
                    saved_bytes=sum(new.values()),
                    input_bytes=input_bytes,
                    output_bytes=_unique_bytes(outputs),
                    param_bytes=sum(t.numel() * t.element_size() for t in state),
                    largest_bytes=largest,
                )
            )
    return profiles


def scale_profile(
    profile: Sequence[LayerProfile], small_shape: Sequence[int], real_shape: Sequence[int]
) -> list[LayerProfile]:
    """Scale activation bytes from the profiled input shape to the real one (by element count).

    Activations of a fully convolutional network are proportional to batch x voxels; parameter
    bytes do not change.
    """
    small, real = tuple(small_shape), tuple(real_shape)
    if len(small) != len(real):
        raise ValueError(f"shapes must have the same rank, got {small} and {real}")
    if any(n < 1 for n in chain(small, real)):
        raise ValueError(f"shapes must be positive, got {small} and {real}")
    factor = math.prod(real) / math.prod(small)

    def scaled(n: int) -> int:
        return int(round(n * factor))

    return [
        replace(p, saved_bytes=scaled(p.saved_bytes), input_bytes=scaled(p.input_bytes),
                output_bytes=scaled(p.output_bytes), largest_bytes=scaled(p.largest_bytes))
        for p in profile
    ]


def _reduced_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Batch 1 and spatial dims / 8, / 4, / 2 where they divide evenly, smallest first."""
    batch, channels, *spatial = shape
    out = []
    for factor in (8, 4, 2):
        if all(n % factor == 0 and n // factor >= MIN_PROFILE_EDGE for n in spatial):
            out.append((1, channels, *(n // factor for n in spatial)))
    if batch != 1:
        out.append((1, channels, *spatial))
    return out


def stage_profile(
    defs: Sequence[LayerLike],
    sample_shape: Sequence[int],
    profile_shape: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[LayerProfile]:
    """Per-layer bytes at ``sample_shape`` (one micro-batch), measured on a smaller input and scaled.

    A full 128^3 forward pass would cost every rank seconds and gigabytes at start-up, so the
    profile runs at ``profile_shape`` or, by default, at the smallest reduced shape the network
    accepts (a U-Net rejects shapes its levels cannot halve; those are skipped).
    """
    sample = tuple(sample_shape)
    candidates = [tuple(profile_shape)] if profile_shape is not None else _reduced_shapes(sample)
    for shape in candidates:
        try:
            return scale_profile(profile_layers(defs, shape, dtype), shape, sample)
        except (RuntimeError, ValueError):
            if profile_shape is not None:
                raise
    return profile_layers(defs, sample, dtype)
