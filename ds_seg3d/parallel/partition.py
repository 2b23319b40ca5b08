"""Where to cut a flat list of layers into pipeline stages so that no stage runs out of memory.

DeepSpeed's default ``partition_method="parameters"`` balances parameter counts. For 3D CNNs that
is the wrong quantity: the full-resolution layers hold almost all activation bytes and almost no
parameters, and under the 1F1B schedule stage s keeps ``min(stages - s, micro_batches)``
micro-batches of activations alive. This module measures what each layer keeps for backward on a
small input, scales it to the real patch size, and picks the contiguous split that minimises the
largest ``activation bytes x in-flight micro-batches`` of any stage.

Cost model of one stage holding layers ``[a, b)`` for one micro-batch::

    input_bytes[a] + sum(saved_bytes[a:b])

``saved_bytes`` counts each storage once, at the first layer that saves it for backward (a ReLU's
output saved again by the next conv is not counted twice); ``input_bytes[a]`` is the stage's own
copy of what it received (the pipe buffer DeepSpeed keeps until backward), which is where U-Net
skips crossing a boundary show up. Parameters, gradients and optimizer states are reported apart.

Pure torch: no DeepSpeed import, so the planner can use it without launching anything.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ds_seg3d.parallel.topology import in_flight


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


@dataclass(frozen=True)
class StageBytes:
    """Predicted memory of one stage under a given split."""

    stage: int
    start: int
    stop: int
    activation_bytes: int
    """One micro-batch: ``input_bytes[start] + sum(saved_bytes[start:stop])``."""
    in_flight: int
    """Micro-batches held at the 1F1B peak."""
    param_bytes: int

    @property
    def peak_activation_bytes(self) -> int:
        """The quantity the memory partition balances."""
        return self.activation_bytes * self.in_flight


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
    keep_alive: list[Any] = []  # every output stays referenced so storage addresses are never reused
    counted: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x: Any = torch.randn(tuple(sample_input_shape), dtype=dtype, device=device)
        for index, layer_def in enumerate(defs):
            layer = layer_def.cls(*layer_def.args, **layer_def.kwargs).to(device=device, dtype=dtype).train()
            state = list(chain(layer.parameters(), layer.buffers()))
            state_ptrs = {t.untyped_storage().data_ptr() for t in state}
            saved: dict[int, int] = {}

            def pack(t: Tensor) -> Tensor:
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if storage.nbytes() and ptr not in state_ptrs:
                    saved.setdefault(ptr, storage.nbytes())
                return t

            input_bytes = _unique_bytes([t for t in _tensors(x) if t.is_floating_point()])
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                x = layer(x)
            outputs = _tensors(x)
            for t in outputs:
                if not t.is_floating_point():
                    raise ValueError(
                        f"layer {index} ({_layer_name(index, layer_def)}) returns a {t.dtype} tensor; "
                        "only float tensors may travel between pipeline stages"
                    )
            new = {ptr: n for ptr, n in saved.items() if ptr not in counted}
            counted.update(new)
            keep_alive.append(x)
            profiles.append(
                LayerProfile(
                    name=_layer_name(index, layer_def),
                    saved_bytes=sum(new.values()),
                    input_bytes=input_bytes,
                    output_bytes=_unique_bytes(outputs),
                    param_bytes=sum(t.numel() * t.element_size() for t in state),
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
                output_bytes=scaled(p.output_bytes))
        for p in profile
    ]


def check_boundaries(boundaries: Sequence[int], num_layers: int, stages: int) -> list[int]:
    """Validate a split: ``stages + 1`` increasing indices from 0 to ``num_layers``, no empty stage."""
    parts = [int(b) for b in boundaries]
    if len(parts) != stages + 1:
        raise ValueError(f"boundaries {parts} must have stages + 1 = {stages + 1} entries")
    if parts[0] != 0 or parts[-1] != num_layers:
        raise ValueError(f"boundaries {parts} must start at 0 and end at the layer count {num_layers}")
    if any(b <= a for a, b in zip(parts, parts[1:])):
        raise ValueError(f"boundaries {parts} must be strictly increasing: every stage needs a layer")
    return parts


def _minimax_split(
    weights: Sequence[int], stages: int, factors: Sequence[int], entry: Sequence[int] | None
) -> list[int]:
    """Exact DP over contiguous splits minimising max_s factors[s] * (entry[a_s] + sum(weights[a_s:b_s]))."""
    n = len(weights)
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if n < stages:
        raise ValueError(f"cannot split {n} layers into {stages} non-empty stages; use at most {n} stages")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def cost(stage: int, a: int, b: int) -> int:
        extra = entry[a] if entry is not None else 0
        return factors[stage] * (prefix[b] - prefix[a] + extra)

    inf = math.inf
    # best[s][b]: smallest achievable maximum when stages 0..s cover layers [0, b)
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for b in range(1, n - stages + 2):
        best[0][b] = cost(0, 0, b)
    for s in range(1, stages):
        for b in range(s + 1, n - (stages - 1 - s) + 1):
            for a in range(s, b):
                value = max(best[s - 1][a], cost(s, a, b))
                if value < best[s][b]:
                    best[s][b], cut[s][b] = value, a
    parts = [n]
    for s in range(stages - 1, 0, -1):
        parts.append(cut[s][parts[-1]])
    parts.append(0)
    return parts[::-1]


def memory_partition(
    layer_bytes: Sequence[int],
    stages: int,
    micro_batches: int,
    input_bytes: Sequence[int] | None = None,
) -> list[int]:
    """Boundaries (``stages + 1`` indices) minimising the largest activation bytes x in-flight.

    ``layer_bytes[i]`` is what layer i keeps per micro-batch (``LayerProfile.saved_bytes``);
    ``input_bytes[i]``, when given, is added to a stage that starts at layer i. The result is the
    exact optimum over all contiguous splits with non-empty stages.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    if input_bytes is not None and len(input_bytes) != len(layer_bytes):
        raise ValueError(f"input_bytes has {len(input_bytes)} entries for {len(layer_bytes)} layers")
    factors = [in_flight(s, stages, micro_batches) for s in range(stages)]
    return _minimax_split(layer_bytes, stages, factors, input_bytes)


