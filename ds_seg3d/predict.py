"""Label NIfTI files with a trained run: ``python -m ds_seg3d predict --checkpoint RUN --out DIR IN.nii.gz ...``.

Each input is preprocessed exactly as the shards were (RAS, target spacing, normalisation, body crop),
segmented by sliding windows with Gaussian blending, mapped back onto the input's own grid (undo crop,
resampling and reorientation) and written as ``DIR/<input name>`` with the input's affine and shape.
Volumes per label (mL) are printed and written to ``DIR/volumes.csv``.

On one device the pipeline checkpoint (any stage count) loads into the plain ``nn.Sequential``. For a
model too large for one device, launch the same module pipelined:
``deepspeed --num_gpus N --module ds_seg3d.predict --pipelined --stages P --checkpoint RUN --out DIR ...``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import torch

from data_tools.errors import DataError
from data_tools.preprocess import PreprocessOptions, load_image, preprocess_arrays
from ds_seg3d import checkpoint as ckpt
from ds_seg3d.data.geometry import to_original_grid
from ds_seg3d.inference import sliding_window_inference
from ds_seg3d.metrics import volumes_ml
from ds_seg3d.models import MODEL_CONFIGS, build_layers
from ds_seg3d.models.layers import build_sequential
from ds_seg3d.report import write_csv_atomic


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="NIfTI images (.nii or .nii.gz)")
    p.add_argument("--checkpoint", required=True, help="run folder (or a run folder's checkpoint tag with --tag)")
    p.add_argument("--out", required=True, help="output folder for label NIfTIs and volumes.csv")
    p.add_argument("--tag", help="checkpoint tag (default: latest)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    p.add_argument("--sw-batch", type=int, default=2, help="windows per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pipelined", action="store_true", help="run over the ranks of a deepspeed launch")
    p.add_argument("--stages", type=int, default=None, help="pipeline stages with --pipelined (default: all ranks)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)


def model_from_run(info: dict):
    """The run's model config object and layer list, rebuilt from run.json."""
    name = info["model"]["name"]
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in info["model"]["config"].items()}
    cfg = MODEL_CONFIGS[name](**raw)
    return cfg, build_layers(name, cfg)


def preprocess_options(info: dict) -> PreprocessOptions:
    pre = info["preprocessing"]
    norm = pre.get("normalisation") or {}
    kw = {"target_spacing": tuple(pre["target_spacing"]), "modality": pre.get("modality") or "CT"}
    if "ct_window" in norm:
        kw["ct_window"] = tuple(norm["ct_window"])
    if "crop_margin_mm" in norm:
        kw["crop_margin_mm"] = float(norm["crop_margin_mm"])
    return PreprocessOptions(**kw, require_foreground=False)


def prepare(path: Path, opts: PreprocessOptions):
    """(shard-space image (1, X, Y, Z) tensor, CaseGeometry, input affine, input header)."""
    image, affine, header = load_image(path)
    record = preprocess_arrays(path.name, image, np.zeros(image.shape, np.uint8), affine, opts, seed=0,
                               label_values=[])
    return torch.from_numpy(record.image)[None], record.geometry, affine, header


def to_input_grid(probs: torch.Tensor, geometry) -> np.ndarray:
    """Argmax of the probabilities resampled (trilinear) onto the input grid; background outside the crop."""
    fill = [1.0] + [0.0] * (probs.shape[0] - 1)
    return to_original_grid(probs.numpy(), geometry, order=1, fill=fill).argmax(0).astype(np.uint8)


def write_label(label: np.ndarray, affine: np.ndarray, header, out: Path) -> None:
    """Write under a temporary name, then rename: no half-written NIfTI is ever left behind."""
    img = nib.Nifti1Image(label, affine, header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    tmp = out.with_name(".tmp-" + out.name)
    nib.save(img, tmp)
    os.replace(tmp, out)


def output_name(path: Path) -> str:
    return path.name


def write_volumes(rows: list[dict], out_dir: Path) -> Path:
    path = out_dir / "volumes.csv"
    write_csv_atomic(path, rows)
    return path


def predict_files(inputs: Sequence[Path], out_dir: Path, info: dict,
                  predictor: Callable[[torch.Tensor], torch.Tensor], *, overlap: float, sw_batch: int,
                  progress: bool = True) -> list[dict]:
    """Single-process prediction of every input; returns one volumes row per input."""
    opts = preprocess_options(info)
    labels = info["labels"]
    roi = tuple(info["experiment"]["data"]["patch"])
    rows = []
    for path in inputs:
        image, geometry, affine, header = prepare(path, opts)
        probs = sliding_window_inference(image, roi, sw_batch, predictor, overlap=overlap,
                                         num_classes=len(labels), progress=progress)
        label = to_input_grid(probs, geometry)
        write_label(label, affine, header, out_dir / output_name(path))
        vols = volumes_ml(label, affine, labels)
        rows.append({"case": output_name(path), **{f"{k}_ml": round(v, 3) for k, v in vols.items()}})
        print(f"{path.name}: " + ", ".join(f"{k} {v:.1f} mL" for k, v in vols.items()), flush=True)
    return rows


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

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        return model(windows.to(device)).float().cpu()

    rows = predict_files([Path(p) for p in args.inputs], out_dir, info, predictor,
                         overlap=args.overlap, sw_batch=args.sw_batch)
    print(f"volumes: {write_volumes(rows, out_dir)}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        for p in args.inputs:
            if not Path(p).is_file():
                raise DataError(p, "no such file")
        if not 0.0 <= args.overlap < 1.0:
            raise ValueError(f"--overlap must be in [0, 1), got {args.overlap}")
        if args.pipelined:
            from ds_seg3d.predict_pipelined import run_pipelined

            return run_pipelined(args)
        return run_single(args)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds_seg3d.predict", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
