"""``ds-seg3d plan``: which stages, micro-batches, checkpointing and ZeRO stage fit a memory budget.

With a shard folder (``ds-seg3d plan SHARDS --budget-gb GB --ranks N``) it plans the dataset's networks
instead, nnU-Net's way, sized for the memory of the whole pipeline, and writes ``SHARDS/plans.json``
(``ds_seg3d.memory.sizing``). Without one:

Every candidate layout of ``--ranks`` ranks is predicted by ``MemoryModel`` (DeepSpeed's schedule for
each stage traced on the meta device at the full patch, with kernel workspaces measured once on thin
slabs; nothing runs at full size) and kept if every rank fits the budget.
The survivors are ranked by expected throughput: the 1F1B bubble leaves ``(p - 1) / (m + p - 1)``
of a step idle, and activation checkpointing repeats the forward pass (taken as a third of
forward + backward). Ties go to the smaller peak.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_seg3d.memory.spec import DEEPSPEED_BUCKET, RunSpec

RECOMPUTE_COST = 1 / 3
"""Extra compute of recomputing the forward pass, relative to one forward + backward."""
GIB = 2**30
LEGEND = ("held: activations x in-flight micro-batches (with checkpointing: checkpoint boundaries x in-flight); "
          "pipe buf: DeepSpeed's pipe, receive and gradient buffers kept between steps; working: backward working "
          "set and recomputation; params, grads, optim: model states under the ZeRO stage; buckets: ZeRO "
          "communication buffers; leftover: tensors the partition profile leaves alive")


@dataclass(frozen=True)
class Candidate:
    spec: RunSpec
    prediction: Any

    @property
    def bubble(self) -> float:
        p, m = self.spec.stages, self.spec.micro_batches
        return (p - 1) / (m + p - 1)

    @property
    def recompute(self) -> float:
        return RECOMPUTE_COST if self.spec.checkpoint else 0.0

    @property
    def throughput(self) -> float:
        """Share of the ranks' ideal throughput this layout keeps."""
        return (1 - self.bubble) / (1 + self.recompute)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(base: RunSpec, stages: list[int], micro_batches: list[int], checkpoints: list[int],
               partitions: list[str], zeros: list[int]) -> list[RunSpec]:
    """Every valid layout; the partition only matters with more than one stage."""
    out, seen = [], set()
    layers = len(base.layer_defs())
    for p in stages:
        if base.ranks % p or p > layers:
            continue
        for m in micro_batches:
            for ckpt in checkpoints:
                for method in (partitions if p > 1 else partitions[:1]):
                    for zero in zeros:
                        spec = base.with_(stages=p, micro_batches=m, checkpoint=ckpt, partition=method, zero=zero)
                        if spec not in seen:
                            seen.add(spec)
                            out.append(spec)
    return out


def plan(model: Any, budget: int, stages: list[int], micro_batches: list[int], checkpoints: list[int],
         partitions: list[str], zeros: list[int]) -> tuple[list[Candidate], list[Candidate]]:
    """(fitting candidates best first, the ones that do not fit) of ``model``'s (a ``MemoryModel``) network."""
    from tqdm import tqdm

    fit, over = [], []
    specs = candidates(model.base, stages, micro_batches, checkpoints, partitions, zeros)
    for spec in tqdm(specs, desc="predicting", unit="layout", file=sys.stderr):
        cand = Candidate(spec, model.predict(spec))
        (fit if cand.prediction.max_peak <= budget else over).append(cand)
    fit.sort(key=lambda c: (-c.throughput, c.prediction.max_peak))
    return fit, over


def _gib(n: float) -> str:
    return f"{n / GIB:.3g}"


def _size(n: float) -> str:
    from ds_seg3d.parallel.partition import format_bytes

    return format_bytes(n).replace(" ", "")


