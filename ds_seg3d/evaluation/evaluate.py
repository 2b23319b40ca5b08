"""``python -m ds_seg3d evaluate --pred DIR --truth DIR --out FILE.csv``: agreement of label NIfTIs.

Pairs files by name; one CSV row per (case, label) with Dice, the 95th-percentile Hausdorff distance
in mm, predicted and true volume (mL) and the signed volume error in percent, all on the original
grid of the reference label (its affine gives the voxel size). Beside the CSV it writes a per-label
summary (``FILE.summary.csv``) and a Bland-Altman plot of the volumes (``FILE.bland_altman.png``);
see ``ds_seg3d.evaluation.summary`` and ``bland_altman``. Empty structures give ``nan`` volume error (empty truth) and
``inf`` HD95 (exactly one side empty), written as ``nan`` and ``inf``.
"""
from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from ds_seg3d.evaluation import bland_altman
from ds_seg3d.evaluation import summary as summaries
from ds_seg3d.evaluation.metrics import dice, hd95_mm, spacing_mm, volume_error_pct, volumes_ml
from ds_seg3d.results import csv_writer, write_files

FIELDS = ["case", "label", "dice", "hd95_mm", "volume_pred_ml", "volume_true_ml", "volume_error_pct"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, help="folder of predicted label NIfTIs")
    p.add_argument("--truth", required=True, help="folder of reference label NIfTIs (same file names)")
    p.add_argument("--out", required=True,
                   help="CSV to write; FILE.summary.csv and FILE.bland_altman.png go beside it")
    p.add_argument("--labels", default="", help="name=value pairs, e.g. kidney=1 (default: label_<value>)")
    p.add_argument("--no-plot", action="store_true", help="skip the Bland-Altman PNG")


def parse_labels(spec: str, values: set[int]) -> dict[str, int]:
    """Named foreground labels; background (0) is never scored."""
    if not spec:
        return {f"label_{v}": v for v in sorted(values) if v != 0}
    out = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--labels: {item!r} is not name=integer") from None
    return {name: v for name, v in out.items() if v != 0}


def _nifti_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.name.endswith((".nii", ".nii.gz"))}


def _load_label(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    try:  # nibabel reads lazily: a truncated or corrupt file fails only here
        data = np.asarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read the voxel data ({type(e).__name__}: {e})") from None
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D label map, got shape {data.shape}")
    return data.astype(np.int64), img.affine


def evaluate_pair(pred_path: Path, truth_path: Path, labels_spec: str) -> list[dict]:
    """Rows of one case; the reference label's affine defines the grid, spacing and voxel volume."""
    pred, pred_affine = _load_label(pred_path)
    truth, affine = _load_label(truth_path)
    if pred.shape != truth.shape:
        raise ValueError(f"{pred_path}: shape {pred.shape} differs from {truth_path} {truth.shape}")
    if not np.allclose(pred_affine, affine, atol=1e-3):
        raise ValueError(f"{pred_path}: affine differs from {truth_path}")
    labels = parse_labels(labels_spec, set(np.unique(truth)) | set(np.unique(pred)))
    spacing = spacing_mm(affine)
    vp, vt = volumes_ml(pred, affine, labels), volumes_ml(truth, affine, labels)
    return [{"case": pred_path.name.split(".nii")[0], "label": name,
             "dice": round(dice(pred == v, truth == v), 5),
             "hd95_mm": round(hd95_mm(pred == v, truth == v, spacing), 3),
             "volume_pred_ml": round(vp[name], 3), "volume_true_ml": round(vt[name], 3),
             "volume_error_pct": round(volume_error_pct(vp[name], vt[name]), 3)}
            for name, v in labels.items()]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        pred, truth = _nifti_files(Path(args.pred)), _nifti_files(Path(args.truth))
        missing = sorted(set(pred) - set(truth))
        if missing:
            raise ValueError(f"{Path(args.truth) / missing[0]}: no reference label for this prediction")
        if not pred:
            raise ValueError(f"{args.pred}: no NIfTI files")
        rows = [r for name in tqdm(pred, desc="evaluate", unit="case", disable=None)
                for r in evaluate_pair(pred[name], truth[name], args.labels)]
        summary = summaries.summarize(rows)
        outputs = {out: csv_writer(FIELDS, rows),
                   summaries.summary_path(out): csv_writer(summaries.SUMMARY_FIELDS, summary)}
        if rows and not args.no_plot:
            outputs[bland_altman.plot_path(out)] = bland_altman.bland_altman_writer(rows)
        write_files(outputs)
    except (ValueError, OSError, nib.filebasedimages.ImageFileError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the library wrote
        return 2
    print(summaries.format_cases(rows))
    print()
    print(summaries.format_summary(summary))
    for path in outputs:
        print(f"wrote {path}")
    return 0
