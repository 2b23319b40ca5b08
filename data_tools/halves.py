"""``data-tools halves``: one scan becomes two cases, its right and its mirrored left half (MSD layout).

A single labelled scan cannot give a held-out score: trained and scored on the same voxels, a network
shows how well it memorises, not how well it segments. Paired organs (kidneys, psoas muscles) offer an
honest split of one scan: cut it at the middle of the left-right axis, mirror the left half so that
both halves show a right-sided anatomy (midline at the same edge), train on one half and score on the
other. Labels are remapped on the way to ``name -> 1, 2, ...`` (``--labels "kidney=2,3;psoas=88,89"``
merges the left and right structure of each pair), so both halves speak the same label values and
``build-shards`` reads them as declared labels.

The two cases share the scan's voxel spacing; each gets an axis-aligned affine with that spacing, so
a mirrored half is a valid (mirror-image) patient. Written atomically: a temporary sibling folder is
renamed into place at the end.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from data_tools.phantoms import atomic_msd_folder, save_nifti
from ds_seg3d.data.errors import DataError


def parse_labels(spec: str, path: Path) -> dict[str, list[int]]:
    """``"kidney=2,3;psoas=88,89"`` -> ``{"kidney": [2, 3], "psoas": [88, 89]}`` (order gives values 1, 2...)."""
    out: dict[str, list[int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        name, _, values = item.partition("=")
        try:
            out[name.strip()] = [int(v) for v in values.split(",")]
        except ValueError:
            raise DataError(path, f"--labels item {item!r} is not name=value[,value...]") from None
        if not name.strip() or not out[name.strip()]:
            raise DataError(path, f"--labels item {item!r} is not name=value[,value...]")
    if not out:
        raise DataError(path, "--labels names no structure")
    return out


def _load(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(path)
        img.get_fdata(dtype=np.float32)  # reads the voxels: a truncated file fails here, not later
    except (OSError, nib.filebasedimages.ImageFileError, EOFError, ValueError) as e:
        raise DataError(path, f"not a readable NIfTI image ({e})") from None
    if img.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got shape {img.shape}")
    return img


def _canonical_x(img: nib.Nifti1Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The voxels in RAS axis order (x: right -> left) and the voxel spacing in mm."""
    ras = nib.as_closest_canonical(img)
    return np.asarray(ras.dataobj), tuple(float(z) for z in ras.header.get_zooms()[:3])


def split_halves(image: np.ndarray, label: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"right": (img, lab), "left": (img, lab)}``; the left half is mirrored along x (RAS order input)."""
    mid = image.shape[0] // 2
    return {"right": (image[:mid], label[:mid]),
            "left": (image[image.shape[0] - mid:][::-1], label[label.shape[0] - mid:][::-1])}


def remap(label: np.ndarray, labels: dict[str, list[int]]) -> np.ndarray:
    out = np.zeros(label.shape, np.uint8)
    for value, (_, sources) in enumerate(labels.items(), start=1):
        out[np.isin(label, sources)] = value
    return out


def _same_halves(out: Path, image_path: Path, labels: dict[str, list[int]], name: str) -> bool:
    try:
        meta = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("reference") == str(image_path) and meta.get("source_values") == labels
            and meta.get("name") == f"{name}-halves"
            and all((out / e["image"]).is_file() and (out / e["label"]).is_file() for e in meta.get("training", [])))


def write_halves(image_path: Path, label_path: Path, out: Path, labels_spec: str, name: str = "case") -> Path:
    """Write ``out`` as an MSD folder holding ``<name>_right`` and ``<name>_left``; return ``out``."""
    labels = parse_labels(labels_spec, label_path)
    img, lab = _load(image_path), _load(label_path)
    if img.shape != lab.shape or not np.allclose(img.affine, lab.affine, atol=1e-3):
        raise DataError(label_path, f"grid {lab.shape} does not match the image's {img.shape} (or its affine differs)")
    image, spacing = _canonical_x(img)
    label, _ = _canonical_x(lab)
    if image.shape[0] < 4:
        raise DataError(image_path, f"only {image.shape[0]} voxels along left-right: nothing to halve")
    label = np.rint(label).astype(np.int64)
    missing = [n for n, v in labels.items() if not np.isin(label, v).any()]
    if missing:
        raise DataError(label_path, f"no voxel of {', '.join(missing)} (values {labels[missing[0]]})")
    if out.exists() and any(out.iterdir()):
        if _same_halves(out, image_path, labels, name):
            return out  # already written from this scan with these labels: nothing to do
        raise DataError(out, "exists and is not empty (not these halves); choose another folder")
    with atomic_msd_folder(out) as tmp:
        training = []
        for side, (im, lb) in split_halves(image, label).items():
            case = f"{name}_{side}"
            affine = np.diag([*spacing, 1.0])
            save_nifti(np.ascontiguousarray(im.astype(np.int16 if np.issubdtype(im.dtype, np.integer) else np.float32)),
                       affine, tmp / "imagesTr" / f"{case}.nii.gz")
            save_nifti(remap(lb, labels), affine, tmp / "labelsTr" / f"{case}.nii.gz")
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        meta = {"name": f"{name}-halves", "description": f"right and mirrored left half of {image_path.name}",
                "reference": str(image_path), "tensorImageSize": "3D", "modality": {"0": "CT"},
                "labels": {"0": "background", **{str(i): n for i, n in enumerate(labels, start=1)}},
                "numTraining": 2, "training": training, "numTest": 0, "test": [],
                "source_values": labels}
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=1))
    return out


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("halves", help="split one labelled scan into its right and mirrored left half",
                              description=__doc__.split("\n")[0])
    p.add_argument("image", type=Path, help="NIfTI image")
    p.add_argument("label", type=Path, help="NIfTI label map on the image's grid")
    p.add_argument("out", type=Path, help="output MSD folder (created; must be absent or empty)")
    p.add_argument("--labels", required=True, help='structures to keep, e.g. "kidney=2,3;psoas=88,89"')
    p.add_argument("--name", default="case", help="case id prefix (default: case)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    out = write_halves(args.image, args.label, args.out, args.labels, args.name)
    print(f"{out}: wrote {args.name}_right and {args.name}_left")
    return 0
