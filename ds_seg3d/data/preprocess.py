"""Per-case preprocessing, shared by ``build-shards`` and ``predict``: read, reorient, resample, normalise, crop.

    @dataclass
    class PreprocessOptions:
        target_spacing: tuple[float, float, float]   # mm, canonical (RAS) axis order
        modality: str = "CT"                          # "CT": see ``intensity``; "MR": z-score per case
        intensity: IntensityProperties | None = None  # CT: the training set's foreground statistics
        ct_window: tuple[float, float] = (-1000.0, 1000.0)  # CT without ``intensity``: clip, z-score per case
        crop_margin_mm: float = 10.0                  # margin around the body box
        foreground_samples: int = 10000               # coordinates kept per label value
        require_foreground: bool = True               # an empty label is an error
        affine_tolerance: float = 1e-3                # max |image affine - label affine|

    def load_image(path) -> (float32 volume, affine, header)     # a validated prediction input
    def read_nifti(path, as_float) -> (volume, affine)            # any validated 3D NIfTI
    def preprocess_arrays(case_id, image, label, affine, opts, seed) -> CaseRecord
    def foreground_intensities(image, label, count, seed) -> samples  # for the dataset fingerprint

CT intensities are normalised as nnU-Net does: clip to the 0.5 / 99.5 percentiles of the foreground
voxels of the whole training set, then z-score with that foreground's mean and standard deviation
(``IntensityProperties``, from ``build-shards``' fingerprint), the same for every case and at
prediction, so a scan framed differently meets the same intensities. MR has no absolute scale and is
z-scored per case over the body.

Reading a labelled case from a dataset layout (label maps, TotalSegmentator structure masks) is the
offline tools' part (``data_tools.cases``); everything after loading happens here, identically for a
training case and a prediction input. Bad input raises ``DataError`` naming the file.
"""
from __future__ import annotations

import dataclasses
import gzip
import math
import zlib
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, SpatialImage
from nibabel.wrapstruct import WrapStructError

from ds_seg3d.data import geometry as geo
from ds_seg3d.data.errors import DataError
from ds_seg3d.data.shard_format import CaseRecord

# Voxels above this (HU, before normalisation) belong to the body; air and lung cores fall below.
CT_BODY_HU = -500.0
# MR has no absolute scale: the body is what lies above this percentile of the volume.
MR_BODY_PERCENTILE = 5.0
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError,
                WrapStructError)