def describe(rank: int, cand: Candidate, budget: int) -> str:
    """A block of text: the layout, its expected throughput, and every stage's peak broken down."""
    s, pred = cand.spec, cand.prediction
    head = (f"#{rank}  stages={s.stages} dp={s.dp} micro-batches={s.micro_batches} "
            f"checkpoint={s.checkpoint or 'off'} zero={s.zero} partition={s.partition if s.stages > 1 else '-'} "
            f"boundaries={pred.boundaries}\n"
            f"    throughput {cand.throughput:.2f} of ideal (bubble {cand.bubble:.2f}, recompute +{cand.recompute:.2f}); "
            f"largest rank peak {_gib(pred.max_peak)} GiB of {_gib(budget)} GiB")
    cols = ("stage", "layers", "in-flight", "held", "pipe buf", "working", "params", "grads", "optim", "buckets",
            "leftover", "peak", "peak at")
    lines = [head, "    " + "  ".join(f"{c:>9}" for c in cols)]
    for st in pred.stages:
        b = st.states
        buckets = b.buckets_backward if st.phase == "backward" else b.buckets_reduce
        values = (st.stage, f"{st.start}-{st.stop - 1}", st.in_flight, *map(_size, (
            st.held, st.pipe_buffers, st.working, b.params, b.grads, b.optimizer, buckets, st.profile_leftover,
            st.peak)), st.phase)
        lines.append("    " + "  ".join(f"{v:>9}" for v in values))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", nargs="?", type=Path,
                   help="a shard folder: plan its 3D and 2D networks from its fingerprint and write plans.json")
    p.add_argument("--budget-gb", type=float, required=True, help="memory per device in GiB")
    p.add_argument("--model", choices=("unet3d", "deep_cnn", "cnn2d"),
                   help="network (default: the experiment's, else unet3d)")
    p.add_argument("--config", type=Path, help="experiment TOML for the model and patch (optional)")
    p.add_argument("--set", action="append", default=[], metavar="model.params.FIELD=VALUE",
                   help="network size, e.g. --set model.params.base_width=32")
    p.add_argument("--patch", type=int, nargs=3, metavar=("X", "Y", "Z"), help="training patch (default: the experiment's)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--ranks", type=int, default=1, help="ranks (devices) in the job")
    p.add_argument("--stages", type=int, nargs="+",
                   help="stage counts to consider (default: divisors of --ranks; with SHARDS: the one to size for, "
                        "default --ranks)")
    p.add_argument("--micro-batches", type=int, nargs="+",
                   help="micro-batches per step (default: 1 2 4 8; with SHARDS: the DeepSpeed config's accumulation)")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per micro-batch")
    p.add_argument("--checkpoint", type=int, nargs="+", default=[0, 1],
                   help="activation checkpointing intervals to consider (0: off)")
    p.add_argument("--partitions", nargs="+", default=["memory", "parameters"], choices=("memory", "parameters", "uniform"))
    p.add_argument("--zero", type=int, nargs="+", default=[1, 0], choices=(0, 1), help="ZeRO stages (pipeline: 0, 1)")
    p.add_argument("--deepspeed-config", type=Path, help="DeepSpeed JSON whose ZeRO bucket size to plan with")
    p.add_argument("--bucket", type=int, help="ZeRO reduce bucket in elements (overrides the JSON; default: the JSON's, else the shipped "
                        "pipeline config's)")
    p.add_argument("--classes", type=int, default=3, help="output classes, background included")
    p.add_argument("--device", default=None, help="device to calibrate on (default: cuda when available)")
    p.add_argument("--top", type=int, default=8, help="configurations to print")
    p.add_argument("--base-width", type=int, default=32,
                   help="with SHARDS: channels at full resolution (nnU-Net: 32; the caps scale with it)")
    p.add_argument("--no-deep-supervision", action="store_true", help="with SHARDS: plan without deep supervision")
    p.add_argument("--quick", action="store_true",
                   help="with SHARDS: size by the fast estimate alone, without the calibrated check")


