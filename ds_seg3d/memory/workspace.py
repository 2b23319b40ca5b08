"""Kernel workspace: what an op allocates and frees inside itself, measured once on the real device.

A run traced on the meta device (``ds_seg3d.memory.live_bytes``) sees every tensor an op returns but not
the buffers its kernel holds while it runs: on this CPU build a 3x3x3 convolution's backward holds up
to 48 activations' worth of them (the unfolded input of its weight gradient), a normalisation's backward
one more activation. They are a property of the op and its shapes, not of where the op sits in a
pipeline stage, so they are measured once per network: one forward and backward pass of the whole
network on each of two thin slabs of the patch (full X and Y, a few Z steps), with every op timed in its
own window (the profiler's allocation events on a CPU, the allocator's peak counter on a GPU). A kernel's
workspace is linear in Z for a fully convolutional network, so the two slabs give every op's line;
``KernelWorkspace.table(z)`` matches the ops to those of the same pass traced at depth ``z`` and returns
each op signature's bytes there, for the stage traces to add at that op.

X and Y stay whole because PyTorch picks CPU convolution kernels from batch x channels x X x Y
(``ConvParams::use_mkldnn``): oneDNN's kernels need a few activations of workspace, the unfolding
fallback tens, and a cube scaled down in every axis would measure the wrong one.
"""
from __future__ import annotations

import contextlib
import difflib
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch

from ds_seg3d.memory.live_bytes import LiveBytes
from ds_seg3d.memory.measurement import MEMORY_EVENT, _quiet_stderr, _window_peak
from ds_seg3d.memory.replay import StageKey, stage_replay
from ds_seg3d.models.layers import LayerDef

SLAB_STEPS = {torch.float32: (1, 2), torch.bfloat16: (2, 3)}
"""Z steps of the two calibration slabs, by precision. fp32 kernels are linear in Z from the first step
on. bf16 kernels on a CPU are not: oneDNN's bf16 kernels grow faster than linearly at small Z, so a line
through one and two steps falls short at 16; through two and three steps it is within a few per cent."""


class _CpuWindows:
    """Per-op windows on a CPU: a profiler range around each op, its allocation events read afterwards."""

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.count = 0

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        with _quiet_stderr():
            self.profiler.start()
        try:
            yield
        finally:
            with _quiet_stderr():
                self.profiler.stop()

    @contextlib.contextmanager
    def around(self, index: int) -> Iterator[None]:
        from torch.profiler import record_function

        self.count = max(self.count, index + 1)
        with record_function(f"ds_seg3d.op{index}"):
            yield

    def workspaces(self) -> list[int]:
        events = list(self.profiler.profiler.kineto_results.events())
        bounds = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name().startswith("ds_seg3d.op")}
        memory = sorted((e.start_ns(), e.nbytes()) for e in events
                        if e.name() == MEMORY_EVENT and e.device_type() == torch._C._autograd.DeviceType.CPU)
        out = []
        for i in range(self.count):
            w = _window_peak(memory, *bounds[f"ds_seg3d.op{i}"])
            out.append(max(0, w.peak - max(w.start, w.end)))
        return out


