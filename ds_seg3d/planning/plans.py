"""The plans of a shard folder: one 3D U-Net and one slice-wise 2D U-Net configured from the data.

``plan_network`` follows nnU-Net's ``get_plans_for_configuration``: a first patch with the same extent
in mm on every axis (256^3 voxels in 3D, 2048^2 in 2D, clipped to the median shape), the topology
nnU-Net's rules give it (``rules.pool_and_conv``), widths from a base that doubles per level up to a
cap (nnU-Net: 32, capped at 320 in 3D and 512 in 2D), then shrinking the patch one axis at a time
until ``fits`` says it fits. nnU-Net's ``fits`` is a feature-map count against one 8 GB GPU; here it is
a memory prediction for the whole pipeline (``ds_seg3d.memory.planner``), so more stages buy more
context. The 2D network reads slices; its patch is an in-plane patch of as many slices as give the
3D plan's voxels per sample (the same data per step).

``plans.json`` in the shard folder holds both, with the reasons for each choice in words.
``model.name = "planned"`` in an experiment config trains one of them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ds_seg3d.planning.rules import initial_patch, pool_and_conv, reduce_patch

PLANS_NAME = "plans.json"
CONFIGURATIONS = {"3d": "unet3d", "2d": "cnn2d"}
"""Planned configuration -> the network that runs it."""
PATCH_VOXELS = {"3d": 256**3, "2d": 2048**2}
"""nnU-Net's first patch, in voxels (3D) or pixels per slice (2D)."""
BASE_WIDTH = 32
MAX_WIDTH = {"3d": 320, "2d": 512}
CONVS_PER_LEVEL = 2

Fits = Callable[[str, dict[str, Any], tuple[int, int, int]], tuple[bool, float]]
"""``fits(model, params, patch) -> (fits, predicted peak bytes)`` for one candidate network."""


@dataclasses.dataclass
class NetworkPlan:
    """One planned network: what to build, the patch to train it on, and why."""

    configuration: str
    """"3d" or "2d"."""
    model: str
    """The network that runs it (``ds_seg3d.models.MODEL_CONFIGS``)."""
    params: dict[str, Any]
    """Fields of its config (levels, widths, strides, kernels, deep supervision)."""
    patch: tuple[int, int, int]
    """Training patch (X, Y, Z) in voxels; the 2D network reads its Z slices one by one."""
    spacing: tuple[float, float, float]
    """The shards' voxel spacing it was planned for (mm, X Y Z)."""
    median_shape: tuple[float, float, float]
    """Median shape of the training cases in the shards (voxels)."""
    predicted_peak_bytes: float | None = None
    """The largest rank's predicted peak for the layout it was sized for (None: not sized)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """Each decision and its reason, for people."""

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "NetworkPlan":
        kw = dict(raw)
        kw["patch"] = tuple(int(v) for v in kw["patch"])
        kw["spacing"] = tuple(float(v) for v in kw["spacing"])
        kw["median_shape"] = tuple(float(v) for v in kw["median_shape"])
        return cls(**kw)

    def describe(self) -> str:
        p = self.params
        strides = " ".join("x".join(map(str, s)) for s in p.get("strides", ()))
        kernels = " ".join("x".join(map(str, k)) for k in p.get("kernels", ()))
        widths = [min(p["base_width"] * 2**i, p["max_width"]) for i in range(p["levels"])]
        peak = "" if self.predicted_peak_bytes is None else f", predicted peak {self.predicted_peak_bytes / 2**30:.2f} GiB"
        return (f"{self.configuration}: {self.model}, patch {'x'.join(map(str, self.patch))}, {p['levels']} levels, "
                f"widths {'-'.join(map(str, widths))}, strides {strides}, kernels {kernels}, deep supervision "
                f"{'on' if p.get('deep_supervision') else 'off'}{peak}")


@dataclasses.dataclass
class Plans:
    """``plans.json``: the planned networks of one shard folder and what they were sized for."""

    dataset: str
    target: dict[str, Any]
    """What the patch was sized for: budget per rank, ranks, stages, micro-batches, precision, method."""
    configurations: dict[str, NetworkPlan]

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "target": self.target,
                "configurations": {k: v.to_json() for k, v in self.configurations.items()}}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Plans":
        return cls(raw["dataset"], dict(raw["target"]),
                   {k: NetworkPlan.from_json(v) for k, v in raw["configurations"].items()})

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/plans.json`` under a temporary name, then rename."""
        path = Path(folder) / PLANS_NAME
        tmp = path.with_name(".tmp-" + path.name)
        text = json.dumps(self.to_json(), indent=1)
        # lists of numbers on one line: a stride reads [2, 2, 1], not five lines
        text = re.sub(r"\[\s+([-\d.e,\s]+?)\s+\]", lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]",
                      text)
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Plans":
        path = Path(folder) / PLANS_NAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: missing; plan the shards with `ds-seg3d plan {folder} --budget-gb GB "
                             f"--ranks N`, or name a model in the experiment config") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(raw)


