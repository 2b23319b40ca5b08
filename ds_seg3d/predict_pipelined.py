"""``predict --pipelined``: the same prediction as on one device, with the model split over the ranks.

Every rank preprocesses every input (cheap next to the network) so that all know the window plans;
inputs are split over data-parallel replicas; the last stage of each replica writes its outputs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from ds_seg3d import checkpoint as ckpt
from ds_seg3d.metrics import volumes_ml
from ds_seg3d.parallel.engines import init_distributed, initialize_pipeline
from ds_seg3d.parallel.pipeline import build_pipeline
from ds_seg3d.parallel.topology import Topology
from ds_seg3d.pipelined_inference import Volume, predict_in_lockstep
from ds_seg3d.predict import (model_from_run, output_name, prepare, preprocess_options, to_input_grid,
                              write_label, write_volumes)


def inference_ds_config(sw_batch: int, dp: int) -> dict:
    """No optimizer, no ZeRO: the engine only runs forward passes of ``sw_batch`` windows."""
    return {"train_micro_batch_size_per_gpu": sw_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": sw_batch * dp, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}


def run_pipelined(args: argparse.Namespace) -> int:
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    info = ckpt.read_run_info(args.checkpoint)
    tag = args.tag or ckpt.latest_tag(args.checkpoint)
    if tag is None:
        raise ValueError(f"{ckpt.checkpoint_root(args.checkpoint)}: no complete checkpoint")
    _, defs = model_from_run(info)
    topo = Topology(world, args.stages or world, args.sw_batch, 1).validate()
    module = build_pipeline(defs, topo, loss_fn=None, partition_method="parameters",
                            seed=info["experiment"]["train"]["seed"])
    engine = initialize_pipeline(module, inference_ds_config(args.sw_batch, topo.dp))
    engine.load_checkpoint(str(ckpt.checkpoint_root(args.checkpoint)), tag=tag, load_module_only=True,
                           load_optimizer_states=False, load_lr_scheduler_states=False)
    opts, labels = preprocess_options(info), info["labels"]
    roi = tuple(info["experiment"]["data"]["patch"])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def volume(path: Path) -> Volume:
        image, geometry, affine, header = prepare(path, opts)

        def finish(probs: torch.Tensor) -> None:
            label = to_input_grid(probs, geometry)
            write_label(label, affine, header, out_dir / output_name(path))
            vols = volumes_ml(label, affine, labels)
            rows.append({"case": output_name(path), **{f"{k}_ml": round(v, 3) for k, v in vols.items()}})
            print(f"{path.name}: " + ", ".join(f"{k} {v:.1f} mL" for k, v in vols.items()), flush=True)

        return Volume(tuple(image.shape[1:]), lambda: image, finish)

    predict_in_lockstep(engine, [volume(Path(p)) for p in args.inputs], dp_rank=topo.dp_rank_of(rank),
                        dp_size=topo.dp, roi=roi, micro_batch=args.sw_batch, overlap=args.overlap,
                        num_classes=len(labels))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        order = {output_name(Path(p)): i for i, p in enumerate(args.inputs)}
        every = sorted((r for part in gathered for r in part), key=lambda r: order[r["case"]])
        print(f"checkpoint {args.checkpoint} ({tag}) over {topo.stages} stages; "
              f"volumes: {write_volumes(every, out_dir)}", flush=True)
    dist.barrier()
    return 0