class _CudaWindows:
    """Per-op windows on a GPU: the caching allocator's peak counter, reset before each op."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ws: list[int] = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def around(self, index: int) -> Iterator[None]:
        torch.cuda.synchronize(self.device)
        start = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        torch.cuda.synchronize(self.device)
        end = torch.cuda.memory_allocated(self.device)
        self.ws.append(max(0, torch.cuda.max_memory_allocated(self.device) - max(start, end)))

    def workspaces(self) -> list[int]:
        return list(self.ws)


def whole_pass(defs: Sequence[LayerDef], sample_shape: Sequence[int], dtype: torch.dtype,
               device: str | torch.device, mode: LiveBytes | None = None, warm_up: bool = False) -> None:
    """One forward and backward pass of the whole network with the stages' loss, as one stage of the
    unpipelined engine runs it (``mode`` around the measured pass)."""
    key = StageKey(0, len(defs), 1, 0, 1, 0, plain=True)
    with stage_replay(defs, key, sample_shape, dtype, device) as replay:
        if warm_up:  # lazily created kernel state (oneDNN primitives) is not the op's workspace
            replay.run_plain(1)
        with mode if mode is not None else contextlib.nullcontext():
            replay.run_plain(1)


def measure(defs: Sequence[LayerDef], sample_shape: Sequence[int], dtype: torch.dtype,
            device: str | torch.device) -> list[tuple[str, int]]:
    """(op name, workspace bytes) of every op of one whole pass on the real device, in order."""
    device = torch.device(device)
    windows: Any = _CudaWindows(device) if device.type == "cuda" else _CpuWindows()
    mode = LiveBytes(record=True, around=windows.around)
    with windows.recording():
        whole_pass(defs, sample_shape, dtype, device, mode, warm_up=True)
    return [(name, ws) for (name, _), ws in zip(mode.ops, windows.workspaces())]


def _matches(a: Sequence[str], b: Sequence[str]) -> dict[int, int]:
    """Positions of ``a`` matched to positions of ``b`` by op name: the same program on another device
    or depth runs the same ops, but the meta device takes a few other paths (``one_hot`` cannot read
    the labels there), so the two lists are aligned rather than zipped."""
    out = {}
    for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            out[block.a + k] = block.b + k
    return out


class KernelWorkspace:
    """Every op's workspace in one whole pass, measured on two slabs and extrapolated to any depth."""

    def __init__(self, defs: Sequence[LayerDef], sample_shape: Sequence[int], z_step: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu", slab_steps: Sequence[int] | None = None) -> None:
        self.defs, self.shape = list(defs), tuple(sample_shape)
        self.dtype, self.device = dtype, torch.device(device)
        steps = SLAB_STEPS.get(dtype, SLAB_STEPS[torch.float32]) if slab_steps is None else slab_steps
        self.slabs = tuple(sorted({z_step * k for k in steps}))
        self._measured: list[list[tuple[str, int]]] | None = None
        self._tables: dict[int, dict[Hashable, int]] = {}

    def measured(self) -> list[list[tuple[str, int]]]:
        if self._measured is None:
            self._measured = [measure(self.defs, (*self.shape[:-1], z), self.dtype, self.device)
                              for z in self.slabs]
        return self._measured

    def table(self, z: int) -> dict[Hashable, int]:
        """Workspace bytes by op signature for a patch of depth ``z``."""
        if z not in self._tables:
            runs = self.measured()
            mode = LiveBytes(record=True)
            whole_pass(self.defs, (*self.shape[:-1], z), self.dtype, "meta", mode)
            traced = [name for name, _ in mode.ops]
            first = _matches([name for name, _ in runs[0]], traced)
            others = [_matches([name for name, _ in run], [name for name, _ in runs[0]]) for run in runs[1:]]
            reverse = [{v: k for k, v in m.items()} for m in others]
            table: dict[Hashable, int] = {}
            for i, j in first.items():
                points = [(self.slabs[0], runs[0][i][1])]
                for slab, run, back in zip(self.slabs[1:], runs[1:], reverse):
                    if i in back:
                        points.append((slab, run[back[i]][1]))
                ws = _extrapolate(points, z)
                if ws > 0:
                    sig = mode.ops[j][1]
                    table[sig] = max(table.get(sig, 0), ws)
            self._tables[z] = table
        return self._tables[z]


def _extrapolate(points: Sequence[tuple[int, int]], z: int) -> int:
    """The line through the last two (depth, bytes) points at ``z`` (one point: proportional), never
    below zero."""
    if len(points) == 1:
        (z0, v0), = points
        return max(0, round(v0 * z / z0))
    (z0, v0), (z1, v1) = points[-2:]
    return max(0, round(v1 + (v1 - v0) / (z1 - z0) * (z - z1)))