def base_spec(args: argparse.Namespace) -> RunSpec:
    from ds_seg3d.config import PLANNED, load_config

    overrides = list(args.set) + ([f"model.name={args.model}"] if args.model else [])
    overrides += [f"data.patch={','.join(map(str, args.patch))}"] if args.patch else []
    cfg = load_config(args.config, overrides)
    if cfg.model.name == PLANNED:  # a network and patch given here, not by a shard folder's plan
        cfg.model.name = "cnn2d" if cfg.model.plan == "2d" else "unet3d"
    if args.patch is None and cfg.data.patch is None:
        raise ValueError("--patch: required without a shard folder (or an experiment config giving data.patch)")
    bucket = args.bucket
    if bucket is None:
        from ds_seg3d.memory.spec import config_bucket, shipped_bucket
        from ds_seg3d.parallel.ds_config import load_ds_config

        bucket = (config_bucket(load_ds_config(args.deepspeed_config)) if args.deepspeed_config is not None
                  else shipped_bucket())
    if args.ranks < 1:
        raise ValueError(f"--ranks must be >= 1, got {args.ranks}")
    return RunSpec(model=cfg.model.name, params=tuple(cfg.model.params.items()),
                   patch=tuple(args.patch) if args.patch else tuple(cfg.data.patch), ranks=args.ranks,
                   micro_batch=args.micro_batch, precision=args.precision, classes=args.classes,
                   bucket=int(bucket) if bucket is not None else DEEPSPEED_BUCKET)


def run_shards(args: argparse.Namespace) -> int:
    """Plan the shard folder's networks and write its plans.json."""
    import torch

    from ds_seg3d.memory.sizing import plan_shards
    from ds_seg3d.parallel.ds_config import load_ds_config
    from ds_seg3d.paths import DEFAULT_DS_CONFIG, shipped

    try:
        if args.micro_batches:
            micro = args.micro_batches[0]
        else:
            cfg = load_ds_config(args.deepspeed_config or shipped(DEFAULT_DS_CONFIG))
            micro = int(cfg.get("gradient_accumulation_steps", 1))
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        plans = plan_shards(args.shards, args.budget_gb, args.ranks, stages=args.stages[0] if args.stages else None,
                            micro_batches=micro, precision=args.precision, base_width=args.base_width,
                            deep_supervision=not args.no_deep_supervision, device=device, verify=not args.quick)
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    for plan in plans.configurations.values():
        print(plan.describe())
        for note in plan.notes:
            print(f"    - {note}")
    print(f"wrote {plans.save(args.shards)}")
    return 0


def _import_deepspeed_quietly() -> None:
    """DeepSpeed announces the accelerator it picked when first imported; the planner only borrows its
    schedule and partition helpers, so that line stays out of the plan's output."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import deepspeed  # noqa: F401


def run(args: argparse.Namespace) -> int:
    import torch

    _import_deepspeed_quietly()
    if args.shards is not None:
        return run_shards(args)
    args.micro_batches = args.micro_batches or [1, 2, 4, 8]
    try:
        base = base_spec(args)
        if args.budget_gb <= 0:
            raise ValueError(f"--budget-gb must be positive, got {args.budget_gb}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget = int(args.budget_gb * GIB)
    stages = args.stages or [d for d in range(1, args.ranks + 1) if args.ranks % d == 0]
    from ds_seg3d.memory.prediction import MemoryModel

    model = MemoryModel(base, device)
    fit, over = plan(model, budget, stages, args.micro_batches, args.checkpoint, args.partitions, args.zero)
    print(f"{base.model} {json.dumps(dict(base.params))}, patch {'x'.join(map(str, base.patch))}, "
          f"micro-batch {base.micro_batch}, {base.precision}, {base.ranks} ranks, budget {args.budget_gb:g} GiB, "
          f"ZeRO bucket {base.bucket_elements:,} elements")
    print(f"on {device}: {model.calibrator.method} ({model.calibrator.replays} stage replays); "
          f"{len(fit)} of {len(fit) + len(over)} layouts fit, best first.")
    print(LEGEND + "\n")
    for i, cand in enumerate(fit[: args.top], 1):
        print(describe(i, cand, budget) + "\n")
    if not fit:
        smallest = min(over, key=lambda c: c.prediction.max_peak, default=None)
        if smallest is not None:
            print(f"nothing fits; the smallest peak is {_gib(smallest.prediction.max_peak)} GiB:\n")
            print(describe(0, smallest, budget))
        return 1
    best = fit[0].prediction
    if any(st.states.buckets_reduce > st.activation_peak for st in best.stages):
        print(f"note: DeepSpeed's ZeRO bucket ({base.bucket_elements:,} elements) outweighs the activations; "
              "set zero_optimization.reduce_bucket_size to about the largest stage's parameter count "
              f"({max(st.param_count for st in best.stages):,}) to free it")
    return 0
