"""``data-tools export-nnunet SHARDS OUT``: a shard folder's source cases in nnU-Net v2's raw layout.

So that nnU-Net trains and is scored on exactly the cases ds-seg3d does, the export writes::

    OUT/Dataset<ID>_<name>/
        dataset.json          channel_names (the shards' modality), labels, numTraining, file_ending
        imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz   the shards' train and val cases
        imagesTs/<case>_0000.nii.gz, labelsTs/<case>.nii.gz   the shards' test cases (nnU-Net never reads labelsTs)
        splits_final.json     one fold: the shards' train / val split (copy it into nnUNet_preprocessed/Dataset<ID>_<name>/
                              after planning, and train fold 0)

Images are the source files as they are (copied); labels are the shards' label maps on the image's grid:
the source label mapped to the shards' values (or TotalSegmentator's structure masks painted), as
``build-shards`` reads them, written with the image's affine so that nnU-Net's geometry checks agree.
Built under a temporary name and renamed into place; an existing dataset folder is never written over.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from data_tools.cases import load_case
from data_tools.layouts import LabelMap, detect_layout, parse_label_map
from ds_seg3d.data.errors import DataError
from ds_seg3d.data.preprocess import PreprocessOptions
from ds_seg3d.data.shard_format import load_manifest


def _label_map(manifest: dict, source, shards: Path) -> LabelMap:
    """The mapping ``build-shards`` used: stored in the manifest, else the source's own labels."""
    stored = manifest.get("label_mapping")
    if stored is not None:
        return LabelMap(names=dict(stored["names"]), structures=dict(stored["structures"]),
                        source_values={int(k): int(v) for k, v in stored["source_values"].items()})
    label_map = parse_label_map(None, source)
    if dict(label_map.names) != dict(manifest["labels"]):
        raise DataError(shards / "manifest.json", f"labels {manifest['labels']} were mapped from the source's "
                        f"{label_map.names} and the manifest predates stored mappings: rebuild the shards")
    return label_map


def _dataset_name(dataset_id: int, name: str) -> str:
    clean = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_") or "Dataset"
    return f"Dataset{dataset_id:03d}_{clean}"


def export(shards: Path, out: Path, dataset_id: int = 501, name: str | None = None) -> Path:
    """Write the dataset folder; returns its path."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"--dataset-id must be 1-999 (nnU-Net's three digits), got {dataset_id}")
    manifest = load_manifest(shards)
    source = detect_layout(Path(manifest["source"]))
    label_map = _label_map(manifest, source, shards)
    splits = manifest["splits"]
    train, val, test = (list(splits.get(k) or []) for k in ("train", "val", "test"))
    if not train:
        raise DataError(shards / "manifest.json", "the split has no training cases")
    specs = {c.case_id: c for c in source.cases}
    missing = [c for c in train + val + test if c not in specs]
    if missing:
        raise DataError(Path(manifest["source"]), f"case(s) {', '.join(missing[:5])} of the shards are gone from the source")
    final = out / _dataset_name(dataset_id, name or manifest["name"])
    if final.exists():
        raise DataError(final, "exists; remove it or choose another --dataset-id")
    tmp = out / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    opts = PreprocessOptions(target_spacing=tuple(manifest["target_spacing"]), modality=manifest["modality"],
                             require_foreground=False)
    try:
        for cases, images, labels in ((train + val, "imagesTr", "labelsTr"), (test, "imagesTs", "labelsTs")):
            (tmp / images).mkdir(parents=True, exist_ok=True)
            (tmp / labels).mkdir(parents=True, exist_ok=True)
            for case in cases:
                spec = specs[case]
                _, label, affine = load_case(spec, label_map, opts)
                header = nib.load(spec.image).header
                if str(spec.image).endswith(".nii.gz"):
                    shutil.copyfile(spec.image, tmp / images / f"{case}_0000.nii.gz")
                else:
                    src = nib.load(spec.image)
                    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj), src.affine, src.header),
                             tmp / images / f"{case}_0000.nii.gz")
                lab = nib.Nifti1Image(label.astype(np.uint8), affine, header)
                lab.set_data_dtype(np.uint8)
                lab.header.set_slope_inter(1, 0)
                nib.save(lab, tmp / labels / f"{case}.nii.gz")
        dataset = {"channel_names": {"0": manifest["modality"]},
                   "labels": {k: int(v) for k, v in sorted(manifest["labels"].items(), key=lambda kv: kv[1])},
                   "numTraining": len(train) + len(val), "file_ending": ".nii.gz",
                   "name": manifest["name"], "description": f"exported by data-tools export-nnunet from {shards}"}
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=1))
        (tmp / "splits_final.json").write_text(json.dumps([{"train": train, "val": val}], indent=1))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-nnunet", help="a shard folder's source cases in nnU-Net v2's raw layout, same split")
    p.add_argument("shards", type=Path, help="shard folder (its manifest names the source and the split)")
    p.add_argument("out", type=Path, help="nnU-Net raw folder (nnUNet_raw); the dataset folder goes inside")
    p.add_argument("--dataset-id", type=int, default=501, help="nnU-Net's dataset number (default 501)")
    p.add_argument("--name", help="dataset name (default: the shards')")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    final = export(args.shards, args.out, args.dataset_id, args.name)
    print(f"wrote {final} (train fold 0 of its splits_final.json to keep the shards' split)")
    return 0
