"""Label NIfTI files with a trained run: ``ds-seg3d predict --checkpoint RUN --out DIR IN.nii.gz ...``.

Each input is preprocessed exactly as the shards were (RAS, target spacing, normalisation, body crop),
segmented by sliding windows with Gaussian blending, mapped back onto the input's own grid (undo crop,
resampling and reorientation) and written as ``DIR/<input name>`` with the input's affine and shape.
Volumes per label (mL) are printed and written to ``DIR/volumes.csv``.

On one device the pipeline checkpoint (any stage count) loads into the plain ``nn.Sequential``. For a
model too large for one device, launch the same module pipelined:
``deepspeed --num_gpus N --module ds_seg3d.inference.predict --pipelined --stages P --checkpoint RUN --out DIR ...``.
Pipelined, every rank preprocesses every input (cheap next to the network) so that all know the window
plans; inputs are split over data-parallel replicas and the last stage of each replica writes its outputs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ds_seg3d import checkpoint as ckpt
from ds_seg3d.data.errors import DataError
from ds_seg3d.inference.cases import (
    InputCase,
    keep_largest,
    mirror_axes,
    model_from_run,
    preprocess_options,
    write_volumes,
)
from ds_seg3d.inference.sliding_window import sliding_window_inference
from ds_seg3d.models.layers import build_sequential


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="NIfTI images (.nii or .nii.gz)")
    p.add_argument("--checkpoint", required=True, help="run folder (or a run folder's checkpoint tag with --tag)")
    p.add_argument("--out", required=True, help="output folder for label NIfTIs and volumes.csv")
    p.add_argument("--tag", help="checkpoint tag (default: latest)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    p.add_argument("--sw-batch", type=int, default=2, help="windows per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-mirror", action="store_true",
                   help="skip test-time mirroring (by default every window is also predicted flipped along each "
                        "axis, as nnU-Net does: 8 passes in 3D, 4 for the slice-wise network)")
    p.add_argument("--pipelined", action="store_true", help="run over the ranks of a deepspeed launch")
    p.add_argument("--stages", type=int, default=None, help="pipeline stages with --pipelined (default: all ranks)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)


def run_single(args: argparse.Namespace) -> int:
    info = ckpt.read_run_info(args.checkpoint)
    _, defs = model_from_run(info)
    model = build_sequential(defs)
    tag = ckpt.load_layers(model, args.checkpoint, args.tag)
    device = torch.device(args.device)
    model.to(device).eval()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"checkpoint {args.checkpoint} ({tag}), {len(args.inputs)} input(s) on {device}", flush=True)
    opts, labels = preprocess_options(info), info["labels"]
    roi = tuple(info["experiment"]["data"]["patch"])

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        return model(windows.to(device)).float().cpu()

    rows = []
    for path in args.inputs:
        case = InputCase.read(Path(path), opts)
        probs = sliding_window_inference(case.image, roi, args.sw_batch, predictor, overlap=args.overlap,
                                         num_classes=len(labels), progress=True,
                                         mirror_axes=() if args.no_mirror else mirror_axes(info))
        rows.append(case.finish(probs, out_dir, labels, keep_largest(info)))
    print(f"volumes: {write_volumes(rows, out_dir)}")
    return 0


def inference_ds_config(sw_batch: int, dp: int) -> dict:
    """No optimizer, no ZeRO: the engine only runs forward passes of ``sw_batch`` windows."""
    return {"train_micro_batch_size_per_gpu": sw_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": sw_batch * dp, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}


def run_pipelined(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ds_seg3d.inference.pipelined import Volume, predict_in_lockstep
    from ds_seg3d.parallel.engines import init_distributed, initialize_pipeline
    from ds_seg3d.parallel.pipeline import build_pipeline
    from ds_seg3d.parallel.topology import Topology

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
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def volume(path: Path) -> Volume:
        case = InputCase.read(path, opts)
        return Volume(tuple(case.image.shape[1:]), lambda: case.image,
                      lambda probs: rows.append(case.finish(probs, out_dir, labels, keep_largest(info))))

    predict_in_lockstep(engine, [volume(Path(p)) for p in args.inputs], dp_rank=topo.dp_rank_of(rank),
                        dp_size=topo.dp, roi=tuple(info["experiment"]["data"]["patch"]),
                        micro_batch=args.sw_batch, overlap=args.overlap, num_classes=len(labels),
                        mirror_axes=() if args.no_mirror else mirror_axes(info))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        order = {Path(p).name: i for i, p in enumerate(args.inputs)}
        every = sorted((r for part in gathered for r in part), key=lambda r: order[r["case"]])
        print(f"checkpoint {args.checkpoint} ({tag}) over {topo.stages} stages; "
              f"volumes: {write_volumes(every, out_dir)}", flush=True)
    dist.barrier()
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        for p in args.inputs:
            if not Path(p).is_file():
                raise DataError(p, "no such file")
        if not 0.0 <= args.overlap < 1.0:
            raise ValueError(f"--overlap must be in [0, 1), got {args.overlap}")
        return run_pipelined(args) if args.pipelined else run_single(args)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds_seg3d.inference.predict", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    from ds_seg3d.parallel.teardown import exit_rank

    exit_rank(main())  # skips interpreter finalization, where gloo state could abort the finished rank
