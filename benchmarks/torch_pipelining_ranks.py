"""The pipeline a user would pick instead of DeepSpeed's: ``torch.distributed.pipelining``, 2 ranks.

Launched by ``bench_training.py`` with the ``deepspeed`` launcher after the single and pipe roles of
``training_ranks.py``. Each model runs the same seeded layers, the same split (the one the pipe role
used, read from ``single.json``), the same micro-batches and the same optimizer, clipping and schedule
as the DeepSpeed engine, on two schedules:

- ``1f1b``: ``PipelineStage`` + ``Schedule1F1B``, one stage per rank (torch refuses 1F1B with fewer
  micro-batches than stages; at m = 1 ``ScheduleGPipe`` runs, which is the same one forward and one
  backward);
- ``zbv``: ``ScheduleZBVZeroBubble``, 4 virtual stages in a V (rank 0 holds stages 0 and 3, rank 1
  stages 1 and 2), split by each layer's measured time (``ds_seg3d.parallel.timing``), backward split
  into input and weight gradients to fill the bubble. Its ``stage_backward_input`` detaches each stage
  output in place, which autograd refuses for views, so a stage returns copies of outputs that are views
  (pass-through skips; the copies are part of its time and memory). m >= 2.

Gradients are averaged over the m micro-batches (``scale_grads``, as DeepSpeed divides the loss by
the accumulation steps), clipped by the global norm over both ranks, then the optimizer and the
learning-rate schedule step. Per step: wall and thread CPU time, the schedule's share, the loss.
Then one step at the largest m under the profiler gives each rank's peak live tensor bytes, model
states included (``ds_seg3d.memory.measurement.PeakTracker``, as ``bench memory`` measures).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, Path(__file__).resolve().parent):  # run as a plain script from a checkout
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from training_ranks import (  # noqa: E402
    DS_CONFIG,
    MODELS,
    MS,
    SEED,
    STAGES,
    clock,
    measure_peak,
    micro_batches,
    rounds,
    write_json,
)

from ds_seg3d.models import build_layers  # noqa: E402
from ds_seg3d.training.losses import DiceCELoss  # noqa: E402

SCHEDULES = ("1f1b", "zbv")


class StageModule(torch.nn.Module):
    """Layers ``a:b`` of the list, seeded by global index as ``build_sequential`` and DeepSpeed seed them.

    ``torch.distributed.pipelining`` passes a tuple between stages as positional arguments; the layers
    take one argument, a tensor or a tuple, as in DeepSpeed's ``PipelineModule``.
    """

    def __init__(self, defs: list, a: int, b: int, copy_views: bool) -> None:
        super().__init__()
        layers = []
        for i in range(a, b):
            torch.manual_seed(SEED + i)
            layers.append(defs[i].build())
        self.layers, self.copy_views = torch.nn.Sequential(*layers), copy_views

    def forward(self, *xs: torch.Tensor) -> Any:
        out = self.layers(xs[0] if len(xs) == 1 else xs)
        if not self.copy_views:
            return out
        if isinstance(out, torch.Tensor):
            return out.clone() if out._is_view() else out
        return tuple(t.clone() if t._is_view() else t for t in out)


class TorchPipeline:
    """This rank's stages of one model on one schedule, with the optimizer and the schedule per m."""

    def __init__(self, name: str, schedule: str, parts: list[int], opt_name: str, cfg: dict) -> None:
        from deepspeed.runtime.lr_schedules import WarmupCosineLR
        from torch import distributed as tdist

        self.rank, self.kind, defs = tdist.get_rank(), schedule, build_layers(name, MODELS[name])
        self.num_stages = STAGES if schedule == "1f1b" else 2 * STAGES
        self.stage_ids = [self.rank] if schedule == "1f1b" else [self.rank, self.num_stages - 1 - self.rank]
        self.modules = [StageModule(defs, parts[i], parts[i + 1], copy_views=schedule == "zbv")
                        for i in self.stage_ids]
        params = [p for m in self.modules for p in m.parameters()]
        hp = {k: v for k, v in cfg["optimizer"]["params"].items() if k in ("lr", "betas", "eps", "weight_decay")}
        self.opt = getattr(torch.optim, opt_name)(params, **hp)
        self.lr = WarmupCosineLR(self.opt, **cfg["scheduler"]["params"])
        self.clip, self.params, self.loss_fn = float(cfg["gradient_clipping"]), params, DiceCELoss()
        self.holds_first = 0 in self.stage_ids
        self.holds_last = self.num_stages - 1 in self.stage_ids
        self._schedules: dict[int, Any] = {}

    def schedule(self, m: int) -> Any:
        """One schedule (and its stages' buffers) per m, built on first use."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleZBVZeroBubble

        if m not in self._schedules:
            stages = [PipelineStage(mod, i, self.num_stages, torch.device("cpu"))
                      for mod, i in zip(self.modules, self.stage_ids)]
            if self.kind == "zbv":
                self._schedules[m] = ScheduleZBVZeroBubble(stages, m, loss_fn=self.loss_fn)
            else:
                self._schedules[m] = (Schedule1F1B if m >= STAGES else ScheduleGPipe)(stages[0], m,
                                                                                       loss_fn=self.loss_fn)
        return self._schedules[m]

    def step(self, data: list, m: int) -> dict:
        """One optimizer step over m micro-batches."""
        from torch import distributed as tdist

        images, labels = torch.cat([d[0] for d in data[:m]]), torch.cat([d[1] for d in data[:m]])
        sched, losses = self.schedule(m), []
        (w0, c0) = clock()
        args = (images,) if self.holds_first else ()
        kwargs = {"target": labels, "losses": losses} if self.holds_last else {}
        sched.step(*args, **kwargs)
        w1, c1 = clock()
        sq = torch.zeros(1)
        for p in self.params:
            if p.grad is not None:
                sq += p.grad.pow(2).sum()
        tdist.all_reduce(sq)  # the global norm over both ranks' parameters, as DeepSpeed clips
        coef = self.clip / (float(sq.sqrt()) + 1e-6)
        if coef < 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.lr.step()
        w2, c2 = clock()
        loss = float(torch.stack([x.detach() for x in losses]).mean()) if losses else None
        return {"m": m, "s": w2 - w0, "cpu": c2 - c0, "loss": loss,
                "parts": {"schedule": w1 - w0, "schedule_cpu": c1 - c0, "step": w2 - w1}}


def barrier_steps(pipe: TorchPipeline, data: list) -> Any:
    """``rounds``' step function: both ranks start each step together."""
    from torch import distributed as tdist

    def step(m: int, r: int) -> list[dict]:
        tdist.barrier()
        return [pipe.step(data, m)]

    return step


