"""nnU-Net's post-processing: the largest connected components of a label, where validation says so.

nnU-Net keeps a label's largest component when validation shows that this raises its Dice. Paired organs
lose one of the pair that way (two kidneys, left and right psoas under one label), so here a label keeps
as many components as it has in the training labels (``components``: the median count per training case
of components at least 5 % of the case's largest, ``geometry.component_count``, from ``build-shards``'
fingerprint; 1 where the shards do not say). Training scores every validation case twice, as predicted and with each label reduced
to its largest components (``largest_components``); after the final validation a label is listed in
run.json's ``postprocessing.keep_largest`` when that raised its mean Dice, and ``predict`` then applies it.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

KEY = "postprocessing"
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
"""26-connected, as nnU-Net's."""


def largest_components(label_map: np.ndarray, value: int, keep: int = 1) -> np.ndarray:
    """``label_map`` with every voxel of ``value`` outside its ``keep`` largest connected components set to
    background."""
    mask = label_map == value
    components, count = ndimage.label(mask, structure=CONNECTIVITY)
    if count <= keep:
        return label_map
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    kept = np.argsort(sizes, kind="stable")[::-1][:keep]
    out = label_map.copy()
    out[mask & ~np.isin(components, kept)] = 0
    return out


def apply(label_map: np.ndarray, keep: Mapping[int, int]) -> np.ndarray:
    """Reduce each label value of ``keep`` to its ``keep[value]`` largest components."""
    for value, count in keep.items():
        label_map = largest_components(label_map, int(value), int(count))
    return label_map


def decide(dice: Mapping[str, float], dice_largest: Mapping[str, float], labels: Mapping[str, int],
           components: Mapping[str, int]) -> dict:
    """The run.json record: the labels whose validation Dice rose when reduced to their largest components."""
    keep = [name for name in dice if dice_largest.get(name, -1.0) > dice[name]]
    return {"keep_largest": {name: int(labels[name]) for name in keep},
            "components": {name: int(components.get(name, 1)) for name in dice},
            "validation_dice": {name: round(float(dice[name]), 5) for name in dice},
            "validation_dice_largest_component": {name: round(float(dice_largest[name]), 5) for name in dice}}


def kept(decision: Mapping | None) -> dict[int, int]:
    """{label value: components to keep} of a run.json record (none: nothing to do)."""
    if not decision:
        return {}
    counts = decision.get("components", {})
    return {int(value): int(counts.get(name, 1)) for name, value in decision.get("keep_largest", {}).items()}


def training_components(manifest: Mapping) -> dict[str, int]:
    """Components per label in the training labels, from the shards' fingerprint (1 where it is silent)."""
    counts = (manifest.get("dataset_fingerprint") or {}).get("components") or {}
    return {name: max(1, int(counts.get(name, 1))) for name, value in manifest.get("labels", {}).items() if value}
