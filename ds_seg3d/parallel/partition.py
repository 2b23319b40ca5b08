"""Where to cut a flat list of layers into pipeline stages so that no stage runs out of memory.

DeepSpeed's default ``partition_method="parameters"`` balances parameter counts. For 3D CNNs that
is the wrong quantity: the full-resolution layers hold almost all activation bytes and almost no
parameters, and under the 1F1B schedule stage s keeps ``min(stages - s, micro_batches)``
micro-batches of activations alive. ``layer_profile`` measures what each layer keeps for backward on
a small input and scales it to the real patch size; this module picks the contiguous split that
minimises the largest peak any stage is predicted to reach.

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

Pure torch: no DeepSpeed import (``received_inputs`` imports it only inside the engine's
instructions), so the planner can use it without launching anything.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ds_seg3d.parallel import received_inputs
from ds_seg3d.parallel.layer_profile import LayerProfile
from ds_seg3d.parallel.topology import in_flight

LOSS_TENSORS = 8.0
"""Logits-sized tensors the last stage holds for the loss (see ``stage_fixed_bytes``)."""


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
