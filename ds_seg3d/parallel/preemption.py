"""Preemption: a signal to any rank, or the end of the launcher, makes every rank finish its current step,
save a checkpoint together and exit with one status.

Schedulers end jobs with a signal (SIGTERM; SLURM can send e.g. SIGUSR1 some time before the limit).
Each rank only notes a signal in its handler; after every step one all-reduce of a single number tells
every rank whether any of them was asked to stop, so they all stop after the same step. What reaches a
rank depends on where the signal went:

- to the job's process group (Ctrl-C, SLURM's default): every rank gets it, and DeepSpeed's per-node
  launcher forwards a SIGTERM of its own a moment later; a second signal within ``REPEAT_S`` of the
  first is that echo and is ignored;
- to one rank, or to a node's launcher (which forwards SIGTERM to its ranks): as above;
- to the ``deepspeed`` command alone on a single node: it dies without telling anyone, so each rank
  also watches the process that started its launcher and counts its end as a request to stop.

The launcher that received a signal kills its ranks 30 s after forwarding it, so the step in progress
and the save must fit in 30 s (measured in the README). A second signal more than ``REPEAT_S`` after the
first, while the checkpoint is being written, ends the rank at once: ``latest`` is renamed into place only
after every rank has written and hashed its files, so it still names the previous complete tag.
"""
from __future__ import annotations

import os
import signal
import time

import psutil
import torch
import torch.distributed as tdist
from deepspeed.accelerator import get_accelerator

EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: a checkpoint was saved, run again with --resume
DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
REPEAT_S = 2.0
LAUNCHER_ENDED = 255  # a pseudo signal number: the process that started this rank's launcher is gone
_RANKS = 1 << 16


def parse_signals(text: str) -> tuple[int, ...]:
    """``"TERM,USR1"`` or ``"SIGTERM,SIGUSR1"`` -> signal numbers; a one-line ValueError on an unknown name."""
    numbers = []
    for name in (n.strip().upper() for n in text.split(",") if n.strip()):
        name = name if name.startswith("SIG") else f"SIG{name}"
        if not hasattr(signal.Signals, name) or name in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"--preempt-signals: {name} is not a signal that can be caught")
        numbers.append(int(signal.Signals[name]))
    if not numbers:
        raise ValueError("--preempt-signals: no signal named")
    return tuple(numbers)


def signal_name(number: int) -> str:
    return "the end of the deepspeed launcher" if number == LAUNCHER_ENDED else signal.Signals(number).name


def _launcher_parent() -> psutil.Process | None:
    """The process that started this rank's DeepSpeed launcher (None when not started by one)."""
    try:
        launcher = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in " ".join(launcher.cmdline()):
            return None
        return launcher.parent()
    except psutil.Error:
        return None


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a dead process its parent has not reaped yet)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Preemption:
    """``install()`` before training; ``agreed(rank, world)`` after every step (a collective) returns
    (signal number, rank that got it) once any rank was asked to stop; wrap the final save in
    ``saving()`` / ``done()``."""

    def __init__(self, signals: tuple[int, ...], exit_code: int = EXIT_CODE):
        self.signals, self.exit_code = signals, exit_code
        self.signum: int | None = None
        self._first_at = 0.0
        self._saving = False
        self._watched = _launcher_parent()

    def install(self) -> "Preemption":
        for number in self.signals:
            signal.signal(number, self._handler)
        return self

    def _handler(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
        elif self._saving and now - self._first_at > REPEAT_S:
            os._exit(128 + signum)  # asked twice: stop now; ``latest`` still names a complete tag

    def _local(self) -> int | None:
        if self.signum is None and self._watched is not None and not _alive(self._watched):
            self.signum = LAUNCHER_ENDED
        return self.signum

    def agreed(self, rank: int, world: int) -> tuple[int, int] | None:
        """(signal, rank) of the stop request every rank agrees on, or None; every rank must call it."""
        mine = self._local()
        code = torch.tensor([0 if mine is None else mine * _RANKS + (_RANKS - 1 - rank)], dtype=torch.int64)
        if world > 1:
            on_device = code.to(get_accelerator().current_device_name())
            tdist.all_reduce(on_device, op=tdist.ReduceOp.MAX)
            code = on_device.cpu()
        value = int(code.item())
        if value == 0:
            return None
        return value // _RANKS, _RANKS - 1 - value % _RANKS

    def saving(self) -> None:
        self._saving = True

    def done(self) -> None:
        self._saving = False


def message(signum: int, rank: int, step: int, tag: str, save_s: float, exit_code: int) -> str:
    return (f"preempted: {signal_name(signum)} on rank {rank}; stopped after step {step} and saved checkpoint "
            f"{tag} in {save_s:.1f} s; exit status {exit_code}, continue with --resume")
