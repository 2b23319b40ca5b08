"""nnU-Net's post-processing: keep only the largest connected component of a label, where validation
showed that it helps.

Training scores every validation case twice, as predicted and with each label reduced to its largest
component (``largest_component``); after the final validation a label is listed in run.json's
``postprocessing.keep_largest`` when that raised its mean Dice, and ``predict`` then applies it. A label
with two true parts (two kidneys, left and right psoas) loses one of them this way, so validation
rejects it for such labels, as it should.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from scipy import ndimage

KEY = "postprocessing"


def largest_component(label_map: np.ndarray, value: int) -> np.ndarray:
    """``label_map`` with every voxel of ``value`` outside its largest connected component (26-connected,
    as nnU-Net's) set to background."""
    mask = label_map == value
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return label_map
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    out = label_map.copy()
    out[mask & (components != int(sizes.argmax()))] = 0
    return out


def apply(label_map: np.ndarray, values: Iterable[int]) -> np.ndarray:
    """Keep the largest component of each of ``values``."""
    for value in values:
        label_map = largest_component(label_map, int(value))
    return label_map


def decide(dice: Mapping[str, float], dice_largest: Mapping[str, float], labels: Mapping[str, int]) -> dict:
    """The run.json record: the labels whose validation Dice rose when reduced to the largest component."""
    keep = [name for name in dice if dice_largest.get(name, -1.0) > dice[name]]
    return {"keep_largest": {name: int(labels[name]) for name in keep},
            "validation_dice": {name: round(float(dice[name]), 5) for name in dice},
            "validation_dice_largest_component": {name: round(float(dice_largest[name]), 5) for name in dice}}
