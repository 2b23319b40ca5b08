"""Sliding-window inference of many volumes through a PipelineEngine, all ranks in lockstep.

Used by validation during training and by ``predict --pipelined``. ``eval_batch`` holds a
whole-world barrier and point-to-point sends between stages, so every rank of the job must make the
same number of calls. Volumes are split over the data-parallel replicas; every rank knows every
volume's shape (from the manifest, or a preprocessed header), so every rank derives the same window
plan, and replicas with fewer windows make idle calls up to the busiest replica's count. The first
stage cuts the windows from the image; middle stages pass activations; the last stage accumulates
probabilities and hands each finished volume to its callback.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from ds_seg3d.inference.sliding_window import (
    WindowAccumulator,
    flip_windows,
    mirror_combinations,
    window_batches,
    window_starts,
)


class PipelinedForward:
    """``forward(windows, count)`` -> logits on the last stage (None elsewhere), <= micro_batch windows a call."""

    def __init__(self, engine, micro_batch: int, window: tuple[int, ...], in_channels: int = 1):
        self.engine = engine
        self.micro_batch = micro_batch
        self.window = tuple(window)
        self.in_channels = in_channels

    def __enter__(self) -> "PipelinedForward":
        # Training cached the activation shapes of training patches; windows may differ.
        self.engine.reset_activation_shape()
        # eval_batch logs an eval loss to the monitor from rank 0, which has none without a loss.
        self._monitor = self.engine.monitor.enabled
        self.engine.monitor.enabled = False
        return self

    def __exit__(self, *exc) -> None:
        self.engine.monitor.enabled = self._monitor
        self.engine.reset_activation_shape()

    def _blank(self) -> torch.Tensor:
        return torch.zeros((self.micro_batch, self.in_channels) + self.window)

    def forward(self, windows: torch.Tensor | None, count: int) -> torch.Tensor | None:
        """Run one micro-batch of ``count`` real windows (padded up to the micro-batch).

        ``windows`` matters only on the first stage; the last stage returns ``count`` logits.
        """
        if count > self.micro_batch:
            raise ValueError(f"{count} windows exceed the micro-batch of {self.micro_batch}")
        batch = self._blank()
        if windows is not None and self.engine.is_first_stage():
            batch[: windows.shape[0]] = windows
        dummy_labels = torch.zeros((self.micro_batch,) + self.window, dtype=torch.long)
        self.engine.total_loss = None  # eval_batch adds every output to the last training loss
        out = self.engine.eval_batch(iter([(batch, dummy_labels)]), compute_loss=False, reduce_output=None,
                                     bcast_loss=False, num_micro_batches=1)
        self.engine.total_loss = None
        if not self.engine.is_last_stage():
            return None
        logits = out[0] if isinstance(out, (list, tuple)) else out
        return logits[:count]

    def idle(self) -> None:
        """A call whose result nobody uses, to keep this replica in step with busier ones."""
        self.forward(None, 0)


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
                        on_progress: Callable[[], None] = lambda: None, mirror_axes: Sequence[int] = ()) -> None:
    """Predict ``volumes[dp_rank::dp_size]`` on this replica; every rank of the job must call this.

    ``on_progress`` is called after every ``eval_batch`` (e.g. to pet a watchdog). With ``mirror_axes``
    every window batch runs once per flip (first stage flips, last stage flips back and averages).
    """
    combos = mirror_combinations(mirror_axes)
    calls = [len(combos) * sum(planned_calls(v.shape, roi, overlap, micro_batch) for v in volumes[r::dp_size])
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
                total = None
                for combo in combos:
                    logits = fwd.forward(flip_windows(windows, combo) if first else None, len(batch_starts))
                    made += 1
                    on_progress()
                    if last:
                        logits = flip_windows(logits, combo).float()
                        total = logits if total is None else total + logits
                if last:
                    acc.add(batch_starts, total / len(combos))
            if last:
                vol.done(acc.result())
        for _ in range(max(calls) - made):
            fwd.idle()
            on_progress()
