"""How a rank's process ends: its process groups destroyed, then no interpreter finalization.

A rank whose work is done can still die with "terminate called without an active exception"
(SIGABRT) while the interpreter is torn down: gloo's C++ worker threads, and the process groups that
DeepSpeed's engines and module globals keep alive, are then destroyed in whatever order finalization
reaches them, and the launcher reports the finished rank as a failed job. Two measures:

- ``destroy_at_exit`` (registered with ``atexit`` by ``init_distributed``) destroys the process
  groups while the interpreter is still whole. That covers any exit, including an error's.
- ``exit_rank`` ends a launched entry point that returned: it runs the exit handlers (the teardown
  above, h5py closing its files, ...), flushes the standard streams and leaves with ``os._exit``, so
  the objects that still hold gloo state are never finalized. Everything a run writes (checkpoints,
  metrics, plots) is complete on disk before its entry point returns, so nothing is lost by that.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

import torch

EXIT_TEARDOWN_S = 30.0  # bound on the teardown below; it never waits on peers, so this is only a guard


def destroy_at_exit() -> None:
    """Destroy the process groups while the interpreter is still whole.

    Destroying a gloo group is local (no collective), so a peer that already exited does not block
    it; the timer only guards against a wedged transport keeping a finished rank alive.
    """
    if not torch.distributed.is_initialized():
        return
    guard = threading.Timer(EXIT_TEARDOWN_S, _teardown_hung)
    guard.daemon = True
    guard.start()
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - a half-torn-down group at exit must not turn success into failure
        pass
    finally:
        guard.cancel()


def _teardown_hung() -> None:
    os.write(2, f"error: process-group teardown at exit took over {EXIT_TEARDOWN_S:g} s; exiting\n".encode())
    os._exit(1)


def exit_rank(code: int | None) -> NoReturn:
    """End this process with ``code`` (an entry point's return value; None is 0) without finalization."""
    atexit._run_exitfuncs()  # what a normal exit would run first, in the same (last in, first out) order
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to save
            pass
    os._exit(0 if code is None else code)
