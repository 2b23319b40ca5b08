"""Grid geometry shared by the shard builder and the predictor: reorient, resample, crop and back.

The builder moves every case onto one canonical grid (RAS+ axes, target spacing, cropped to the
body) so that patches from different scanners look alike; the predictor must put its output back
onto the grid of the NIfTI it was given. Both directions live here so that they cannot drift apart.

Resampling is voxel-centre aligned (like ``align_corners=False``): voxel ``i`` of the new grid sits
at source coordinate ``(i + 0.5) * dst / src - 0.5``. The affine of the new grid is built from the
same formula, so a voxel and its world point always agree, whatever the rounding of the new shape.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from nibabel import affines as nib_affines
from nibabel import orientations as ornts
from scipy import ndimage

from ds_seg3d.data.shard_format import CaseGeometry

RAS_ORNT = ornts.axcodes2ornt("RAS")
# Spacings closer than this (relative) count as equal: NIfTI stores voxel sizes as float32.
SPACING_RTOL = 1e-5

Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]
Box = tuple[IntTriple, IntTriple]


def _ints(values: Sequence) -> IntTriple:
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _floats(values: Sequence) -> Triple:
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def reorient_to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Permute and flip the first three axes so that they run towards R, A, S; no interpolation.

    Returns the reoriented array, its affine (the same world points) and the input's axis codes.
    Extra trailing axes (channels stored last) are carried along untouched.
    """
    affine = np.asarray(affine, dtype=np.float64)
    ornt = ornts.io_orientation(affine)
    axcodes = "".join(ornts.ornt2axcodes(ornt))
    transform = ornts.ornt_transform(ornt, RAS_ORNT)
    ras = ornts.apply_orientation(array, transform)
    ras_affine = affine @ ornts.inv_ornt_aff(transform, array.shape[:3])
    return ras, ras_affine, axcodes


def canonical_shape(shape: Sequence[int], axcodes: str) -> IntTriple:
    """Shape of a volume of ``shape`` (orientation ``axcodes``) once reoriented to RAS."""
    ornt = ornts.axcodes2ornt(axcodes)
    out = [0, 0, 0]
    for axis, (target, _flip) in enumerate(ornt):
        out[int(target)] = int(shape[axis])
    return _ints(out)


def from_ras(array: np.ndarray, axcodes: str) -> np.ndarray:
    """Undo ``reorient_to_ras`` for an array of the canonical shape (exact: permutation and flips)."""
    transform = ornts.ornt_transform(RAS_ORNT, ornts.axcodes2ornt(axcodes))
    return ornts.apply_orientation(array, transform)


def voxel_spacing(affine: np.ndarray) -> Triple:
    """Voxel size along each array axis, mm (column norms of the affine)."""
    return _floats(nib_affines.voxel_sizes(np.asarray(affine, dtype=np.float64)))


def same_spacing(a: Sequence[float], b: Sequence[float]) -> bool:
    return bool(np.allclose(a, b, rtol=SPACING_RTOL, atol=0.0))


def resampled_shape(shape: Sequence[int], src_spacing: Sequence[float], dst_spacing: Sequence[float]) -> IntTriple:
    """``round(shape * src / dst)`` (halves round up), at least one voxel per axis."""
    if same_spacing(src_spacing, dst_spacing):
        return _ints(shape[:3])
    ratio = np.asarray(src_spacing, dtype=np.float64) / np.asarray(dst_spacing, dtype=np.float64)
    new = np.floor(np.asarray(shape[:3], dtype=np.float64) * ratio + 0.5).astype(int)
    return _ints(np.maximum(new, 1))


def resample(array: np.ndarray, src_spacing: Sequence[float], dst_spacing: Sequence[float], order: int,
             shape: Sequence[int] | None = None) -> np.ndarray:
    """Resample a 3D array from ``src_spacing`` to ``dst_spacing``, voxel centres aligned.

    ``order`` 1 (trilinear) for images and probabilities, 0 (nearest) for label maps. ``shape``
    overrides the output shape (the inverse mapping needs the original shape, which rounding may not
    reproduce). Equal spacings and shape give an exact copy. Edges replicate the border voxel.
    """
    if array.ndim != 3:
        raise ValueError(f"resample expects a 3D array, got shape {array.shape}")
    if shape is None:
        shape = resampled_shape(array.shape, src_spacing, dst_spacing)
    out_shape = _ints(shape)
    if same_spacing(src_spacing, dst_spacing) and out_shape == array.shape:
        return array.copy()
    scale = np.asarray(dst_spacing, dtype=np.float64) / np.asarray(src_spacing, dtype=np.float64)
    offset = 0.5 * scale - 0.5
    # A 1D matrix is the diagonal fast path of affine_transform: each axis is scaled on its own.
    return ndimage.affine_transform(array, scale, offset=offset, output_shape=out_shape, order=order,
                                    mode="nearest", output=array.dtype, prefilter=False)


def resample_labels(label: np.ndarray, src_spacing: Sequence[float], dst_spacing: Sequence[float],
                    shape: Sequence[int] | None = None) -> np.ndarray:
    """Resample a label map class by class: trilinear on each one-hot mask, kept where above 0.5.

    Smoother and closer to the true boundary than nearest neighbour, which drops or duplicates whole
    voxel rows when the spacing ratio is not an integer (nnU-Net resamples segmentations the same way).
    Equal spacings and shape give an exact copy.
    """
    if shape is None:
        shape = resampled_shape(label.shape, src_spacing, dst_spacing)
    if same_spacing(src_spacing, dst_spacing) and _ints(shape) == label.shape:
        return label.copy()
    out = np.zeros(_ints(shape), dtype=label.dtype)
    for value in np.unique(label):
        if value == 0:
            continue
        mask = resample((label == value).astype(np.float32), src_spacing, dst_spacing, order=1, shape=shape)
        out[mask > 0.5] = value
    return out


