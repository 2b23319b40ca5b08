"""Where to cut a flat list of layers into pipeline stages so that no stage runs out of memory.

DeepSpeed's default ``partition_method="parameters"`` balances parameter counts. For 3D CNNs that
is the wrong quantity: the full-resolution layers hold almost all activation bytes and almost no
parameters, and under the 1F1B schedule stage s keeps ``min(stages - s, micro_batches)``
micro-batches of activations alive. This module measures what each layer keeps for backward on a
small input, scales it to the real patch size, and picks the contiguous split that minimises the
largest peak any stage is predicted to reach.

Cost model of one stage holding layers ``[a, b)`` with ``n`` micro-batches in flight::

    n * (input_bytes[a] + sum(saved_bytes[a:b])) + stage_fixed_bytes(a, b)

``saved_bytes`` counts each storage once, at the first layer that saves it for backward (a ReLU's
output saved again by the next conv is not counted twice); ``input_bytes[a]`` is the stage's own
copy of what it received (the leaf the engine keeps until backward), which is where U-Net
skips crossing a boundary show up. ``stage_fixed_bytes`` is what a stage holds once: gradient
buffers (and, with DeepSpeed's own receive path, its receive buffers), the backward working set of
its largest layer, and on the last stage the loss.
Parameters, gradients and optimizer states are reported apart. The planner
(``ds_seg3d.memory.prediction``) replays each stage exactly; this model only has to rank splits.

Pure torch: no DeepSpeed import (``received_inputs`` imports it only inside the engine's instructions), so the planner can use it without launching anything.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ds_seg3d.parallel import received_inputs
from ds_seg3d.parallel.topology import in_flight

MIN_PROFILE_EDGE = 8
"""Smallest spatial edge a reduced profiling shape may have (see ``stage_profile``)."""
LOSS_TENSORS = 8.0
"""Logits-sized tensors the last stage holds for the loss (see ``stage_fixed_bytes``)."""


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
    fixed_bytes: int = 0
    """Held once, whatever the in-flight count: pipe buffers, backward working set, the loss
    (see ``stage_fixed_bytes``)."""

    @property
    def peak_activation_bytes(self) -> int:
        """The quantity the memory partition balances."""
        return self.activation_bytes * self.in_flight + self.fixed_bytes


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


def minimax_split(
    n: int, stages: int, cost: Callable[[int, int, int], float]
) -> list[int]:
    """Exact DP over contiguous splits of ``n`` layers minimising max_s cost(s, a_s, b_s) (any stage cost)."""
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if n < stages:
        raise ValueError(f"cannot split {n} layers into {stages} non-empty stages; use at most {n} stages")
    inf = math.inf
    # best[s][b]: smallest achievable maximum when stages 0..s cover layers [0, b)
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    # a stage's cost is only asked for where it can occur: the last stage always ends at n
    for b in ([n] if stages == 1 else range(1, n - stages + 2)):
        best[0][b] = cost(0, 0, b)
    for s in range(1, stages):
        for b in ([n] if s == stages - 1 else range(s + 1, n - (stages - 1 - s) + 1)):
            for a in range(s, b):
                value = max(best[s - 1][a], cost(s, a, b))
                if value < best[s][b]:
                    best[s][b], cut[s][b] = value, a
    parts = [n]
    for s in range(stages - 1, 0, -1):
        parts.append(cut[s][parts[-1]])
    parts.append(0)
    return parts[::-1]


def _prefix(weights: Sequence[int]) -> list[int]:
    out = [0]
    for w in weights:
        out.append(out[-1] + w)
    return out


def memory_partition(
    layer_bytes: Sequence[int],
    stages: int,
    micro_batches: int,
    input_bytes: Sequence[int] | None = None,
) -> list[int]:
    """Boundaries (``stages + 1`` indices) minimising the largest activation bytes x in-flight.

    ``layer_bytes[i]`` is what layer i keeps per micro-batch (``LayerProfile.saved_bytes``);
    ``input_bytes[i]``, when given, is added to a stage that starts at layer i. The result is the
    exact optimum over all contiguous splits with non-empty stages. ``profile_partition`` adds the
    bytes a stage holds once (pipe buffers, backward working set, loss) on top of this.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    if input_bytes is not None and len(input_bytes) != len(layer_bytes):
        raise ValueError(f"input_bytes has {len(input_bytes)} entries for {len(layer_bytes)} layers")
    factors = [in_flight(s, stages, micro_batches) for s in range(stages)]
    prefix = _prefix(layer_bytes)

    def cost(stage: int, a: int, b: int) -> int:
        return factors[stage] * (prefix[b] - prefix[a] + (input_bytes[a] if input_bytes is not None else 0))

    return minimax_split(len(layer_bytes), stages, cost)


