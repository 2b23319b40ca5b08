"""Where to cut a flat list of layers into pipeline stages so that no stage is the slow one.

Under 1F1B a step takes about ``(micro_batches + stages - 1) x`` the slowest stage's forward + backward
of one micro-batch, so the split that minimises the slowest stage is the fastest one. DeepSpeed
balances parameter counts or layer counts, which for a U-Net says little about time: the full
resolution layers hold few parameters and most of the work. ``layer_seconds`` times each layer's
forward and backward alone on one micro-batch, the way a stage runs them (its inputs as fresh leaves
that require grad, one backward over all of its floating outputs); ``time_partition`` picks the
contiguous split with the smallest largest stage sum (exact, ``partition.minimax_split``);
``balanced_partition`` does the same among the splits whose stages fit a memory budget, when both matter.

Timings differ from rank to rank, so one rank measures and the others receive its boundaries
(``build_pipeline`` does that). Pure torch.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ds_seg3d.parallel.layer_profile import LayerLike, LayerProfile
from ds_seg3d.parallel.partition import activation_cost, minimax_split


def _leaves(x: Any) -> Any:
    """What a stage receives: fresh leaves, float ones requiring grad."""
    if isinstance(x, torch.Tensor):
        return x.detach().requires_grad_(x.is_floating_point())
    return tuple(_leaves(t) for t in x)


def _floats(x: Any) -> list[torch.Tensor]:
    items = [x] if isinstance(x, torch.Tensor) else list(x)
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]


def layer_seconds(defs: Sequence[LayerLike], sample_shape: Sequence[int], repeats: int = 3, seed: int = 1234,
                  device: str | torch.device = "cpu") -> list[float]:
    """Median forward + backward seconds of each layer alone on one micro-batch of ``sample_shape``.

    The first pass is not timed (it creates the kernels' primitives); the global RNG is left alone.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [d.cls(*d.args, **d.kwargs).to(device).train() for d in defs]
        first = torch.randn(tuple(sample_shape), device=device)
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        runs = []
        for _ in range(repeats + 1):
            x, row = first, []
            for layer in layers:
                x = _leaves(x)
                sync()
                t0 = time.perf_counter()
                out = layer(x)
                outs = _floats(out)
                if outs:
                    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
                sync()
                row.append(time.perf_counter() - t0)
                layer.zero_grad(set_to_none=True)
                x = out
            runs.append(row)
    return [float(v) for v in np.median(np.array(runs[1:]), axis=0)]


def time_partition(seconds: Sequence[float], stages: int) -> list[int]:
    """Boundaries (``stages + 1`` indices) minimising the slowest stage's summed seconds."""
    prefix = [0.0]
    for s in seconds:
        prefix.append(prefix[-1] + s)
    return minimax_split(len(seconds), stages, lambda stage, a, b: prefix[b] - prefix[a])


MODEL_STATE_COPIES = 5
"""Bytes of model state per parameter byte in the balanced split's budget check: weights, gradients, the
fp32 master copy ZeRO-1 keeps (a clone even in fp32) and Adam's two moments (the planner, ``ds-seg3d
plan``, predicts the engine's exact peak)."""


AUTO_SLACK = 1.25
"""Without a memory budget, ``partition = "auto"`` takes the fastest split whose largest stage needs at most
this much more than the least any split needs: a quarter more memory for a balanced pipeline."""


def balanced_partition(seconds: Sequence[float], profile: Sequence[LayerProfile], stages: int,
                       micro_batches: int, budget_bytes: float | None, strict: bool = True) -> list[int]:
    """Boundaries minimising the slowest stage's summed seconds among the splits whose every stage fits
    ``budget_bytes`` in the memory partition's cost model (activations of the in-flight micro-batches,
    pipe buffers, backward working set, loss) plus ``MODEL_STATE_COPIES`` x its parameter bytes.

    With a budget every split fits, this is ``time_partition``; with one only the least-memory split fits,
    it is that split. ``budget_bytes=None``: ``AUTO_SLACK`` x what the least-memory split needs. When no
    split fits, ``strict`` raises ``ValueError`` naming the smallest largest stage; otherwise the
    least-memory split is returned.
    """
    if len(seconds) != len(profile):
        raise ValueError(f"{len(seconds)} layer timings for {len(profile)} profiled layers")
    memory = activation_cost(profile, stages, micro_batches)
    params = [0]
    for p in profile:
        params.append(params[-1] + p.param_bytes)

    def stage_bytes(stage: int, a: int, b: int) -> float:
        return memory(stage, a, b) + MODEL_STATE_COPIES * (params[b] - params[a])

    least = minimax_split(len(seconds), stages, stage_bytes)
    need = max(stage_bytes(st, a, b) for st, (a, b) in enumerate(zip(least, least[1:])))
    budget = AUTO_SLACK * need if budget_bytes is None else budget_bytes
    prefix = [0.0]
    for t in seconds:
        prefix.append(prefix[-1] + t)

    def cost(st: int, a: int, b: int) -> float:
        return prefix[b] - prefix[a] if stage_bytes(st, a, b) <= budget else math.inf

    parts = minimax_split(len(seconds), stages, cost)
    spans = list(enumerate(zip(parts, parts[1:])))
    if not all(a < b for _, (a, b) in spans) or max(cost(st, a, b) for st, (a, b) in spans) == math.inf:
        if not strict:
            return least
        raise ValueError(f"no split into {stages} stages fits {budget / 2**30:.3g} GiB per rank: the smallest "
                         f"largest stage is {need / 2**30:.3g} GiB (split {least}); raise the budget, add stages or "
                         "use a smaller patch")
    return parts


def stage_seconds(seconds: Sequence[float], boundaries: Sequence[int]) -> list[float]:
    return [float(sum(seconds[a:b])) for a, b in zip(boundaries, boundaries[1:])]
