"""Stop a diverged run at the step it diverged, on every rank, before it saves anything of that state.

After each ``train_batch`` every rank checks what it holds: the last stage its own loss (the one of its
data-parallel replica, before DeepSpeed averages the replicas), every stage its parameters after the
optimizer step (a non-finite gradient turns them non-finite; the loss would show it only one step
later, after a checkpoint of the bad weights). One all-reduce of a single number per step (the lowest
rank that found something, and what) tells every rank the same verdict, so all of them stop at the same
step and the job ends with one line and ``EXIT_CODE``.

With fp16, an overflowing step is skipped rather than applied (the weights stay finite and the loss
scale halves); ``SkippedSteps`` counts such steps in a row from the engine's running total, which every
rank sees alike (DeepSpeed agrees on the overflow across ranks), and a run that skips too many in a row
stops the same way.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist
from deepspeed.accelerator import get_accelerator

EXIT_CODE = 4  # distinct from argument errors (2), the watchdog (3) and signals (128 + n)
_WHAT = ("loss", "weights")


def _local_problem(engine, loss_is_mine: bool) -> int | None:
    """0: this rank's loss is not finite, 1: its parameters are not; None when both are fine."""
    if loss_is_mine:
        own = getattr(engine, "dp_group_loss", None)
        if own is not None and not bool(torch.isfinite(own).all()):
            return 0
    params = [p.detach() for p in engine.module.parameters()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        return 1
    return None


def first_problem(engine, rank: int, world: int, loss_is_mine: bool) -> tuple[int, str] | None:
    """The lowest rank whose loss or weights are not finite and which of the two, the same on every rank;
    None when every rank is fine. Every rank must call it after every step (it is a collective)."""
    kind = _local_problem(engine, loss_is_mine)
    code = torch.tensor([world * len(_WHAT) if kind is None else rank * len(_WHAT) + kind], dtype=torch.int64)
    if world > 1:
        on_device = code.to(get_accelerator().current_device_name())
        tdist.all_reduce(on_device, op=tdist.ReduceOp.MIN)
        code = on_device.cpu()
    worst = int(code.item())
    if worst >= world * len(_WHAT):
        return None
    return worst // len(_WHAT), _WHAT[worst % len(_WHAT)]


def message(step: int, rank: int, what: str, stage: int, last_good: str | None) -> str:
    return (f"error: step {step}: non-finite {what} on rank {rank} (stage {stage}); "
            f"last good checkpoint: {last_good or 'none'}")


class SkippedSteps:
    """Optimizer steps skipped in a row, from the engine's running total of skipped steps."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self._total, self.in_a_row = limit, total, 0

    def update(self, total: int) -> bool:
        """Feed the total after a step; True once ``limit`` steps in a row were skipped (never if 0)."""
        self.in_a_row = self.in_a_row + 1 if total > self._total else 0
        self._total = total
        return self.limit > 0 and self.in_a_row >= self.limit


def skipped_message(step: int, in_a_row: int, scale: float | None, last_good: str | None) -> str:
    at = f" (loss scale {scale:g})" if scale is not None else ""
    return (f"error: step {step}: {in_a_row} fp16 overflow steps skipped in a row{at}; "
            f"last good checkpoint: {last_good or 'none'}")
