"""The rank roles of ``bench_training.py``, launched by it with the ``deepspeed`` launcher.

``--role single`` (1 rank): the single-stage PipelineEngine and a plain PyTorch loop of the same layers,
step by step in turn, then the stage timings of the candidate splits. ``--role pipe`` (2 ranks): the same
model as 2 stages, then the raw cost of moving one boundary's tensors both ways. Each role sweeps the
micro-batches per step m in interleaved rounds, so a neighbour's load burst hits every m alike, and
writes its result as JSON into ``--work`` for the driver.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from ds_seg3d.models import DeepCNNConfig, UNet3DConfig, as_tuple, build_layers, build_sequential  # noqa: E402
from ds_seg3d.parallel.timing import layer_seconds, time_partition  # noqa: E402
from ds_seg3d.training.losses import DiceCELoss  # noqa: E402

DS_CONFIG = ROOT / "ds_configs" / "pipeline_zero1_cpu_fp32.json"
PATCH, CLASSES, SEED, STAGES, MS = (64, 64, 32), 3, 1234, 2, (1, 2, 4, 8)
MODELS: dict[str, Any] = {
    "unet3d": UNet3DConfig(levels=4, base_width=16, max_width=128, convs_per_level=2, num_classes=CLASSES),
    "deep_cnn": DeepCNNConfig(depth=25, width=16, num_classes=CLASSES),
}
GROUP = {"ForwardPass": "compute", "BackwardPass": "compute", "SendActivation": "p2p", "RecvActivation": "p2p",
         "SendGrad": "p2p", "RecvGrad": "p2p", "OptimizerStep": "step", "ReduceGrads": "step",
         "ReduceTiedGrads": "step", "LoadMicroBatch": "other"}


def clock() -> tuple[float, float]:
    """Wall time and this thread's CPU time: their ratio is the share of a core the rank got."""
    return time.perf_counter(), time.thread_time()


# ---------------------------------------------------------------- rank side

def micro_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same seeded patches and labels on every rank and for both loops."""
    gen = torch.Generator().manual_seed(SEED)
    return [(torch.randn((1, 1, *PATCH), generator=gen), torch.randint(0, CLASSES, (1, *PATCH), generator=gen))
            for _ in range(n)]


def detached(x: Any, grad: bool) -> Any:
    """What a stage receives: fresh leaves that require grad, like DeepSpeed's pipe buffers."""
    return x.detach().requires_grad_(grad) if isinstance(x, torch.Tensor) else tuple(detached(t, grad) for t in x)


def stage_times(defs: list, parts: list[int], data: list, joint: bool, repeats: int = 3) -> tuple[list[float], int]:
    """Median forward+backward seconds of each stage alone, one micro-batch; and the tensors crossing cut 1.

    ``joint=False`` back-propagates a tuple output one tensor at a time with ``retain_graph``, as
    DeepSpeed 0.19.8's ``_exec_backward_pass`` does: graph shared by several outputs (a U-Net's
    encoder under its skips) is traversed once per output. ``joint=True`` is one autograd call.
    """
    model, loss_fn, (images, labels) = build_sequential(defs, seed=SEED), DiceCELoss(), data[0]
    runs, crossing = [], 1
    for _ in range(repeats + 1):  # the first pass creates the oneDNN primitives
        x, row = images, []
        for s, (a, b) in enumerate(zip(parts, parts[1:])):
            x = detached(x, grad=s > 0)
            t0 = time.perf_counter()
            out = model[a:b](x)
            if b == len(model):
                loss_fn(out, labels).backward()
                row.append(time.perf_counter() - t0)
            else:
                t1, outs = time.perf_counter(), as_tuple(out)
                grads, t2 = [torch.ones_like(o) for o in outs], time.perf_counter()
                if joint:
                    torch.autograd.backward(outs, grads)
                else:
                    for i, (o, g) in enumerate(zip(outs, grads)):
                        o.backward(g, retain_graph=i < len(outs) - 1)
                row.append(t1 - t0 + time.perf_counter() - t2)
                crossing = len(outs) if s == 0 else crossing
            x = out
        runs.append(row)
        model.zero_grad(set_to_none=True)
    return [float(v) for v in np.median(np.array(runs[1:]), axis=0)], crossing


def instrument(engine: Any) -> dict[str, list[float]]:
    """Wall and CPU seconds per pipe instruction, accumulated until cleared: where a step's time goes."""
    acc: dict[str, list[float]] = {}

    def timed(fn: Any, name: str) -> Any:
        def run(self: Any, **kwargs: Any) -> None:
            w0, c0 = clock()
            fn(self, **kwargs)
            w1, c1 = clock()
            tot = acc.setdefault(name, [0.0, 0.0])
            tot[0], tot[1] = tot[0] + w1 - w0, tot[1] + c1 - c0
        return run

    # the instance map: ds-seg3d's engine puts its joint backward there (joint_backward.install)
    engine._INSTRUCTION_MAP = {k: timed(v, k.__name__) for k, v in engine._INSTRUCTION_MAP.items()}
    return acc