def parameter_partition(param_counts: Sequence[int], stages: int) -> list[int]:
    """Boundaries minimising the largest per-stage parameter count (the idea behind DeepSpeed's default)."""
    prefix = _prefix(param_counts)
    return minimax_split(len(param_counts), stages, lambda s, a, b: prefix[b] - prefix[a])


def uniform_partition(num_layers: int, stages: int) -> list[int]:
    """Equal layer counts, remainder to the first stages: DeepSpeed's ``partition_uniform``."""
    if num_layers < stages:
        raise ValueError(f"cannot split {num_layers} layers into {stages} non-empty stages")
    size, extra = divmod(num_layers, stages)
    parts = [0]
    for s in range(stages):
        parts.append(parts[-1] + size + (1 if s < extra else 0))
    return parts


def stage_fixed_bytes(
    profile: Sequence[LayerProfile], start: int, stop: int, loss_tensors: float = LOSS_TENSORS
) -> int:
    """Bytes a stage holding layers ``[start, stop)`` needs once per step, on top of its held micro-batches.

    - a stage that receives (``start > 0``), with DeepSpeed's own receive path only
      (``DS_SEG3D_ONE_COPY=0``): its persistent receive buffer and the clone of the received input that
      its forward pass runs on, two inputs' worth (ds-seg3d's engine receives into the one copy that
      is counted per micro-batch, see ``received_inputs``);
    - a stage that sends (``stop < len(profile)``): the buffer the next stage's gradient arrives in;
    - the backward working set: while layer i runs backward, the gradients of its output, of its
      input and of its largest saved tensor are alive; the largest such sum over the stage counts;
    - the last stage: the loss's logits-sized tensors (``loss_tensors`` x the logits bytes): the
      retained logits and the labels' pipe buffers, softmax, log-softmax, one-hot target and their
      gradients.

    Without these terms a "balanced" split hands the last stage the network's full-resolution
    tail and the loss on top of an equal share of held activations, and that stage sets the peak.
    """
    last = len(profile)
    fixed = 0
    if start > 0 and not received_inputs.enabled():
        fixed += 2 * profile[start].input_bytes
    if stop < last:
        fixed += profile[stop - 1].output_bytes
    fixed += max(p.input_bytes + p.output_bytes + p.largest_bytes for p in profile[start:stop])
    if stop == last:
        fixed += int(round(loss_tensors * profile[-1].output_bytes))
    return fixed


def profile_partition(
    profile: Sequence[LayerProfile], stages: int, micro_batches: int, loss_tensors: float = LOSS_TENSORS
) -> list[int]:
    """The split minimising the largest ``held micro-batches + stage_fixed_bytes`` of any stage.

    Per micro-batch a stage holds ``input_bytes[start] + sum(saved_bytes[start:stop])``, times its
    in-flight count under 1F1B; once, it holds ``stage_fixed_bytes``.
    """
    return minimax_split(len(profile), stages, activation_cost(profile, stages, micro_batches, loss_tensors))


def activation_cost(
    profile: Sequence[LayerProfile], stages: int, micro_batches: int, loss_tensors: float = LOSS_TENSORS
) -> Callable[[int, int, int], int]:
    """``cost(stage, start, stop)``: held micro-batches + ``stage_fixed_bytes`` of a stage in the cost model."""
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    factors = [in_flight(s, stages, micro_batches) for s in range(stages)]
    prefix = _prefix([p.saved_bytes for p in profile])

    def cost(stage: int, a: int, b: int) -> int:
        held = factors[stage] * (profile[a].input_bytes + prefix[b] - prefix[a])
        return held + stage_fixed_bytes(profile, a, b, loss_tensors)

    return cost


def predicted_stage_bytes(
    profile: Sequence[LayerProfile], boundaries: Sequence[int], micro_batches: int,
    loss_tensors: float = LOSS_TENSORS,
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
                fixed_bytes=stage_fixed_bytes(profile, a, b, loss_tensors),
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
