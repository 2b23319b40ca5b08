"""Sliding-window inference of many volumes through a PipelineEngine, all ranks in lockstep.

Used by validation during training and by ``predict --pipelined``. Volumes are split over the
data-parallel replicas; every rank knows every volume's shape, so every rank derives the same window
plan, and replicas with fewer windows make idle calls until all have made the same number of
``eval_batch`` calls (it holds a whole-world barrier). The first stage cuts the windows from the
image; the last stage accumulates probabilities and hands each finished volume to its callback.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from ds_seg3d.inference import WindowAccumulator, window_batches, window_starts
from ds_seg3d.parallel.pipelined_eval import PipelinedForward


@dataclasses.dataclass
class Volume:
    shape: tuple[int, int, int]
    """Spatial shape of the (preprocessed) volume; known on every rank."""
    image: Callable[[], torch.Tensor]
    """Returns the (C, X, Y, Z) image; called on the first stage only."""
    done: Callable[[torch.Tensor], None]
    """Receives the (K, X, Y, Z) probabilities; called on the last stage only."""


def _starts(shape: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    return window_starts([max(s, r) for s, r in zip(shape, roi)], roi, overlap)


def planned_calls(shape: Sequence[int], roi: Sequence[int], overlap: float, micro_batch: int) -> int:
    return math.ceil(len(_starts(shape, roi, overlap)) / micro_batch)


def predict_in_lockstep(engine, volumes: Sequence[Volume], *, dp_rank: int, dp_size: int,
                        roi: Sequence[int], micro_batch: int, overlap: float, num_classes: int,
                        on_progress: Callable[[], None] = lambda: None) -> None:
    """Predict ``volumes[dp_rank::dp_size]`` on this replica; every rank of the job must call this.

    ``on_progress`` is called after every ``eval_batch`` (e.g. to pet a watchdog).
    """
    calls = [sum(planned_calls(v.shape, roi, overlap, micro_batch) for v in volumes[r::dp_size])
             for r in range(dp_size)]
    first, last = engine.is_first_stage(), engine.is_last_stage()
    made = 0
    with PipelinedForward(engine, micro_batch, tuple(roi)) as fwd:
        for vol in volumes[dp_rank::dp_size]:
            if first:
                batches = window_batches(vol.image(), roi, micro_batch, overlap)
            else:
                starts = _starts(vol.shape, roi, overlap)
                batches = ((starts[i:i + micro_batch], None) for i in range(0, len(starts), micro_batch))
            acc = WindowAccumulator(vol.shape, num_classes, roi) if last else None
            for batch_starts, windows in batches:
                logits = fwd.forward(windows, len(batch_starts))
                made += 1
                on_progress()
                if last:
                    acc.add(batch_starts, logits)
            if last:
                vol.done(acc.result())
        for _ in range(max(calls) - made):
            fwd.idle()
            on_progress()