def build_engine(name: str, stages: int, method: str, work: Path,
                 boundaries: list[int] | None = None) -> tuple[Any, dict, Any]:
    """The shipped ZeRO-1 config and seeded layers, built the way ``ds_seg3d.train`` builds them."""
    from deepspeed import comm as dist

    from ds_seg3d.parallel import (
        Topology,
        build_pipeline,
        fill_batch_fields,
        init_distributed,
        initialize_pipeline,
        load_ds_config,
    )

    init_distributed()
    topo = Topology(dist.get_world_size(), stages, micro_batch=1, grad_accum=MS[0])
    cfg = fill_batch_fields(load_ds_config(DS_CONFIG), topo)
    cfg["csv_monitor"].update(output_path=str(work / "monitor"), job_name=f"{name}_{stages}")
    module = build_pipeline(build_layers(name, MODELS[name]), topo, DiceCELoss(), partition_method=method, seed=SEED,
                            boundaries=boundaries)
    return initialize_pipeline(module, cfg), cfg, module


def ds_step(engine: Any, acc: dict, data: list, m: int) -> dict:
    """One ``train_batch`` of m micro-batches, split into compute, p2p, optimizer step and the rest."""
    engine.set_train_batch_size(m)  # micro-batch 1, dp 1: m micro-batches per step
    acc.clear()
    (w0, c0), loss, (w1, c1) = clock(), float(engine.train_batch(iter(data[:m]))), clock()
    parts = {g: sum(v[0] for k, v in acc.items() if GROUP.get(k) == g) for g in set(GROUP.values())}
    parts["other"] += w1 - w0 - sum(v[0] for v in acc.values())  # schedule, loss broadcast, monitor
    for g in ("compute", "p2p"):
        parts[g + "_cpu"] = sum(v[1] for k, v in acc.items() if GROUP.get(k) == g)
    return {"m": m, "s": w1 - w0, "cpu": c1 - c0, "loss": loss, "parts": parts}


def plain_step(model: Any, opt: Any, sched: Any, data: list, m: int, clip: float) -> dict:
    """What a user writes without DeepSpeed: accumulate m micro-batches, clip, step."""
    loss_fn, total, (w0, c0) = DiceCELoss(), 0.0, clock()
    for images, labels in data[:m]:
        loss = loss_fn(model(images), labels)
        (loss / m).backward()
        total += float(loss)
    w1, c1 = clock()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    w2, c2 = clock()
    return {"m": m, "s": w2 - w0, "cpu": c2 - c0, "loss": total / m,
            "parts": {"compute": w1 - w0, "compute_cpu": c1 - c0, "step": w2 - w1}}


def rounds(args: argparse.Namespace, work: Path, step: Callable[[int, int], list[dict]],
           ms: Sequence[int] = MS) -> list[dict]:
    """Warm-up steps at the smallest m (oneDNN primitives, buffers), then rounds visiting every m, reversed every
    other."""
    plan = [(ms[0], False)] * args.warmup + [(m, True) for r in range(args.rounds) for m in ms[::1 - 2 * (r % 2)]]
    out = []
    for i, (m, timed) in enumerate(plan):
        out += [rec for rec in step(m, i) if timed]
        if os.environ.get("RANK", "0") == "0":  # the driver's progress bar follows this file
            f = work / "progress"
            f.write_text(str(int(f.read_text() or 0) + 1) if f.exists() else "1")
    return out


