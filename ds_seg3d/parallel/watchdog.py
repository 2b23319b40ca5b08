"""End a rank that makes no progress, so that one hung peer cannot hold a whole job for 30 minutes.

A rank that is stopped (SIGSTOP, a swapped-out or wedged host) keeps its sockets open, so its peers
wait inside a collective without any error. Collective timeouts do not bound that wait here:
DeepSpeed builds its pipeline and data-parallel groups with ``torch.distributed.new_group(ranks)``
and no timeout, and torch gives such groups its default (30 min for gloo, 10 min for NCCL) whatever
``deepspeed.init_distributed(timeout=...)`` or ``DEEPSPEED_TIMEOUT`` set for the world group.

So the training loop "pets" a watchdog after each unit of progress (a ``train_batch``, a validation,
a checkpoint), and a daemon thread ends the process when no pet came for the bound. Before its error
line it prints the innermost Python frames of the thread that created it (the training loop), which
name the collective or send/receive the rank was waiting in. It must be
``os._exit``: the main thread sits in C++ inside the collective (which releases the GIL, so this
thread still runs), an exception cannot reach it and ``sys.exit`` would only end this thread. The
DeepSpeed launcher then sees a non-zero exit and stops the node's other ranks, the job's ranks on
other nodes see closed connections (or their own watchdog fires) and pdsh returns non-zero.

The bound must exceed the slowest legitimate gap between pets (the first step after start-up, a
whole-volume validation, a checkpoint on a slow file system); ``DS_SEG3D_WATCHDOG_S`` or
``--watchdog-s`` sets it, 0 turns the watchdog off.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
import traceback

ENV = "DS_SEG3D_WATCHDOG_S"
DEFAULT_BOUND_S = 300.0
EXIT_CODE = 3  # distinct from argument errors (2) and from signals (128 + n)
STACK_FRAMES = 8  # of the watched thread, printed before the error line


def default_bound_s() -> float:
    """The bound from ``DS_SEG3D_WATCHDOG_S`` (seconds), else 5 minutes."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_BOUND_S
    try:
        return check_bound(float(raw))
    except ValueError:
        raise ValueError(f"{ENV}={raw!r}: not a number of seconds >= 0") from None


def check_bound(bound_s: float) -> float:
    if math.isnan(bound_s) or bound_s < 0:
        raise ValueError(f"watchdog bound {bound_s!r}: not a number of seconds >= 0")
    return float(bound_s)


def message(rank: int, bound_s: float) -> str:
    return f"error: rank {rank} made no progress for {bound_s:g} s (a peer rank hung or died); aborting"


class Watchdog:
    """``start()`` once the job makes regular progress, ``pet()`` after each unit, ``stop()`` at the end."""

    def __init__(self, bound_s: float, rank: int, exit_code: int = EXIT_CODE):
        self.bound_s = check_bound(bound_s)
        self.rank = rank
        self.exit_code = exit_code
        self._last = time.monotonic()
        self._watched = threading.get_ident()  # the thread that pets: the training loop's
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.bound_s > 0

    def start(self) -> Watchdog:
        self.pet()
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="ds_seg3d-watchdog", daemon=True)
            self._thread.start()
        return self

    def pet(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _watch(self) -> None:
        poll = min(1.0, self.bound_s / 10)  # fires at most a tenth of the bound (or 1 s) late
        while not self._stopped.wait(poll):
            if time.monotonic() - self._last > self.bound_s:
                # os.write: no Python-level lock that a blocked main thread could be holding.
                os.write(2, (where_stuck(self._watched, self.rank) + message(self.rank, self.bound_s) + "\n").encode())
                os._exit(self.exit_code)


def where_stuck(thread_id: int, rank: int, frames: int = STACK_FRAMES) -> str:
    """The innermost ``frames`` Python frames of the watched thread (where it waits: which collective or
    send/receive), as a traceback; empty when that thread has ended."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return ""
    return f"rank {rank} was waiting in (most recent call last):\n" + "".join(
        traceback.format_stack(frame, limit=frames))


def start(bound_s: float | None, rank: int) -> Watchdog:
    """A started watchdog (the default bound when ``bound_s`` is None; 0 gives one that never fires)."""
    return Watchdog(default_bound_s() if bound_s is None else bound_s, rank).start()
