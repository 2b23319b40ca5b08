"""One labelled case from its source files: read, validate, map labels to shard values, preprocess.

A dataset layout (``data_tools.layouts``) names each case's image and its label map or, for
TotalSegmentator, its structure masks. ``load_case`` reads them on the ORIGINAL grid (float32 image,
uint8 label already mapped to shard values), so that the builder can measure volumes on the source
before anything is resampled; ``ds_seg3d.data.preprocess.preprocess_arrays`` continues from there,
exactly as it does for a prediction input, and ``preprocess_case`` is the two in a row.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.layouts import CaseSpec, LabelMap
from ds_seg3d.data.errors import DataError
from ds_seg3d.data.preprocess import PreprocessOptions, load_image, preprocess_arrays, read_nifti
from ds_seg3d.data.shard_format import CaseRecord


def _check_same_grid(path: Path, shape: tuple[int, ...], affine: np.ndarray, ref_shape: tuple[int, ...],
                     ref_affine: np.ndarray, tolerance: float) -> None:
    if shape != ref_shape:
        raise DataError(path, f"shape {shape} does not match the image shape {ref_shape}")
    diff = float(np.max(np.abs(affine - ref_affine)))
    if diff > tolerance:
        raise DataError(path, f"affine differs from the image affine by {diff:.3g} (tolerance {tolerance:g})")


def _integer_label(data: np.ndarray, path: Path) -> np.ndarray:
    """Label voxels as non-negative integers (float-stored label maps are common and fine if integral)."""
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise DataError(path, "label holds NaN or infinite voxels")
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise DataError(path, "label holds non-integer values")
        data = rounded
    elif data.dtype.kind not in "iu":
        raise DataError(path, f"label has unsupported data type {data.dtype}")
    low, high = (int(data.min()), int(data.max())) if data.size else (0, 0)
    if low < 0:
        raise DataError(path, f"label holds negative values (minimum {low})")
    if high > 65535:
        raise DataError(path, f"label value {high} is out of range (at most 65535)")
    return data.astype(np.uint16 if high > 255 else np.uint8, copy=False)


def _map_values(label: np.ndarray, label_map: LabelMap, path: Path) -> np.ndarray:
    present = np.flatnonzero(np.bincount(label.ravel()))
    if label_map.declared_values is not None:
        undeclared = sorted(set(int(v) for v in present) - label_map.declared_values)
        if undeclared:
            shown = ", ".join(map(str, undeclared[:10])) + (", ..." if len(undeclared) > 10 else "")
            raise DataError(path, f"label values {shown} are not among the declared source labels")
    lut = np.zeros(int(present[-1]) + 1 if present.size else 1, dtype=np.uint8)
    for src, dst in label_map.source_values.items():
        if src < lut.size:
            lut[src] = dst
    return lut[label]


def _merge_structures(spec: CaseSpec, label_map: LabelMap, shape: tuple[int, ...], affine: np.ndarray,
                      tolerance: float) -> np.ndarray:
    """TotalSegmentator: paint each requested structure mask with its shard value."""
    out = np.zeros(shape, dtype=np.uint8)
    for name, value in label_map.structures.items():
        path = spec.label_parts.get(name)
        if path is None:
            raise DataError(spec.label_source / f"{name}.nii.gz", f"structure mask of case {spec.case_id} is missing")
        mask, mask_affine = read_nifti(path, as_float=False)
        _check_same_grid(path, tuple(mask.shape), mask_affine, shape, affine, tolerance)
        mask = _integer_label(mask, path)
        if mask.max(initial=0) > 1:
            raise DataError(path, f"structure mask is not binary (maximum {int(mask.max())})")
        out[mask > 0] = value
    return out


def load_case(spec: CaseSpec, label_map: LabelMap,
              opts: PreprocessOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read and validate one case on its original grid: (float32 image, uint8 shard label, affine)."""
    image, affine, _ = load_image(spec.image)
    shape = tuple(image.shape)
    if spec.label is not None:
        raw, label_affine = read_nifti(spec.label, as_float=False)
        _check_same_grid(spec.label, tuple(raw.shape), label_affine, shape, affine, opts.affine_tolerance)
        label = _map_values(_integer_label(raw, spec.label), label_map, spec.label)
    elif spec.label_parts:
        label = _merge_structures(spec, label_map, shape, affine, opts.affine_tolerance)
    else:
        raise DataError(spec.image, f"case {spec.case_id} has no label")
    if opts.require_foreground and not label.any():
        wanted = ", ".join(label_map.foreground)
        raise DataError(spec.label_source, f"label is empty after mapping (no voxel of {wanted})")
    return image, label, affine


def case_statistics(label: np.ndarray, affine: np.ndarray, label_names: dict[str, int]) -> dict[str, dict]:
    """Voxel counts and volumes (mL) per foreground label, measured on the grid given by ``affine``."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    top = max(label_names.values(), default=0)
    counts = np.bincount(label.ravel(), minlength=top + 1)
    voxels = {name: int(counts[v]) for name, v in label_names.items() if v > 0}
    return {"voxels": voxels, "volume_ml": {name: n * voxel_ml for name, n in voxels.items()}}


def preprocess_case(spec: CaseSpec, label_map: LabelMap, opts: PreprocessOptions, seed: int) -> CaseRecord:
    """Load, validate and preprocess one case into a shard-ready record."""
    image, label, affine = load_case(spec, label_map, opts)
    return preprocess_arrays(spec.case_id, image, label, affine, opts, seed, sorted(label_map.foreground.values()))