def run_single(args: argparse.Namespace, work: Path) -> None:
    """1 rank: the engine and the plain loop step by step in turn (same noise), then the candidate splits' stages."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR
    from deepspeed.runtime.utils import partition_balanced, partition_uniform

    data, result = micro_batches(max(MS)), {}
    for name in args.models:
        defs = build_layers(name, MODELS[name])
        engine, cfg, _ = build_engine(name, 1, "uniform", work)
        acc, plain = instrument(engine), build_sequential(defs, seed=SEED)
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO-1 wraps the torch optimizer
        hp = {k: v for k, v in cfg["optimizer"]["params"].items() if k in ("lr", "betas", "eps", "weight_decay")}
        opt = type(base)(plain.parameters(), **hp)
        sched = WarmupCosineLR(opt, **cfg["scheduler"]["params"])

        def step(m: int, r: int) -> list[dict]:
            pair = [lambda: {"loop": "deepspeed", **ds_step(engine, acc, data, m)},
                    lambda: {"loop": "plain", **plain_step(plain, opt, sched, data, m, cfg["gradient_clipping"])}]
            return [f() for f in (pair if r % 2 == 0 else pair[::-1])]

        steps = rounds(args, work, step)
        counts = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in plain]
        seconds = layer_seconds(defs, (1, 1, *PATCH), seed=SEED)
        candidates = {"uniform": [int(b) for b in partition_uniform(len(defs), STAGES)],
                      "parameters": [int(b) for b in partition_balanced(counts, STAGES)],
                      "time": time_partition(seconds, STAGES)}
        timed: dict[str, dict] = {}
        for method, parts in candidates.items():
            same = next((t for t in timed.values() if t["parts"] == parts), None)
            t_ds, crossing = (same["ds"], same["crossing"]) if same else stage_times(defs, parts, data, joint=False)
            t_joint = same["joint"] if same else (stage_times(defs, parts, data, True)[0] if crossing > 1 else t_ds)
            timed[method] = {"parts": parts, "ds": t_ds, "joint": t_joint, "crossing": crossing}
        result[name] = {"steps": steps, "optimizer": type(base).__name__, "params": sum(counts), "candidates": timed,
                        "zbv_parts": time_partition(seconds, 2 * STAGES)}  # torch's V schedule: 2 stages a rank
        del engine, step
        gc.collect()  # DeepSpeed engines hold reference cycles; free one before building the next
    write_json(work / "single.json", result)


def ping_pong(tensors: list[torch.Tensor], rank: int, reps: int = 10) -> float:
    """Seconds to send a stage boundary's tensors and get same-sized gradients back, both ranks ready."""
    from deepspeed import comm as dist

    times = []
    for _ in range(reps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        for direction in (0, 1):
            for t in tensors:
                (dist.send if rank == direction else dist.recv)(t, 1 - rank)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def run_pipe(args: argparse.Namespace, work: Path) -> None:
    """2 ranks: the same steps as 2 stages, then the raw cost of moving one boundary's tensors both ways."""
    from deepspeed import comm as dist

    data, result = micro_batches(max(MS)), {}
    single = json.loads((work / "single.json").read_text())  # the split the single role timed, not a re-timing
    for name, method in zip(args.models, args.partitions):
        engine, _, module = build_engine(name, STAGES, method, work, single[name]["candidates"][method]["parts"])
        acc, parts = instrument(engine), [int(p) for p in module.parts]

        def step(m: int, r: int) -> list[dict]:
            dist.barrier()  # both ranks start the step together
            return [ds_step(engine, acc, data, m)]

        steps = rounds(args, work, step)
        with torch.no_grad():
            crossing = list(as_tuple(build_sequential(build_layers(name, MODELS[name])[:parts[1]])(data[0][0])))
        stage, ping = int(engine.stage_id), ping_pong(crossing, dist.get_rank())
        del engine, module, step
        gc.collect()  # DeepSpeed engines hold reference cycles; free one before building the next
        peak = measure_peak(lambda: build_engine(name, STAGES, method, work, parts)[0],
                            lambda e: ds_step(e, {}, data, max(MS)))
        result[name] = {"steps": steps, "stage": stage, "parts": parts, "method": method, "peak": peak,
                        "crossing_bytes": sum(t.numel() * t.element_size() for t in crossing), "ping_pong_s": ping}
    write_json(work / f"pipe_rank{dist.get_rank()}.json", result)
    dist.barrier()


def measure_peak(build: Callable[[], Any], step: Callable[[Any], Any]) -> int:
    """Peak live tensor bytes of one step, model states included: the profiler runs from before the build
    (``PeakTracker``, as ``bench memory`` measures a rank)."""
    from ds_seg3d.memory.measurement import PeakTracker

    tracker = PeakTracker("cpu").start()
    obj = build()
    step(obj)  # buffers and oneDNN primitives first, as in any later step
    with tracker.window("step"):
        step(obj)
    tracker.stop()
    del obj
    gc.collect()
    return tracker.result("step").peak


def write_json(path: Path, obj: Any) -> None:
    """Temp name, then rename: the driver never reads a half-written result."""
    path.with_name(path.name + ".tmp").write_text(json.dumps(obj))
    os.replace(path.with_name(path.name + ".tmp"), path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", choices=("single", "pipe"), required=True)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (each runs every m once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at m = 1 first")
    p.add_argument("--partitions", nargs="+", help="partition method per model (--role pipe)")
    p.add_argument("--work", type=Path, required=True, help="folder for the results and the progress count")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    (run_single if args.role == "single" else run_pipe)(args, args.work)
    return 0


if __name__ == "__main__":
    from ds_seg3d.parallel.teardown import exit_rank

    exit_rank(main())  # skips interpreter finalization, where gloo state could abort the finished rank