def resampled_affine(affine: np.ndarray, src_spacing: Sequence[float], dst_spacing: Sequence[float]) -> np.ndarray:
    """Affine of the grid that ``resample`` produces from a grid with ``affine``."""
    affine = np.asarray(affine, dtype=np.float64)
    if same_spacing(src_spacing, dst_spacing):
        return affine.copy()
    scale = np.asarray(dst_spacing, dtype=np.float64) / np.asarray(src_spacing, dtype=np.float64)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = 0.5 * scale - 0.5
    return affine @ index_map


def shard_affine(ras_affine: np.ndarray, original_spacing: Sequence[float], spacing: Sequence[float],
                 crop_start: Sequence[int]) -> np.ndarray:
    """Affine of the shard array: the RAS grid, resampled to ``spacing``, then cropped at ``crop_start``."""
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(crop_start, dtype=np.float64)
    return resampled_affine(ras_affine, original_spacing, spacing) @ shift


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask``: the body, without the table or stray noise."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def component_count(mask: np.ndarray, min_share: float = 0.05) -> int:
    """Connected components of ``mask`` (26-connected) holding at least ``min_share`` of the largest's voxels;
    0 for an empty mask. Two kidneys under one label count 2, a stray voxel of label noise does not."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return 0
    sizes = np.bincount(labels.ravel())[1:]
    return int((sizes >= min_share * sizes.max()).sum())


def mask_box(mask: np.ndarray, margin_vox: int | Sequence[int] = 0) -> Box:
    """Bounding box of ``mask`` grown by ``margin_vox`` and clipped to the array; the whole array if empty."""
    shape = np.asarray(mask.shape)
    if not mask.any():
        return (0, 0, 0), _ints(shape)
    margin = np.broadcast_to(np.asarray(margin_vox, dtype=int), (3,))
    starts, stops = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        starts.append(hits[0])
        stops.append(hits[-1] + 1)
    start = np.maximum(np.asarray(starts) - margin, 0)
    stop = np.minimum(np.asarray(stops) + margin, shape)
    return _ints(start), _ints(stop)


def body_box(image: np.ndarray, threshold: float, margin_vox: int | Sequence[int]) -> Box:
    """Crop box (start inclusive, stop exclusive) of the largest component above ``threshold``, plus a margin."""
    return mask_box(largest_component(image > threshold), margin_vox)


def union_box(a: Box, b: Box) -> Box:
    """Smallest box holding both boxes."""
    return _ints(np.minimum(a[0], b[0])), _ints(np.maximum(a[1], b[1]))


def _to_original_3d(volume: np.ndarray, geometry: CaseGeometry, order: int, fill: float) -> np.ndarray:
    full = np.full(geometry.resampled_shape, fill, dtype=volume.dtype)
    box = tuple(slice(a, b) for a, b in zip(geometry.crop_start, geometry.crop_stop))
    full[box] = volume
    ras_shape = canonical_shape(geometry.original_shape, geometry.original_axcodes)
    if order == 0:
        ras = resample_labels(full, geometry.spacing, geometry.original_spacing, shape=ras_shape)
    else:
        ras = resample(full, geometry.spacing, geometry.original_spacing, order, shape=ras_shape)
    return np.ascontiguousarray(from_ras(ras, geometry.original_axcodes))


def to_original_grid(shard_array: np.ndarray, geometry: CaseGeometry, order: int = 0,
                     fill: float | Sequence[float] = 0.0) -> np.ndarray:
    """Map a shard-space array back onto the original NIfTI grid.

    3D label maps: ``order=0`` (class by class, see ``resample_labels``). 4D ``(C, X, Y, Z)`` probability maps: ``order=1``, channel by channel,
    then argmax on the original grid (smoother than resampling the argmax). Outside the crop the
    array is ``fill`` (per channel for 4D, e.g. 1 for background and 0 elsewhere). When the shard
    was not resampled the round trip is exact.
    """
    expected = tuple(b - a for a, b in zip(geometry.crop_start, geometry.crop_stop))
    if shard_array.shape[-3:] != expected:
        raise ValueError(f"array of shape {shard_array.shape} does not match the crop box {expected}")
    if shard_array.ndim == 3:
        return _to_original_3d(shard_array, geometry, order, float(np.asarray(fill).reshape(-1)[0]))
    if shard_array.ndim == 4:
        fills = np.broadcast_to(np.asarray(fill, dtype=np.float64), (shard_array.shape[0],))
        return np.stack([_to_original_3d(c, geometry, order, float(f)) for c, f in zip(shard_array, fills)])
    raise ValueError(f"expected a 3D label map or a 4D (C, X, Y, Z) map, got shape {shard_array.shape}")


def make_geometry(original_affine: np.ndarray, original_shape: Sequence[int], original_axcodes: str,
                  ras_affine: np.ndarray, spacing: Sequence[float], crop_start: Sequence[int],
                  crop_stop: Sequence[int]) -> CaseGeometry:
    """Assemble the ``CaseGeometry`` of a case from what the forward steps produced."""
    original_spacing = voxel_spacing(ras_affine)
    ras_shape = canonical_shape(original_shape, original_axcodes)
    return CaseGeometry(
        original_affine=np.asarray(original_affine, dtype=np.float64),
        original_shape=_ints(original_shape[:3]),
        original_axcodes=original_axcodes,
        original_spacing=original_spacing,
        spacing=_floats(spacing),
        resampled_shape=resampled_shape(ras_shape, original_spacing, spacing),
        crop_start=_ints(crop_start),
        crop_stop=_ints(crop_stop),
        affine=shard_affine(ras_affine, original_spacing, spacing, crop_start),
    )
