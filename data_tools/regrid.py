"""``data-tools regrid``: the same scan on another grid: a finer spacing and a cut field of view, or back.

A network whose inputs are normalised with each case's own statistics meets different intensities when
the same anatomy is scanned at another resolution or framed differently; one normalised with the
dataset's statistics should not. ``regrid IMAGE OUT --spacing 2 2 2 --crop-anterior 0.33`` resamples a
scan (trilinear) to a new voxel spacing and cuts away the anterior part of its field of view, so the
same patient can be predicted twice; ``regrid PRED OUT --like IMAGE`` puts a label map back on another
image's grid (nearest neighbour), where the two predictions can be compared voxel by voxel (the
``real-ct`` experiment does both and reports their Dice).

Written atomically: a temporary sibling file is renamed into place.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

from ds_seg3d.data.errors import DataError


def _load(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(path)
        img.get_fdata(dtype=np.float32)  # reads the voxels: a truncated file fails here
    except (OSError, nib.filebasedimages.ImageFileError, EOFError, ValueError) as e:
        raise DataError(path, f"not a readable NIfTI image ({e})") from None
    if img.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got shape {img.shape}")
    return img


def reframed_grid(img: nib.Nifti1Image, spacing: tuple[float, float, float],
                  crop_anterior: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of a RAS grid with ``spacing`` over the image's extent, less its anterior
    ``crop_anterior`` fraction."""
    ras = nib.as_closest_canonical(img)
    zooms = np.asarray(ras.header.get_zooms()[:3], float)
    extent = np.asarray(ras.shape[:3]) * zooms
    extent[1] *= 1.0 - crop_anterior  # RAS: y grows towards anterior, so the kept part starts at y = 0
    shape = tuple(int(n) for n in np.maximum(1, np.floor(extent / np.asarray(spacing))))
    affine = ras.affine.copy()
    affine[:3, :3] = ras.affine[:3, :3] / zooms * np.asarray(spacing)  # same axes, new spacing
    # voxel centres: the first new centre sits half a new voxel inside the first old voxel's outer edge
    first = ras.affine[:3, :3] @ ((np.asarray(spacing) / zooms - 1.0) / 2.0) + ras.affine[:3, 3]
    affine[:3, 3] = first
    return shape, affine


def _save_atomic(img: nib.Nifti1Image, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".tmp-" + out.name)
    try:
        nib.save(img, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def regrid(src: Path, out: Path, spacing: tuple[float, float, float] | None = None, crop_anterior: float = 0.0,
           like: Path | None = None) -> Path:
    """Write ``src`` resampled onto ``like``'s grid (nearest neighbour, for label maps) or onto a grid of
    ``spacing`` less its anterior ``crop_anterior`` (trilinear, for images)."""
    img = _load(src)
    if like is not None:
        ref = _load(like)
        data = np.asarray(resample_from_to(img, ref, order=0).dataobj)
        result = nib.Nifti1Image(np.rint(data).astype(np.uint8), ref.affine)
    else:
        if spacing is None or any(s <= 0 for s in spacing):
            raise DataError(src, f"--spacing must be three positive sizes in mm, got {spacing}")
        if not 0.0 <= crop_anterior < 1.0:
            raise DataError(src, f"--crop-anterior must be in [0, 1), got {crop_anterior}")
        shape, affine = reframed_grid(img, spacing, crop_anterior)
        data = np.asarray(resample_from_to(img, (shape, affine), order=1).dataobj, np.float32)
        result = nib.Nifti1Image(data, affine)
    result.header.set_xyzt_units("mm")
    result.set_qform(result.affine, code=1)
    result.set_sform(result.affine, code=1)
    _save_atomic(result, out)
    return out


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("regrid", help="resample a scan to a finer grid and cut its field of view, or a "
                                             "label map back onto another image's grid",
                              description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="NIfTI image or label map")
    p.add_argument("out", type=Path, help="output NIfTI file")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="new voxel spacing in mm")
    p.add_argument("--crop-anterior", type=float, default=0.0,
                   help="fraction of the field of view to cut away at the anterior side (default 0)")
    p.add_argument("--like", type=Path, help="put a label map on this image's grid instead (nearest neighbour)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if (args.like is None) == (args.spacing is None):
        raise DataError(args.src, "give either --spacing (a new grid) or --like (another image's grid)")
    out = regrid(args.src, args.out, tuple(args.spacing) if args.spacing else None, args.crop_anterior, args.like)
    print(f"{out}: written")
    return 0
