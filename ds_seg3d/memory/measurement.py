"""Per-rank peak memory of a training step, measured the same way on every point of a sweep.

On a GPU the caching allocator counts for us: ``reset_peak_memory_stats`` before the step and
``max_memory_allocated`` after. A CPU has no such counter, and RSS is the wrong quantity (it holds
the framework, freed-but-cached pages, and allocations never touched), so on CPU the peak is the
largest running sum of tensor allocations minus frees that ``torch.profiler`` records with
``profile_memory=True``. The profiler is started before the model is built, so parameters,
optimizer states, DeepSpeed's buffers and activations are all in that sum, the way
``memory_allocated`` counts them on a GPU. The profiler only sees allocations made on threads it
watches, which is where CPU autograd and gloo's send/recv buffers allocate: the calling thread.

Model-state bytes (parameters, gradients, optimizer states) are counted by unique storages, and
RSS is reported only as the rise above the rank's own post-initialise baseline.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

CPU_METHOD = "torch.profiler live tensor bytes"
CUDA_METHOD = "cuda.max_memory_allocated"
MEMORY_EVENT = "[memory]"


@dataclass(frozen=True)
class WindowPeak:
    """Live tensor bytes of one measured window (e.g. one training step)."""

    peak: int
    """Largest live total inside the window."""
    start: int
    """Live total when the window opened (what persists between steps)."""
    end: int
    """Live total when it closed."""
    method: str


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 inside the block: the CPU build of torch.profiler prints a ``USDT:`` line
    from C++ at every start and stop, which would land between a progress bar's updates."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class PeakTracker:
    """Peak live tensor bytes of named windows: the GPU allocator's counters, or the profiler on CPU.

    Usage: ``start()`` before the model exists, ``with tracker.window("step"): ...`` around what to
    measure, ``stop()``, then ``result("step")``.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.method = CUDA_METHOD if self.cuda else CPU_METHOD
        self._profiler: Any = None
        self._results: dict[str, WindowPeak] = {}
        self._windows: list[str] = []

    def start(self) -> PeakTracker:
        if not self.cuda:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with _quiet_stderr():
                self._profiler.start()
        return self

    @contextlib.contextmanager
    def window(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self._results[name] = WindowPeak(torch.cuda.max_memory_allocated(self.device), start,
                                             torch.cuda.memory_allocated(self.device), self.method)
            return
        from torch.profiler import record_function

        if self._profiler is None:
            raise RuntimeError("PeakTracker.window() before start()")
        self._windows.append(name)
        with record_function(name):
            yield

    def stop(self) -> None:
        if self._profiler is None:
            return
        with _quiet_stderr():
            self._profiler.stop()
        events = list(self._profiler.profiler.kineto_results.events())
        self._profiler = None
        bounds = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name() in self._windows}
        memory = sorted((e.start_ns(), e.nbytes()) for e in events
                        if e.name() == MEMORY_EVENT and e.device_type() == torch._C._autograd.DeviceType.CPU)
        for name in self._windows:
            if name not in bounds:
                raise RuntimeError(f"the profiler recorded no window named {name!r}")
            self._results[name] = _window_peak(memory, *bounds[name])

    def result(self, name: str) -> WindowPeak:
        if name not in self._results:
            raise KeyError(f"no measured window {name!r} (call stop() first on CPU)")
        return self._results[name]


def _window_peak(memory: list[tuple[int, int]], t0: int, t1: int) -> WindowPeak:
    """Running sum of allocation events; its maximum between t0 and t1."""
    live, start, peak = 0, None, None
    for t, nbytes in memory:
        if t > t1:
            break
        if t >= t0 and start is None:
            start = peak = live
        live += nbytes
        if t >= t0:
            peak = max(peak, live)
    if start is None:  # nothing allocated or freed inside the window
        start = peak = live
    return WindowPeak(int(peak), int(start), int(live), CPU_METHOD)


# ---------------------------------------------------------------- model states


def unique_storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one flat buffer count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes():
            seen.setdefault((str(t.device), storage.data_ptr()), storage.nbytes())
    return sum(seen.values())


def _walk(obj: Any, out: list[Tensor], depth: int, seen: set[int]) -> None:
    if depth < 0 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _walk(key, out, depth - 1, seen)
            _walk(value, out, depth - 1, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _walk(value, out, depth - 1, seen)
    elif isinstance(obj, torch.optim.Optimizer):
        _walk(obj.state, out, depth - 1, seen)
        _walk(obj.param_groups, out, depth - 1, seen)


def state_tensors(module: torch.nn.Module, optimizer: Any) -> list[Tensor]:
    """Parameters, their gradients, buffers, and the tensors an optimizer (or ZeRO wrapper) holds.

    A DeepSpeed ZeRO or bf16 optimizer keeps flat parameter copies and fp32 partitions as lists
    in its attributes and the torch optimizer (Adam moments) inside; its communication buckets
    live in helper objects, which are not walked: they are buffers, not states.
    """
    tensors: list[Tensor] = []
    for p in module.parameters():
        tensors.append(p)
        if p.grad is not None:
            tensors.append(p.grad)
    tensors.extend(module.buffers())
    if optimizer is not None:
        seen: set[int] = set()
        if isinstance(optimizer, torch.optim.Optimizer):
            _walk(optimizer, tensors, 6, seen)
        else:
            for value in vars(optimizer).values():
                _walk(value, tensors, 6, seen)
    return tensors


# ---------------------------------------------------------------- resident set size


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size (Linux), or None where /proc is unavailable."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Highest resident set size since start or since ``reset_peak_rss()``."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS counter (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))
