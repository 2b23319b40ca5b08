"""Live tensor bytes of a run, counted op by op: on the meta device it costs no compute and no memory.

``LiveBytes`` is a ``TorchDispatchMode``: every op that runs inside it reports its outputs, and the
outputs whose storage is new (not one of the op's inputs: views and in-place results allocate
nothing) are added to a running total; a weak reference on each storage takes its bytes off when the
storage dies. That is the sum the CPU allocator's profiler events and CUDA's ``memory_allocated``
keep, with the same timing: a tensor is freed when its last reference goes, whether Python drops it
or autograd releases what it saved.

What it cannot see is memory a kernel allocates and frees inside one op (convolution and
normalisation workspaces). ``workspace`` maps an op's ``signature`` to those bytes, measured on the
real device (``ds_seg3d.memory.workspace``), and the peak adds them while that op runs.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def signature(func: Any, args: Any, kwargs: Any) -> Hashable:
    """What a kernel's workspace depends on: the op, its tensors' shapes, strides and dtypes, and its other
    arguments (stride, padding, which gradients to compute). The device is left out: a run on the meta
    device looks up what the same op measured on the real one."""
    def describe(x: Any) -> Hashable:
        if isinstance(x, Tensor):
            return (tuple(x.shape), tuple(x.stride()), x.dtype)
        if isinstance(x, (list, tuple)):
            return tuple(describe(v) for v in x)
        if isinstance(x, torch.device):
            return None
        return x if isinstance(x, Hashable) else repr(x)

    return (func, describe(args), tuple(sorted((k, describe(v)) for k, v in (kwargs or {}).items())))


class LiveBytes(TorchDispatchMode):
    """Running total and peak of the tensor bytes that ops allocate inside the mode.

    ``workspace``: transient bytes by op signature, added to the peak while the op runs.
    ``record``: keep every op's (name, signature) in ``ops``, in order.
    ``around``: a context manager factory wrapped around each op, given its index (the workspace
    calibration times each op on the real device with it).
    """

    def __init__(self, workspace: Mapping[Hashable, int] | None = None, record: bool = False,
                 around: Callable[[int], AbstractContextManager[Any]] | None = None) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.workspace = workspace or {}
        self._workspace_ops = {sig[0] for sig in self.workspace}  # type: ignore[index]
        self.ops: list[tuple[str, Hashable]] = []
        self.record = record
        self.around = around
        self._count = 0
        self._refs: dict[int, weakref.ref] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)

    def _track(self, out: Any, inputs: set[int]) -> None:
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._refs:
                continue
            nbytes = storage.nbytes()
            self.live += nbytes
            self._refs[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._freed(key, nbytes))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        before = self.live
        if self.around is not None:
            with self.around(self._count):
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        self._count += 1
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        self._track(out, inputs)
        if self.record:
            self.ops.append((str(func), signature(func, args, kwargs)))
        extra = self.workspace.get(signature(func, args, kwargs), 0) if func in self._workspace_ops else 0
        self.peak = max(self.peak, self.live, max(before, self.live) + extra)
        return out