@dataclasses.dataclass(frozen=True)
class IntensityProperties:
    """Foreground intensities of a training set (nnU-Net's ``foreground_intensity_properties``)."""

    mean: float
    std: float
    median: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float

    @classmethod
    def of(cls, samples: np.ndarray) -> "IntensityProperties":
        """From foreground voxel samples (``foreground_intensities`` of every training case, concatenated)."""
        samples = np.asarray(samples, dtype=np.float64).ravel()
        if samples.size == 0:
            raise ValueError("no foreground voxels to take intensity statistics from")
        low, median, high = np.percentile(samples, (0.5, 50.0, 99.5))
        return cls(mean=float(samples.mean()), std=float(samples.std()), median=float(median),
                   min=float(samples.min()), max=float(samples.max()), percentile_00_5=float(low),
                   percentile_99_5=float(high))

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "IntensityProperties":
        return cls(**{f.name: float(raw[f.name]) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class PreprocessOptions:
    target_spacing: tuple[float, float, float]
    """Voxel size of the shards, mm, in canonical (RAS) axis order."""
    modality: str = "CT"
    """"CT": see ``intensity``; "MR": z-score over the body, per case."""
    intensity: IntensityProperties | None = None
    """CT: clip to its 0.5 / 99.5 percentiles, then z-score with its mean and std, for every case alike.
    None: clip to ``ct_window`` and z-score over the case's own body (the scheme before fingerprints)."""
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    """HU range kept before a per-case z-score (CT without ``intensity``)."""
    crop_margin_mm: float = 10.0
    """Margin around the body box, so that patches near the skin still see some context."""
    foreground_samples: int = 10000
    """Coordinates kept per label value, for the sampler's foreground oversampling."""
    require_foreground: bool = True
    """An empty label map (after mapping) is an error rather than a silently useless case."""
    affine_tolerance: float = 1e-3
    """Largest |image affine - label affine| entry still taken as the same grid."""

    def __post_init__(self) -> None:
        if len(self.target_spacing) != 3 or any(not (s > 0) for s in self.target_spacing):
            raise ValueError(f"target_spacing must be three positive numbers, got {self.target_spacing}")
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"modality must be 'CT' or 'MR', got {self.modality!r}")
        if not self.ct_window[0] < self.ct_window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {self.ct_window}")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _load_nifti(path: Path) -> SpatialImage:
    """Open a NIfTI file; a .gz file is decompressed whole first.

    nibabel reads only the bytes the voxels need, so a gzip stream with a bad checksum or a lost
    trailer would load silently; ``gzip`` checks both once it reaches the end of the stream.
    """
    if not path.name.endswith(".gz"):
        return nib.load(str(path))
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    sizes = {int.from_bytes(raw[:4], order) for order in ("little", "big")} if len(raw) >= 4 else set()
    if not sizes & {348, 540}:
        raise DataError(path, "not a NIfTI file (no NIfTI-1 or NIfTI-2 header)")
    klass = nib.Nifti2Image if 540 in sizes else nib.Nifti1Image
    return klass.from_bytes(raw)


def read_nifti(path: Path, as_float: bool) -> tuple[np.ndarray, np.ndarray]:
    """A validated 3D volume and its affine; every failure is a ``DataError`` naming ``path``."""
    data, affine, _header = _read_nifti_header(path, as_float)
    return data, affine


def _read_nifti_header(path: Path, as_float: bool) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a 3D NIfTI volume, its affine and header; every failure becomes a DataError naming ``path``."""
    try:
        img = _load_nifti(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise DataError(path, f"not a NIfTI file ({type(img).__name__})")
        data = img.get_fdata(dtype=np.float32) if as_float else np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
        header = img.header
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except _READ_ERRORS as e:
        raise DataError(path, f"unreadable or truncated NIfTI ({_one_line(e)})") from None
    # A 4D volume with trailing singleton axes is 3D in disguise (some tools write X, Y, Z, 1).
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got {data.ndim}D of shape {tuple(data.shape)}")
    if not np.all(np.isfinite(affine)):
        raise DataError(path, "affine holds NaN or infinite entries")
    return np.asarray(data), affine, header


def load_image(path: str | Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """A validated image without a label (prediction input): (float32 volume, affine, header).

    The header comes along so that an output label map can be written with the input's geometry codes.
    """
    path = Path(path)
    image, affine, header = _read_nifti_header(path, as_float=True)
    if not np.all(np.isfinite(image)):
        raise DataError(path, f"image holds {int(np.count_nonzero(~np.isfinite(image)))} NaN or infinite voxels")
    return image, affine, header


def _body_threshold(image: np.ndarray, modality: str) -> float:
    if modality == "CT":
        return CT_BODY_HU
    return float(np.percentile(image, MR_BODY_PERCENTILE))


def _normalise(image: np.ndarray, body: np.ndarray, opts: PreprocessOptions) -> tuple[np.ndarray, dict[str, float]]:
    """CT with the training set's intensities: clip and z-score with them; otherwise z-score with the
    statistics of the case's body voxels (all voxels if no body was found)."""
    params: dict[str, float] = {}
    if opts.modality == "CT" and opts.intensity is not None:
        p = opts.intensity
        low, high, mean, std = p.percentile_00_5, p.percentile_99_5, p.mean, max(p.std, 1e-8)
        out = (np.clip(image, low, high) - np.float32(mean)) / np.float32(std)
        return out.astype(np.float32), {"clip_low": low, "clip_high": high, "mean": mean, "std": std}
    if opts.modality == "CT":
        low, high = (float(v) for v in opts.ct_window)
        image = np.clip(image, low, high)
        params.update(clip_low=low, clip_high=high)
    values = image[body] if body.any() else image.ravel()
    mean = float(values.mean(dtype=np.float64))
    std = float(values.std(dtype=np.float64))
    std = std if std > 1e-6 else 1.0  # a constant body would divide by zero
    params.update(mean=mean, std=std)
    return ((image - np.float32(mean)) / np.float32(std)).astype(np.float32), params


def foreground_intensities(image: np.ndarray, label: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` intensities drawn with replacement from the labelled voxels (none if the label is empty),
    on the case's own grid: every training case weighs the same in the dataset's statistics (nnU-Net's
    ``collect_foreground_intensities``)."""
    values = np.asarray(image)[np.asarray(label) > 0]
    if values.size == 0:
        return np.zeros(0, dtype=np.float32)
    return np.random.default_rng(seed).choice(values, size=count, replace=True).astype(np.float32)


def sample_foreground(label: np.ndarray, values: Sequence[int], count: int,
                      rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Up to ``count`` voxel coordinates per label value (an empty (0, 3) array where absent)."""
    coords = np.argwhere(label > 0)
    at = label[tuple(coords.T)] if coords.size else np.zeros(0, dtype=label.dtype)
    out = {}
    for value in values:
        mine = coords[at == value]
        if len(mine) > count:
            mine = mine[np.sort(rng.choice(len(mine), size=count, replace=False))]
        out[int(value)] = mine.astype(np.int32).reshape(-1, 3)
    return out


def preprocess_arrays(case_id: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                      opts: PreprocessOptions, seed: int, label_values: Sequence[int] | None = None) -> CaseRecord:
    """Everything after loading: RAS, target spacing, normalisation, body crop, foreground sample."""
    ras_image, ras_affine, axcodes = geo.reorient_to_ras(image, affine)
    ras_label, _, _ = geo.reorient_to_ras(label, affine)
    original_spacing = geo.voxel_spacing(ras_affine)
    spacing = tuple(float(s) for s in opts.target_spacing)
    ras_image = geo.resample(ras_image, original_spacing, spacing, order=1)
    ras_label = geo.resample_labels(ras_label, original_spacing, spacing)

    body = geo.largest_component(ras_image > _body_threshold(ras_image, opts.modality))
    margin = [math.ceil(opts.crop_margin_mm / s) for s in spacing]
    start, stop = geo.mask_box(body, margin)
    if ras_label.any():  # labelled voxels outside the body (or a body not found) must stay in the crop
        start, stop = geo.union_box((start, stop), geo.mask_box(ras_label > 0, margin))
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    # The body lies inside the box, so the statistics over body[box] are those of the whole body.
    normalised, params = _normalise(ras_image[box], body[box], opts)
    label_out = np.ascontiguousarray(ras_label[box], dtype=np.uint8)
    values = label_values if label_values is not None else [int(v) for v in np.unique(label_out) if v > 0]
    foreground = sample_foreground(label_out, values, opts.foreground_samples, np.random.default_rng(seed))
    geometry = geo.make_geometry(affine, image.shape, axcodes, ras_affine, spacing, start, stop)
    return CaseRecord(case_id, np.ascontiguousarray(normalised), label_out, geometry, params, foreground)
