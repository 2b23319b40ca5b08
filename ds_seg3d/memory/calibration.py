"""Activation memory of one pipeline stage at the full patch, from DeepSpeed's schedule replayed for it.

``StageCalibrator`` answers (peak, at rest) for a stage (``replay.StageKey``) and a patch depth Z: the
peak live bytes of a steady training step (held micro-batches, pipe buffers, the backward working set)
and what the stage keeps between steps, both relative to the stage's weights and received input.

- On a CPU, where a replay of real kernels at a planning-size patch takes seconds, each stage is traced
  on the meta device at the full patch (``replay.traced_peak``) and every kernel's workspace comes from
  one whole pass measured on two thin slabs (``workspace.KernelWorkspace``). One calibration per network
  and precision, then a fraction of a second per stage, whatever the patch.
- On a GPU, real replays take milliseconds: each stage is replayed on two slabs (full X and Y, a few Z
  steps) and extrapolated linearly in Z, with the allocator's own peak counter.

Stages of different layouts that hold the same micro-batches share one replay (``replay.canonical_key``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ds_seg3d.memory.replay import StageKey, canonical_key, replay_peak, traced_peak
from ds_seg3d.memory.workspace import SLAB_STEPS, KernelWorkspace, _extrapolate
from ds_seg3d.models.layers import LayerDef


class StageCalibrator:
    """(peak, at rest) bytes of any stage of one network at any Z for one X, Y, micro-batch and precision."""

    def __init__(self, defs: Sequence[LayerDef], sample_shape: Sequence[int], z_step: int, dtype: torch.dtype,
                 classes: int, device: str | torch.device = "cpu", slab_steps: Sequence[int] | None = None,
                 traced: bool | None = None) -> None:
        self.defs, self.shape = list(defs), tuple(sample_shape)
        self.dtype, self.classes, self.device = dtype, classes, torch.device(device)
        self.traced = self.device.type == "cpu" if traced is None else traced
        """Trace stages on the meta device (default on a CPU) rather than replay them on slabs."""
        self.workspace = KernelWorkspace(defs, sample_shape, z_step, dtype, self.device, slab_steps)
        self.slabs = self.workspace.slabs
        self._cache: dict[tuple[StageKey, int], tuple[int, int]] = {}
        self.replays = 0
        """Stage replays run (traced or on slabs), for the planner's summary."""

    @property
    def method(self) -> str:
        x, y = self.shape[2:4]
        slabs = ", ".join(f"{x}x{y}x{z}" for z in self.slabs)
        if self.traced:
            return f"stages traced on the meta device at the full patch, kernel workspaces measured on {slabs}"
        return f"stages replayed on {slabs} and extrapolated in Z"

    def __call__(self, key: StageKey, z: int) -> tuple[int, int]:
        key = canonical_key(key)
        cached = (key, z if self.traced else 0)
        if cached not in self._cache:
            self.replays += 1
            if self.traced:
                self._cache[cached] = traced_peak(self.defs, key, (*self.shape[:-1], z), self.dtype,
                                                  self.workspace.table(z))
            else:
                self._cache[cached] = self._slab_points(key)
        value = self._cache[cached]
        if self.traced:
            return value
        peaks, rests = value
        return _extrapolate(list(zip(self.slabs, peaks)), z), _extrapolate(list(zip(self.slabs, rests)), z)

    def _slab_points(self, key: StageKey) -> tuple[tuple[int, ...], tuple[int, ...]]:
        points = [replay_peak(self.defs, key, (*self.shape[:-1], z), self.dtype, self.classes, self.device)
                  for z in self.slabs]
        return tuple(p[0] for p in points), tuple(p[1] for p in points)


__all__ = ["SLAB_STEPS", "StageCalibrator", "StageKey"]
