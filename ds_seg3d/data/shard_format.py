"""The one owner of the HDF5 shard schema and the manifest: the writer and every reader import from here.

Layout of one shard file (``shard_00000.h5``)::

    /                       attrs: schema_version, dataset
    /cases/<case_id>/       attrs: the CaseGeometry fields and the normalisation parameters
        image               float32 (X, Y, Z), chunked, compressed with the build's codec
        label               uint8   (X, Y, Z), same chunks and codec
        foreground/<value>  int32   (N, 3): a sample of voxel coordinates of label value <value>

Arrays are in the canonical (RAS+) orientation on the target spacing, cropped to the body plus a
margin. ``CaseGeometry`` records everything needed to map a shard-space array back onto the
original NIfTI grid (see ``ds_seg3d.data.geometry``).

The dataset folder holds the shards and ``manifest.json``, written last and atomically.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import h5py
import hdf5plugin
import numpy as np

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard_{:05d}.h5"
CASES = "cases"
IMAGE = "image"
LABEL = "label"
FOREGROUND = "foreground"
DEFAULT_CODEC = "blosc-lz4"
DEFAULT_CHUNK = 64
# Chunk cache per open dataset: large enough for every chunk a 128^3 patch touches (3^3 chunks of 64^3 fp32).
DEFAULT_CACHE_BYTES = 64 * 2**20


def codec_options(name: str) -> dict[str, Any]:
    """h5py ``create_dataset`` keyword arguments for a codec name (see ``CODECS``)."""
    if name == "none":
        return {}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if name == "lz4":
        return dict(hdf5plugin.LZ4())
    if name == "blosc-lz4":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if name == "zstd":
        return dict(hdf5plugin.Zstd(clevel=3))
    raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")


CODECS = ("none", "lz4", "blosc-lz4", "zstd", "gzip")


@dataclasses.dataclass
class CaseGeometry:
    """Where a shard-space array sits relative to the original NIfTI grid."""

    original_affine: np.ndarray  # (4, 4) affine of the input NIfTI
    original_shape: tuple[int, int, int]  # shape of the input NIfTI
    original_axcodes: str  # orientation of the input, e.g. "LPS"
    original_spacing: tuple[float, float, float]  # voxel size after reorientation to RAS, mm
    spacing: tuple[float, float, float]  # voxel size in the shard (target spacing), mm
    resampled_shape: tuple[int, int, int]  # canonical grid after resampling, before the crop
    crop_start: tuple[int, int, int]  # crop box in the resampled grid, start inclusive
    crop_stop: tuple[int, int, int]  # stop exclusive
    affine: np.ndarray  # (4, 4) affine of the shard array itself (RAS, cropped, resampled)

    def to_attrs(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = np.asarray(v) if not isinstance(v, str) else v
        return out

    @classmethod
    def from_attrs(cls, attrs: Any) -> "CaseGeometry":
        kw = {}
        for f in dataclasses.fields(cls):
            v = attrs[f.name]
            if f.name in ("original_affine", "affine"):
                kw[f.name] = np.asarray(v, dtype=np.float64)
            elif f.name == "original_axcodes":
                kw[f.name] = v.decode() if isinstance(v, bytes) else str(v)
            elif "spacing" in f.name:
                kw[f.name] = tuple(float(x) for x in v)
            else:
                kw[f.name] = tuple(int(x) for x in v)
        return cls(**kw)

    def to_json(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.to_attrs().items()}


@dataclasses.dataclass
class CaseRecord:
    """One preprocessed case, ready to be written into a shard."""

    case_id: str
    image: np.ndarray  # float32 (X, Y, Z)
    label: np.ndarray  # uint8 (X, Y, Z)
    geometry: CaseGeometry
    normalisation: dict[str, float]  # e.g. {"clip_low": -160, "clip_high": 240, "mean": .., "std": ..}
    foreground: dict[int, np.ndarray]  # label value -> (N, 3) int32 voxel coordinates


class ShardWriter:
    """Writes cases into one shard file under a temporary name; ``close()`` renames it into place.

    A build interrupted before ``close`` leaves only ``*.h5.tmp`` files, never a complete-looking shard.
    """

    def __init__(self, path: str | os.PathLike, dataset: str, codec: str = DEFAULT_CODEC,
                 chunk: int = DEFAULT_CHUNK):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.codec = codec_options(codec)
        self.chunk = chunk
        self.file = h5py.File(self.tmp, "w")
        self.file.attrs["schema_version"] = SCHEMA_VERSION
        self.file.attrs["dataset"] = dataset
        self.file.create_group(CASES)

    def write_case(self, rec: CaseRecord) -> None:
        g = self.file[CASES].create_group(rec.case_id)
        chunks = tuple(min(self.chunk, s) for s in rec.image.shape)
        g.create_dataset(IMAGE, data=rec.image.astype(np.float32, copy=False), chunks=chunks, **self.codec)
        g.create_dataset(LABEL, data=rec.label.astype(np.uint8, copy=False), chunks=chunks, **self.codec)
        fg = g.create_group(FOREGROUND)
        for value, coords in rec.foreground.items():
            fg.create_dataset(str(int(value)), data=np.asarray(coords, dtype=np.int32).reshape(-1, 3))
        for k, v in rec.geometry.to_attrs().items():
            g.attrs[k] = v
        for k, v in rec.normalisation.items():
            g.attrs[f"norm_{k}"] = v

    def close(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def open_shard(path: str | os.PathLike, cache_bytes: int = DEFAULT_CACHE_BYTES) -> h5py.File:
    """Open a shard read-only with a chunk cache large enough for a patch's chunks."""
    f = h5py.File(path, "r", rdcc_nbytes=cache_bytes, rdcc_nslots=10007)
    version = int(f.attrs.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        f.close()
        raise ValueError(f"{path}: shard schema version {version}, this reader understands {SCHEMA_VERSION}")
    return f


def case_ids(f: h5py.File) -> list[str]:
    return list(f[CASES].keys())


def case_group(f: h5py.File, case_id: str) -> h5py.Group:
    return f[CASES][case_id]


def read_geometry(group: h5py.Group) -> CaseGeometry:
    return CaseGeometry.from_attrs(group.attrs)


def read_normalisation(group: h5py.Group) -> dict[str, float]:
    return {k[len("norm_"):]: float(v) for k, v in group.attrs.items() if k.startswith("norm_")}


def read_foreground(group: h5py.Group) -> dict[int, np.ndarray]:
    return {int(k): ds[()] for k, ds in group[FOREGROUND].items()}


def sha256_file(path: str | os.PathLike, block: int = 2**22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON under a temporary name in the same folder, fsync, then rename into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST_NAME
    write_json_atomic(path, {"schema_version": SCHEMA_VERSION, **manifest})
    return path


def load_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Read ``manifest.json`` of a shard folder; a clear ValueError names the file and the problem."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{path}: no manifest (not a shard folder, or its build did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema version {version}, this reader understands {SCHEMA_VERSION}")
    return manifest


def iter_cases(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from manifest["cases"].items()
