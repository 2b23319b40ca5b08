"""``python -m ds_seg3d evaluate --pred DIR --truth DIR --out FILE.csv``: agreement of label NIfTIs.

Pairs files by name; one CSV row per (case, label) with Dice, predicted and true volume (mL, on the
original grid) and the signed volume error in percent; prints a per-case table and the means.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from ds_seg3d.metrics import dice, volume_error_pct, volumes_ml

FIELDS = ["case", "label", "dice", "volume_pred_ml", "volume_true_ml", "volume_error_pct"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, help="folder of predicted label NIfTIs")
    p.add_argument("--truth", required=True, help="folder of reference label NIfTIs (same file names)")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--labels", default="", help="name=value pairs, e.g. kidney=1 (default: label_<value>)")


def parse_labels(spec: str, values: set[int]) -> dict[str, int]:
    if not spec:
        return {f"label_{v}": v for v in sorted(values) if v != 0}
    out = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--labels: {item!r} is not name=integer") from None
    return out


def _nifti_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.name.endswith((".nii", ".nii.gz"))}


def evaluate_pair(pred_path: Path, truth_path: Path, labels_spec: str) -> list[dict]:
    pred_img, truth_img = nib.load(pred_path), nib.load(truth_path)
    pred = np.asarray(pred_img.dataobj).astype(np.int64)
    truth = np.asarray(truth_img.dataobj).astype(np.int64)
    if pred.shape != truth.shape:
        raise ValueError(f"{pred_path}: shape {pred.shape} differs from {truth_path} {truth.shape}")
    if not np.allclose(pred_img.affine, truth_img.affine, atol=1e-3):
        raise ValueError(f"{pred_path}: affine differs from {truth_path}")
    labels = parse_labels(labels_spec, set(np.unique(truth)) | set(np.unique(pred)))
    vp, vt = volumes_ml(pred, truth_img.affine, labels), volumes_ml(truth, truth_img.affine, labels)
    return [{"case": pred_path.name.split(".nii")[0], "label": name, "dice": round(dice(pred == v, truth == v), 5),
             "volume_pred_ml": round(vp[name], 3), "volume_true_ml": round(vt[name], 3),
             "volume_error_pct": round(volume_error_pct(vp[name], vt[name]), 3)}
            for name, v in labels.items()]


def run(args: argparse.Namespace) -> int:
    try:
        pred, truth = _nifti_files(Path(args.pred)), _nifti_files(Path(args.truth))
        missing = sorted(set(pred) - set(truth))
        if missing:
            raise ValueError(f"{Path(args.truth) / missing[0]}: no reference label for this prediction")
        if not pred:
            raise ValueError(f"{args.pred}: no NIfTI files")
        rows = [r for name in pred for r in evaluate_pair(pred[name], truth[name], args.labels)]
    except (ValueError, OSError, nib.filebasedimages.ImageFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    tmp = out.with_name(".tmp-" + out.name)
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out)
    print(f"{'case':<16}{'label':<10}{'Dice':>8}{'pred mL':>10}{'true mL':>10}{'error %':>9}")
    for r in rows:
        print(f"{r['case']:<16}{r['label']:<10}{r['dice']:>8.3f}{r['volume_pred_ml']:>10.1f}"
              f"{r['volume_true_ml']:>10.1f}{r['volume_error_pct']:>9.2f}")
    for name in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == name]
        errs = [abs(r["volume_error_pct"]) for r in mine if not math.isnan(r["volume_error_pct"])]
        under5 = sum(e < 5 for e in errs)
        print(f"{name}: mean Dice {np.mean([r['dice'] for r in mine]):.3f}, "
              f"mean |volume error| {np.mean(errs) if errs else float('nan'):.2f}%, "
              f"{under5}/{len(mine)} cases under 5% volume error")
    print(f"wrote {out}")
    return 0
