"""nnU-Net's dataset fingerprint of a NIfTI dataset: the first of ``build-shards``' two passes.

Spacings and shapes (RAS order, source grids), foreground intensities sampled from the labelled voxels
(from which CT normalisation takes its clip range, mean and standard deviation) and the number of
connected components per label, read from every case not held out for testing.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from data_tools.cases import load_case
from data_tools.layouts import CaseSpec, LabelMap
from data_tools.workers import ordered_map
from ds_seg3d.data.errors import DataError
from ds_seg3d.data.geometry import component_count, voxel_spacing
from ds_seg3d.data.preprocess import IntensityProperties, PreprocessOptions, foreground_intensities

INTENSITY_SAMPLES = 10000
"""Foreground intensities drawn per training case for the fingerprint (nnU-Net's number)."""


def ras_spacing(path: Path) -> tuple[float, float, float]:
    """Voxel size in RAS axis order from the NIfTI header alone (no voxel data is read).

    Measured like the preprocessing measures ``original_spacing`` (affine column norms), so the median
    matches the spacings the manifest reports.
    """
    try:
        img = nib.load(str(path))
        zooms = list(voxel_spacing(img.affine))
        ornt = nib.orientations.io_orientation(img.affine)
    except Exception as e:  # nibabel raises several types for unreadable headers
        raise DataError(path, f"cannot read the NIfTI header ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if len(img.shape) < 3 or np.isnan(ornt).any():
        raise DataError(path, "not a 3D volume with a usable orientation")
    spacing = [0.0, 0.0, 0.0]
    for voxel_axis, (world_axis, _flip) in enumerate(ornt):
        spacing[int(world_axis)] = zooms[voxel_axis]
    return spacing[0], spacing[1], spacing[2]


def median_spacing(cases: Sequence[CaseSpec]) -> tuple[float, float, float]:
    """The default target spacing: per RAS axis, the median voxel size of the images."""
    sp = np.array([ras_spacing(c.image) for c in tqdm(cases, desc="headers", unit="case", disable=None)])
    return tuple(round(float(v), 6) for v in np.median(sp, axis=0))  # type: ignore[return-value]


def case_seed(seed: int, case_id: str) -> int:
    """A per-case seed that depends on the case, not on its position, so adding a case changes no other."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{case_id}".encode()).digest()[:4], "little")


def _measure(job: tuple[CaseSpec, LabelMap, PreprocessOptions, int]) -> tuple[str, Any]:
    """Worker of the first pass: a case's fingerprint (RAS spacing and shape, foreground intensities, each
    label's connected components)."""
    spec, label_map, opts, seed = job
    try:
        image, label, affine = load_case(spec, label_map, opts)
    except DataError as e:
        return "error", (e.path, e.problem)
    ornt = nib.orientations.io_orientation(affine)
    order = [int(world) for world, _ in ornt]
    spacing, shape = [0.0] * 3, [0] * 3
    for axis, world in enumerate(order):
        spacing[world], shape[world] = float(voxel_spacing(affine)[axis]), int(image.shape[axis])
    components = {name: component_count(label == value) for name, value in label_map.foreground.items()}
    return "ok", (spacing, shape, foreground_intensities(image, label, INTENSITY_SAMPLES, seed), components)


def fingerprint_cases(splits: dict[str, Any], ids: Sequence[str]) -> list[str]:
    """The cases the fingerprint reads: every case not held out for testing (train and validation)."""
    test = set(splits.get("test") or [])
    return [c for c in ids if c not in test]


def dataset_fingerprint(cases: Sequence[CaseSpec], label_map: LabelMap, opts: PreprocessOptions, seed: int,
                        workers: int) -> dict[str, Any]:
    """Spacings and shapes (RAS, source grids), foreground intensity statistics and the median number of
    connected components per label (``ds_seg3d.inference.postprocess``) of ``cases``."""
    jobs = [(c, label_map, opts, case_seed(seed, c.case_id)) for c in cases]
    spacings, shapes, samples, components = {}, {}, [], []
    results = ordered_map(_measure, jobs, workers)
    try:
        for spec, (status, payload) in tqdm(zip(cases, results), total=len(cases), desc="fingerprint",
                                            unit="case", disable=None):
            if status == "error":
                raise DataError(*payload)
            spacings[spec.case_id], shapes[spec.case_id], values, counts = payload
            samples.append(values)
            components.append(counts)
    finally:
        results.close()  # type: ignore[attr-defined]
    intensity = IntensityProperties.of(np.concatenate(samples))
    return {"cases": [c.case_id for c in cases], "spacings": spacings, "shapes": shapes,
            "median_spacing": [float(v) for v in np.median(list(spacings.values()), axis=0)],
            "median_shape": [float(v) for v in np.median(list(shapes.values()), axis=0)],
            "foreground_intensity": intensity.to_json(), "samples_per_case": INTENSITY_SAMPLES,
            "components": {name: int(np.round(np.median([c[name] for c in components])))
                           for name in label_map.foreground}}