def parameter_partition(param_counts: Sequence[int], stages: int) -> list[int]:
    """Boundaries minimising the largest per-stage parameter count (the idea behind DeepSpeed's default)."""
    return _minimax_split(param_counts, stages, [1] * stages, None)


def uniform_partition(num_layers: int, stages: int) -> list[int]:
    """Equal layer counts, remainder to the first stages: DeepSpeed's ``partition_uniform``."""
    if num_layers < stages:
        raise ValueError(f"cannot split {num_layers} layers into {stages} non-empty stages")
    size, extra = divmod(num_layers, stages)
    parts = [0]
    for s in range(stages):
        parts.append(parts[-1] + size + (1 if s < extra else 0))
    return parts


def profile_partition(profile: Sequence[LayerProfile], stages: int, micro_batches: int) -> list[int]:
    """``memory_partition`` fed from a profile, with each stage's received input counted."""
    return memory_partition(
        [p.saved_bytes for p in profile], stages, micro_batches, [p.input_bytes for p in profile]
    )


def predicted_stage_bytes(
    profile: Sequence[LayerProfile], boundaries: Sequence[int], micro_batches: int
) -> list[StageBytes]:
    """Per-stage activation and parameter bytes of a split, in the cost model of this module."""
    stages = len(boundaries) - 1
    parts = check_boundaries(boundaries, len(profile), stages)
    result = []
    for s in range(stages):
        a, b = parts[s], parts[s + 1]
        layers = profile[a:b]
        result.append(
            StageBytes(
                stage=s,
                start=a,
                stop=b,
                activation_bytes=profile[a].input_bytes + sum(p.saved_bytes for p in layers),
                in_flight=in_flight(s, stages, micro_batches),
                param_bytes=sum(p.param_bytes for p in layers),
            )
        )
    return result


def format_bytes(n: float) -> str:
    """Binary units, three significant digits: tables stay narrow from KiB to TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} TiB"


def partition_table(profile: Sequence[LayerProfile], boundaries: Sequence[int], micro_batches: int) -> str:
    """A printable per-stage table: layers, activations per micro-batch, in-flight, peak, parameters."""
    rows = predicted_stage_bytes(profile, boundaries, micro_batches)
    lines = [
        f"{'stage':>5}  {'layers':<22}  {'act/micro':>10}  {'in_flight':>9}  {'act peak':>10}  {'params':>10}"
    ]
    for r in rows:
        span = f"[{r.start},{r.stop}) {profile[r.start].name}..{profile[r.stop - 1].name}"
        lines.append(
            f"{r.stage:>5}  {span:<22.22}  {format_bytes(r.activation_bytes):>10}  {r.in_flight:>9}  "
            f"{format_bytes(r.peak_activation_bytes):>10}  {format_bytes(r.param_bytes):>10}"
        )
    peak = max(r.peak_activation_bytes for r in rows)
    lines.append(f"boundaries={list(boundaries)}  largest stage peak={format_bytes(peak)}")
    return "\n".join(lines)


def compare_partitions(
    profile: Sequence[LayerProfile], stages: int, micro_batches: int, param_counts: Sequence[int] | None = None
) -> dict[str, list[int]]:
    """Boundaries of every method on one profile, so a plan can show what balancing memory buys.

    ``param_counts`` defaults to parameter bytes, which balances the same way for one dtype.
    """
    weights = list(param_counts) if param_counts is not None else [p.param_bytes for p in profile]
    return {
        "uniform": uniform_partition(len(profile), stages),
        "parameters": parameter_partition(weights, stages),
        "memory": profile_partition(profile, stages, micro_batches),
    }
