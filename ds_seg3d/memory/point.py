"""One sweep point on real ranks: build the engine as training does, step once, measure one step.

Launched by ``ds_seg3d.memory.sweep`` as ``deepspeed --num_gpus N --module ds_seg3d.memory.point --spec JSON
--out DIR``. Each rank writes ``DIR/rank<r>.json``: its stage, the stage boundaries, the peak live
tensor bytes of the measured step (after one warm-up step, so every lazily allocated buffer exists),
what was live when that step began, model-state bytes by unique storages and the rise of RSS above
the post-initialise baseline. A rank that fails (out of memory included) writes its error instead.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from ds_seg3d.memory.measurement import (
    PeakTracker,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    state_tensors,
    unique_storage_bytes,
)
from ds_seg3d.memory.spec import RunSpec

SEED = 1234
STEP = "measured_step"
OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "DefaultCPUAllocator")


class MicroBatches:
    """Endless fresh (images, labels) micro-batches, like the patch sampler: float images, int64 labels.

    A class rather than a generator: a generator's frame would keep the last batch it yielded
    alive, and only what the engine itself holds should be measured.
    """

    def __init__(self, spec: RunSpec, device: torch.device) -> None:
        self.spec, self.device = spec, device
        self.gen = torch.Generator().manual_seed(SEED)

    def __iter__(self) -> MicroBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.spec.sample_shape
        images = torch.randn(shape, generator=self.gen).to(device=self.device, dtype=self.spec.dtype)
        labels = torch.randint(0, self.spec.classes, (shape[0], *shape[2:]), generator=self.gen).to(self.device)
        return images, labels


def build(spec: RunSpec) -> tuple[Any, torch.nn.Module, list[int], int]:
    """(engine, module, stage boundaries, this rank's stage), built the way ``ds_seg3d.train`` builds them."""
    from deepspeed import comm as dist

    from ds_seg3d.models.layers import build_sequential
    from ds_seg3d.parallel.engines import initialize_pipeline, initialize_plain
    from ds_seg3d.parallel.pipeline import build_pipeline
    from ds_seg3d.training.losses import DeepSupervisionLoss, DiceCELoss

    defs = spec.layer_defs()
    if spec.plain:
        model = build_sequential(defs, seed=SEED)
        engine = initialize_plain(model, spec.ds_config())
        return engine, model, [0, len(defs)], 0
    topo = spec.topology()
    module = build_pipeline(defs, topo, DeepSupervisionLoss(DiceCELoss()), partition_method=spec.partition,
                            sample_shape=spec.sample_shape, micro_batches=spec.micro_batches,
                            activation_checkpoint_interval=spec.checkpoint, seed=SEED)
    engine = initialize_pipeline(module, spec.ds_config())
    return engine, module, [int(b) for b in module.parts], topo.stage_of(dist.get_rank())


def plain_step(engine: Any, spec: RunSpec, data: MicroBatches) -> float:
    from ds_seg3d.training.losses import DeepSupervisionLoss, DiceCELoss

    loss_fn, total = DeepSupervisionLoss(DiceCELoss()), 0.0
    for _ in range(spec.micro_batches):
        images, labels = next(data)
        loss = loss_fn(engine(images), labels)
        engine.backward(loss)
        engine.step()
        total += float(loss)
    return total / spec.micro_batches


def measure(spec: RunSpec) -> dict[str, Any]:
    """Build, warm up, measure; the rank's record (without rank and status)."""
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().device_name(get_accelerator().current_device()))
    tracker = PeakTracker(device).start()
    engine, module, boundaries, stage = build(spec)
    gc.collect()  # start the measured steps from a collected heap
    data = MicroBatches(spec, device)
    step = (lambda: plain_step(engine, spec, data)) if spec.plain else (lambda: float(engine.train_batch(data)))
    rss_base = rss_bytes()
    step()  # warm-up: pipe buffers, ZeRO buckets and optimizer states come to life here
    dist.barrier()
    rss_reset = reset_peak_rss()
    rss_before = rss_bytes()
    with tracker.window(STEP):
        loss = step()
    rss_peak = peak_rss_bytes()
    tracker.stop()
    peak = tracker.result(STEP)
    rss_ref = rss_base if rss_base is not None else 0
    return {
        "stage": stage, "boundaries": boundaries, "loss": loss,
        "measured_peak_bytes": peak.peak, "step_start_bytes": peak.start, "step_end_bytes": peak.end,
        "method": peak.method,
        "state_bytes": unique_storage_bytes(state_tensors(module, engine.optimizer)),
        "rss_init_bytes": rss_base,
        "rss_peak_minus_init_bytes": (rss_peak - rss_ref) if rss_reset and rss_peak is not None else None,
        "rss_before_step_minus_init_bytes": (rss_before - rss_ref) if rss_before is not None else None,
        "device": str(device),
    }


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True, help="RunSpec as JSON")
    p.add_argument("--out", required=True, type=Path, help="folder for rank<r>.json")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = p.parse_args(argv)
    spec = RunSpec.from_json(args.spec)
    args.out.mkdir(parents=True, exist_ok=True)

    from ds_seg3d.parallel.engines import init_distributed

    init_distributed()
    rank = int(os.environ.get("RANK", "0"))
    try:
        record = {"rank": rank, "status": "ok", **measure(spec)}
    except Exception as err:  # recorded, not raised: the sweep goes on with the next point
        text = f"{type(err).__name__}: {err}"
        status = "oom" if any(m.lower() in text.lower() for m in OOM_MARKERS) else "error"
        write_json(args.out / f"rank{rank}.json", {"rank": rank, "status": status, "error": text.splitlines()[0][:400],
                                                   "traceback": traceback.format_exc()[-2000:]})
        print(f"error: rank {rank}: {text.splitlines()[0][:400]}", file=sys.stderr, flush=True)
        os._exit(3)  # peers may be blocked in a collective; do not wait for them
    write_json(args.out / f"rank{rank}.json", record)
    from deepspeed import comm as dist

    dist.barrier()
    return 0


if __name__ == "__main__":
    from ds_seg3d.parallel.teardown import exit_rank

    exit_rank(main())  # skips interpreter finalization, where gloo state could abort the finished rank
