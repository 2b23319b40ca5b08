"""One prediction input from file to file, shared by both predictors (one device and pipelined).

``InputCase.read`` loads a NIfTI image and preprocesses it exactly as the shards were (RAS, target
spacing, normalisation, body crop); ``finish`` maps the network's probabilities back onto the input's
own grid (undo crop, resampling and reorientation), writes ``<out>/<input name>`` with the input's
affine and header, and returns the case's volumes row. ``model_from_run`` and ``preprocess_options``
rebuild the network and the preprocessing from a run folder's ``run.json``.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from ds_seg3d.data.geometry import to_original_grid
from ds_seg3d.data.preprocess import IntensityProperties, PreprocessOptions, load_image, preprocess_arrays
from ds_seg3d.data.shard_format import CaseGeometry
from ds_seg3d.evaluation.metrics import volumes_ml
from ds_seg3d.inference import postprocess
from ds_seg3d.models import MODEL_CONFIGS, build_layers
from ds_seg3d.results import write_csv_atomic


def model_from_run(info: dict):
    """The run's model config object and layer list, rebuilt from run.json."""
    name = info["model"]["name"]
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in info["model"]["config"].items()}
    cfg = MODEL_CONFIGS[name](**raw)
    return cfg, build_layers(name, cfg)


MIRROR_AXES = {"unet3d": (0, 1, 2), "deep_cnn": (0, 1, 2), "cnn2d": (0, 1)}
"""Test-time mirroring per network: a slice-wise network gains nothing from reordering its slices."""


def mirror_axes(info: dict) -> tuple[int, ...]:
    return MIRROR_AXES.get(info["model"]["name"], (0, 1, 2))


def keep_largest(info: dict) -> dict[int, int]:
    """{label value: components to keep}: the run's post-processing (run.json), empty when none."""
    return postprocess.kept(info.get(postprocess.KEY))


def preprocess_options(info: dict) -> PreprocessOptions:
    """The shards' preprocessing, from run.json: spacing, crop margin and the intensity normalisation
    (for CT the training set's clip range, mean and std, so every input is normalised like the shards)."""
    pre = info["preprocessing"]
    norm = pre.get("normalisation") or {}
    kw = {"target_spacing": tuple(pre["target_spacing"]), "modality": pre.get("modality") or "CT"}
    if norm.get("method") == "dataset":
        kw["intensity"] = IntensityProperties(
            mean=norm["mean"], std=norm["std"], median=float("nan"), min=norm["clip_low"], max=norm["clip_high"],
            percentile_00_5=norm["clip_low"], percentile_99_5=norm["clip_high"])
    if "ct_window" in norm:
        kw["ct_window"] = tuple(norm["ct_window"])
    if "crop_margin_mm" in norm:
        kw["crop_margin_mm"] = float(norm["crop_margin_mm"])
    return PreprocessOptions(**kw, require_foreground=False)


def to_input_grid(probs: torch.Tensor, geometry: CaseGeometry) -> np.ndarray:
    """Argmax of the probabilities resampled (trilinear) onto the input grid; background outside the crop."""
    fill = [1.0] + [0.0] * (probs.shape[0] - 1)
    return to_original_grid(probs.numpy(), geometry, order=1, fill=fill).argmax(0).astype(np.uint8)


def write_label(label: np.ndarray, affine: np.ndarray, header: Any, out: Path) -> None:
    """Write under a temporary name, then rename: no half-written NIfTI is ever left behind."""
    img = nib.Nifti1Image(label, affine, header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    tmp = out.with_name(".tmp-" + out.name)
    nib.save(img, tmp)
    os.replace(tmp, out)


def write_volumes(rows: list[dict], out_dir: Path) -> Path:
    """``<out_dir>/volumes.csv``: one row of millilitres per label for every input."""
    path = out_dir / "volumes.csv"
    write_csv_atomic(path, rows)
    return path


@dataclasses.dataclass
class InputCase:
    """A prediction input, preprocessed into shard space, with what it takes to go back."""

    path: Path
    image: torch.Tensor
    """(1, X, Y, Z) in shard space: RAS, target spacing, normalised, cropped to the body."""
    geometry: CaseGeometry
    affine: np.ndarray
    header: Any

    @classmethod
    def read(cls, path: Path, opts: PreprocessOptions) -> "InputCase":
        image, affine, header = load_image(path)
        record = preprocess_arrays(path.name, image, np.zeros(image.shape, np.uint8), affine, opts, seed=0,
                                   label_values=[])
        return cls(Path(path), torch.from_numpy(record.image)[None], record.geometry, affine, header)

    @property
    def name(self) -> str:
        """The output's file name: the input's own, in the output folder."""
        return self.path.name

    def finish(self, probs: torch.Tensor, out_dir: Path, labels: dict[str, int],
               keep_largest: Mapping[int, int] | None = None) -> dict:
        """Write the label map on the input grid, ``keep_largest`` labels (value: components) reduced to their
        largest components (the run's post-processing); returns (and prints) the volumes row."""
        label = postprocess.apply(to_input_grid(probs, self.geometry), keep_largest or {})
        write_label(label, self.affine, self.header, out_dir / self.name)
        vols = volumes_ml(label, self.affine, labels)
        print(f"{self.name}: " + ", ".join(f"{k} {v:.1f} mL" for k, v in vols.items()), flush=True)
        return {"case": self.name, **{f"{k}_ml": round(v, 3) for k, v in vols.items()}}