def run_torch(args: argparse.Namespace, work: Path) -> None:
    """2 ranks: each model on 1F1B (the pipe role's split) and on ZBV, timed in interleaved rounds, then peaks."""
    from torch import distributed as tdist

    from ds_seg3d.parallel import init_distributed, load_ds_config

    init_distributed()
    data, result, cfg = micro_batches(max(MS)), {}, load_ds_config(DS_CONFIG)
    single = json.loads((work / "single.json").read_text())
    for name, method in zip(args.models, args.partitions):
        out: dict[str, Any] = {}
        for kind in SCHEDULES:
            parts = single[name]["candidates"][method]["parts"] if kind == "1f1b" else single[name]["zbv_parts"]
            ms = [m for m in MS if kind == "1f1b" or m >= STAGES]

            def make(name: str = name, kind: str = kind, parts: list[int] = parts) -> TorchPipeline:
                return TorchPipeline(name, kind, parts, single[name]["optimizer"], cfg)

            steps = rounds(args, work, barrier_steps(make(), data), ms)
            gc.collect()  # the timed pipeline is gone before the peak is measured on a fresh one
            peak = measure_peak(make, lambda p: p.step(data, max(MS)))
            out[kind] = {"parts": parts, "steps": steps, "peak": peak}
        result[name] = out
    write_json(work / f"torch_rank{tdist.get_rank()}.json", result)
    tdist.barrier()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (each runs every m once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the smallest m first")
    p.add_argument("--partitions", nargs="+", required=True, help="partition method per model (the pipe role's)")
    p.add_argument("--work", type=Path, required=True, help="folder with single.json; results and progress go here")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_torch(args, args.work)
    return 0


if __name__ == "__main__":
    from ds_seg3d.parallel.teardown import exit_rank

    exit_rank(main())  # skips interpreter finalization, where gloo state could abort the finished rank
