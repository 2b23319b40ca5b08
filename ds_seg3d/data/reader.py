"""Random access to the cases of a shard folder: whole volumes, padded patches, foreground coordinates.

HDF5 handles must not be shared between processes: a handle inherited through ``fork`` (DataLoader
workers) shares the parent's library state and file offsets. The reader therefore opens shards lazily,
remembers which process opened them, and silently reopens them in any other process. Pickling drops
the handles, so a reader can also be sent to spawned workers.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ds_seg3d.data import shard_format as sf

_REQUIRED_KEYS = ("labels", "shards", "cases", "splits")


MAX_OPEN_CASES = 4


class ShardReadError(ValueError):
    """A shard that the manifest lists cannot be read (changed or truncated after the build)."""


class ShardReader:
    """Reads cases of one shard folder through its ``manifest.json``.

    Args:
        folder: the shard folder (holds ``manifest.json`` and the shard files).
        cache_bytes: HDF5 chunk cache per open dataset; it should hold every chunk one patch touches,
            otherwise neighbouring patch reads decompress the same chunks again.
    """

    def __init__(self, folder: str | os.PathLike, cache_bytes: int = sf.DEFAULT_CACHE_BYTES):
        self.folder = Path(folder)
        self.cache_bytes = int(cache_bytes)
        self.manifest: dict[str, Any] = sf.load_manifest(self.folder)
        self._manifest_path = self.folder / sf.MANIFEST_NAME
        missing = [k for k in _REQUIRED_KEYS if k not in self.manifest]
        if missing:
            raise ValueError(f"{self._manifest_path}: missing key(s) {', '.join(missing)}")
        self._reset_process_state()

    # -- process-local state -------------------------------------------------------------------
    def _reset_process_state(self) -> None:
        """Forget handles and caches; the next read opens shards for the current process."""
        self._pid: int | None = None
        self._files: dict[str, h5py.File] = {}
        # Least recently used first: each open dataset keeps its own chunk cache of up to cache_bytes.
        self._datasets: OrderedDict[str, tuple[h5py.Dataset, h5py.Dataset]] = OrderedDict()
        self._foreground: dict[str, dict[int, np.ndarray]] = {}
        self._pad: dict[str, float] = {}

    def _check_process(self) -> None:
        pid = os.getpid()
        if self._pid is not None and self._pid != pid:
            # Inherited through fork: never touch the parent's handles (not even to close them),
            # dropping our references only releases this process's copies.
            self._reset_process_state()
        self._pid = pid

    @property
    def owner_pid(self) -> int | None:
        """The process whose HDF5 handles are currently open, or None when none are."""
        return self._pid if self._files else None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_pid", "_files", "_datasets", "_foreground", "_pad"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    def close(self) -> None:
        """Close the handles this process opened (inherited ones are only forgotten)."""
        if self._pid == os.getpid():
            self._datasets.clear()
            for f in self._files.values():
                f.close()
        self._reset_process_state()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- manifest --------------------------------------------------------------------------------
    @property
    def labels(self) -> dict[str, int]:
        """Shard label name -> value, background included."""
        return {str(k): int(v) for k, v in self.manifest["labels"].items()}

    def case_ids(self, split: str | None = None) -> list[str]:
        """All cases in manifest order, or the cases of one split."""
        if split is None:
            return list(self.manifest["cases"])
        splits = self.manifest["splits"]
        if split not in splits:
            raise ValueError(f"{self._manifest_path}: no split {split!r} (has {', '.join(splits) or 'none'})")
        ids = [str(c) for c in splits[split]]
        unknown = [c for c in ids if c not in self.manifest["cases"]]
        if unknown:
            raise ValueError(f"{self._manifest_path}: split {split!r} names unknown case(s) {', '.join(unknown[:5])}")
        return ids

    def _entry(self, case: str) -> dict[str, Any]:
        try:
            return self.manifest["cases"][case]
        except KeyError:
            raise ValueError(f"{self._manifest_path}: no case {case!r}") from None

    def shape(self, case: str) -> tuple[int, int, int]:
        """Shape of the case's arrays in shard space (from the manifest: no file access)."""
        return tuple(int(s) for s in self._entry(case)["shape"])  # type: ignore[return-value]

    # -- shard access ----------------------------------------------------------------------------
    @contextmanager
    def _reading(self, case: str) -> Iterator[None]:
        """HDF5's errors while reading a case, as one line naming its shard and the case."""
        try:
            yield
        except (OSError, RuntimeError, KeyError) as e:
            shard = self.folder / str(self._entry(case)["shard"])
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ShardReadError(f"{shard}: case {case!r} cannot be read ({first}); the shard changed or was "
                                 f"truncated after it was built") from None

    def _group(self, case: str) -> h5py.Group:
        self._check_process()
        shard = str(self._entry(case)["shard"])
        f = self._files.get(shard)
        if f is None:
            path = self.folder / shard
            if not path.is_file():
                raise ValueError(f"{path}: shard listed in {sf.MANIFEST_NAME} is missing")
            with self._reading(case):
                f = self._files[shard] = sf.open_shard(path, self.cache_bytes)
        try:
            return sf.case_group(f, case)
        except KeyError:
            raise ValueError(f"{self.folder / shard}: has no case {case!r} (the manifest says it does)") from None

    def _arrays(self, case: str) -> tuple[h5py.Dataset, h5py.Dataset]:
        self._check_process()
        ds = self._datasets.get(case)
        if ds is None:
            g = self._group(case)
            with self._reading(case):
                ds = self._datasets[case] = (g[sf.IMAGE], g[sf.LABEL])
            while len(self._datasets) > MAX_OPEN_CASES:  # bounds chunk-cache memory over many cases
                self._datasets.popitem(last=False)
        else:
            self._datasets.move_to_end(case)
        return ds

    def geometry(self, case: str) -> sf.CaseGeometry:
        """How the case's shard arrays map back onto its original NIfTI grid."""
        group = self._group(case)
        with self._reading(case):
            return sf.read_geometry(group)

    def normalisation(self, case: str) -> dict[str, float]:
        """The intensity normalisation parameters stored with the case (``norm_*`` attributes)."""
        group = self._group(case)
        with self._reading(case):
            return sf.read_normalisation(group)

    def pad_value(self, case: str) -> float:
        """Image value used outside the volume: the case's ``norm_pad``, else 0.0 (the normalised mean)."""
        self._check_process()
        if case not in self._pad:
            self._pad[case] = float(self.normalisation(case).get("pad", 0.0))
        return self._pad[case]

    def foreground(self, case: str) -> dict[int, np.ndarray]:
        """Label value -> (N, 3) sampled voxel coordinates, for the non-empty, non-background values.

        Cached per process: foreground oversampling asks for it on nearly every patch.
        """
        self._check_process()
        fg = self._foreground.get(case)
        if fg is None:
            group = self._group(case)
            with self._reading(case):
                raw = sf.read_foreground(group)
            fg = {v: c.reshape(-1, 3) for v, c in sorted(raw.items()) if v != 0 and c.size}
            self._foreground[case] = fg
        return fg

    def read_case(self, case: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole (image float32, label uint8) of a case."""
        image, label = self._arrays(case)
        with self._reading(case):
            return image[()], label[()]

    def read_patch(self, case: str, start: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(image float32, label uint8) of exactly ``size`` starting at voxel ``start``.

        ``start`` may be negative and the box may run past the end: the part outside the volume is
        padded (image with ``pad_value``, label with 0). Only the in-bounds hyperslab is read, so a
        patch costs the chunks it touches and nothing more.
        """
        image_ds, label_ds = self._arrays(case)
        start_a = np.asarray(start, dtype=np.int64).reshape(-1)
        size_a = np.asarray(size, dtype=np.int64).reshape(-1)
        if start_a.size != 3 or size_a.size != 3 or np.any(size_a <= 0):
            raise ValueError(f"{self.folder}: case {case!r}: bad patch start {tuple(start)} / size {tuple(size)}")
        shape = np.asarray(image_ds.shape, dtype=np.int64)
        lo = np.clip(start_a, 0, shape)
        hi = np.clip(start_a + size_a, 0, shape)
        out_shape = tuple(int(s) for s in size_a)
        image = np.full(out_shape, self.pad_value(case), dtype=np.float32)
        label = np.zeros(out_shape, dtype=np.uint8)
        if np.all(hi > lo):
            src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start_a))
            with self._reading(case):
                image_ds.read_direct(image, source_sel=src, dest_sel=dst)
                label_ds.read_direct(label, source_sel=src, dest_sel=dst)
        return image, label

    def __repr__(self) -> str:
        return f"ShardReader({str(self.folder)!r}, cases={len(self.manifest['cases'])})"