def median_training_shape(manifest: dict[str, Any]) -> tuple[float, float, float]:
    """Median shard shape (voxels at the target spacing, after the body crop) of the non-test cases."""
    test = set(manifest.get("splits", {}).get("test") or [])
    shapes = [e["shape"] for c, e in manifest["cases"].items() if c not in test] or \
        [e["shape"] for e in manifest["cases"].values()]
    return tuple(float(v) for v in np.median(np.asarray(shapes, dtype=np.float64), axis=0))  # type: ignore[return-value]


def plan_network(configuration: str, spacing: Sequence[float], median_shape: Sequence[float], fits: Fits, *,
                 base_width: int = BASE_WIDTH, max_width: int | None = None, deep_supervision: bool = True,
                 voxels_per_sample: int | None = None, reason: str = "") -> NetworkPlan:
    """nnU-Net's planning loop for one configuration ("3d", or "2d" on slices), sized by ``fits``.

    ``voxels_per_sample``: for "2d", the voxels of one sample to match (the 3D plan's patch volume).
    """
    if configuration not in CONFIGURATIONS:
        raise ValueError(f"configuration must be one of {', '.join(CONFIGURATIONS)}, got {configuration!r}")
    model = CONFIGURATIONS[configuration]
    cap = max_width if max_width is not None else MAX_WIDTH[configuration] * base_width // BASE_WIDTH
    axes = 3 if configuration == "3d" else 2
    spacing, median = tuple(float(s) for s in spacing), tuple(float(m) for m in median_shape)
    notes = [f"spacing {' x '.join(f'{s:g}' for s in spacing)} mm, median shape "
             f"{' x '.join(f'{m:g}' for m in median)} (training cases, after the crop)"]
    first = initial_patch(spacing[:axes], median[:axes], PATCH_VOXELS[configuration])
    topo = pool_and_conv(spacing[:axes], first)
    notes.append(f"first patch {'x'.join(map(str, first))}: {PATCH_VOXELS[configuration]:,} voxels of equal extent "
                 f"in mm per axis, clipped to the median shape (nnU-Net)")

    def candidate(topology) -> tuple[dict[str, Any], tuple[int, int, int]]:
        if axes == 3:
            strides, kernels, patch = topology.strides, topology.kernels, tuple(topology.patch)
        else:
            strides = tuple((*s, 1) for s in topology.strides)
            kernels = tuple((*k, 1) for k in topology.kernels)
            plane = topology.patch[0] * topology.patch[1]
            slices = max(2, round((voxels_per_sample or plane) / plane))
            patch = (*topology.patch, int(min(slices, max(2, round(median[2])))))
        params = {"levels": topology.levels, "base_width": base_width, "max_width": cap,
                  "convs_per_level": CONVS_PER_LEVEL, "strides": [list(s) for s in strides],
                  "kernels": [list(k) for k in kernels], "deep_supervision": deep_supervision}
        return params, patch  # type: ignore[return-value]

    def try_fit(params: dict[str, Any], patch: tuple[int, int, int]) -> tuple[bool, float]:
        try:
            return fits(model, params, patch)
        except ValueError:  # a patch too small for any network of this topology
            return False, math.inf

    params, patch = candidate(topo)
    ok, peak = try_fit(params, patch)
    shrunk = 0
    while not ok:
        try:
            topo = reduce_patch(spacing[:axes], topo.patch, median[:axes])
        except ValueError:
            raise ValueError(f"{configuration}: no patch fits ({reason or 'the budget'}); the smallest tried was "
                             f"{'x'.join(map(str, patch))} at {peak / 2**30:.2f} GiB") from None
        params, patch = candidate(topo)
        ok, peak = try_fit(params, patch)
        shrunk += 1
    notes.append(f"patch {'x'.join(map(str, patch))} after {shrunk} reduction(s) of the axis largest against the "
                 f"median shape: the largest that fits {reason or 'the budget'}")
    notes.append(f"topology by nnU-Net's rules: an axis is pooled while its spacing is under 2x the finest, kernel 1 "
                 f"until within 2x, at least 4 voxels per axis at the bottleneck: {topo.levels} levels")
    widths = [min(base_width * 2**i, cap) for i in range(topo.levels)]
    notes.append(f"widths {'-'.join(map(str, widths))}: base {base_width} doubling per level, capped at {cap}"
                 + ("" if base_width == BASE_WIDTH else f" (nnU-Net: {BASE_WIDTH}, capped at {MAX_WIDTH[configuration]})"))
    if configuration == "2d":
        notes.append(f"{patch[2]} slices per sample: the 3D plan's voxels per sample (the same data per step)")
    if deep_supervision:
        notes.append("deep supervision on: losses on the decoder levels weighted 1/2^i, the coarsest at 0 (nnU-Net)")
    return NetworkPlan(configuration, model, params, patch, spacing, median, float(peak), notes)


def voxels(patch: Sequence[int]) -> int:
    return int(math.prod(patch))
