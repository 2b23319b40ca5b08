"""nnU-Net v2's rules for configuring a U-Net from the data, ported axis for axis.

From nnunetv2 2.8.1 (``experiment_planning/experiment_planners/network_topology.py`` and
``default_experiment_planner.py``):

- ``target_spacing``: the median voxel spacing, except for an axis that is more than 3x coarser than
  the others *and* has more than 3x fewer voxels: that axis gets the 10th percentile of its spacings
  (never finer than the other axes).
- ``pool_and_conv``: an axis is pooled (stride 2) only while its current spacing is under 2x the finest
  and while it keeps at least twice the minimum edge (4 voxels) at the bottleneck; a kernel stays 1 on
  an axis until its spacing is within 2x of the finest, then 3; the bottleneck's kernel is 3 on every
  axis; the patch is padded up to a multiple of the strides' product.
- ``initial_patch``: a patch of 256^3 voxels (3D) or 2048^2 (2D) shaped like the inverse spacing (the
  same extent in mm per axis), clipped to the median shape.

Axes are whatever order the caller uses (X, Y, Z here; nnU-Net's own order is z, y, x): the rules
treat every axis alike.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_EDGE = 4
"""Smallest edge of a bottleneck feature map (nnU-Net's ``UNet_featuremap_min_edge_length``)."""
ANISOTROPY = 3.0
"""An axis this much coarser (and with this many fewer voxels) is resampled finer (``ANISO_THRESHOLD``)."""


@dataclass(frozen=True)
class Topology:
    """A U-Net's per-level pooling strides and conv kernels for one patch, finest level first."""

    strides: tuple[tuple[int, ...], ...]
    """Per level and axis; the first is all ones."""
    kernels: tuple[tuple[int, ...], ...]
    """Per level and axis; the last (bottleneck) is all threes."""
    patch: tuple[int, ...]
    """The patch, padded up to a multiple of ``divisor``."""

    @property
    def levels(self) -> int:
        return len(self.strides)

    @property
    def divisor(self) -> tuple[int, ...]:
        """What the patch must be divisible by, per axis: the product of the strides."""
        return tuple(int(math.prod(s[a] for s in self.strides)) for a in range(len(self.patch)))


def pad_shape(shape: Sequence[int], divisor: Sequence[int]) -> tuple[int, ...]:
    """Each axis rounded up to a multiple of its divisor (nnU-Net's ``pad_shape``)."""
    return tuple(int(math.ceil(s / d) * d) for s, d in zip(shape, divisor))


def pool_and_conv(spacing: Sequence[float], patch: Sequence[int], min_edge: int = MIN_EDGE) -> Topology:
    """nnU-Net's ``get_pool_and_conv_props`` (``max_numpool`` unlimited, as its planner calls it)."""
    dim = len(spacing)
    if len(patch) != dim:
        raise ValueError(f"spacing {tuple(spacing)} and patch {tuple(patch)} differ in length")
    current_spacing = [float(s) for s in spacing]
    current_size = [float(n) for n in patch]
    strides = [[1] * dim]
    kernels: list[list[int]] = []
    pools = [0] * dim
    kernel = [1] * dim
    while True:
        valid = [i for i in range(dim) if current_size[i] >= 2 * min_edge]
        if not valid:
            break
        finest = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / finest < 2]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_edge:
            break
        if not valid:
            break
        for d in range(dim):
            if kernel[d] != 3 and current_spacing[d] / min(current_spacing) < 2:
                kernel[d] = 3
        stride = [1] * dim
        for v in valid:
            stride[v] = 2
            pools[v] += 1
            current_spacing[v] *= 2
            current_size[v] = math.ceil(current_size[v] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)
    divisor = [2**p for p in pools]
    return Topology(tuple(tuple(s) for s in strides), tuple(tuple(k) for k in kernels), pad_shape(patch, divisor))


def initial_patch(spacing: Sequence[float], median_shape: Sequence[float], voxels: float) -> tuple[int, ...]:
    """A patch of about ``voxels`` voxels with the same extent in mm on every axis, clipped to the median shape."""
    inverse = 1.0 / np.asarray(spacing, dtype=np.float64)
    scale = (voxels / float(np.prod(inverse))) ** (1.0 / len(inverse))
    return tuple(int(min(round(float(i * scale)), round(float(m)))) for i, m in zip(inverse, median_shape))


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]],
                   anisotropy: float = ANISOTROPY) -> tuple[float, ...]:
    """nnU-Net's ``determine_fullres_target_spacing`` from per-case spacings and shapes."""
    spacings = np.asarray(spacings, dtype=np.float64)
    target = np.percentile(spacings, 50, axis=0)
    sizes = np.percentile(np.asarray(shapes, dtype=np.float64), 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    aniso_spacing = target[worst] > anisotropy * max(target[i] for i in others)
    aniso_voxels = sizes[worst] * anisotropy < min(sizes[i] for i in others)
    if aniso_spacing and aniso_voxels:
        axis = float(np.percentile(spacings[:, worst], 10))
        if axis < max(target[i] for i in others):
            axis = max(max(target[i] for i in others), axis) + 1e-5
        target[worst] = axis
    return tuple(float(t) for t in target)


def reduce_patch(spacing: Sequence[float], patch: Sequence[int], median_shape: Sequence[float],
                 min_edge: int = MIN_EDGE) -> Topology:
    """One step of nnU-Net's shrinking loop: the axis largest relative to the median shape loses one
    divisor's worth of voxels (the divisor of the smaller patch), and the topology is recomputed."""
    current = pool_and_conv(spacing, patch, min_edge)
    axis = int(np.argsort([p / m for p, m in zip(current.patch, median_shape)])[-1])
    trial = list(current.patch)
    trial[axis] -= current.divisor[axis]
    divisor = pool_and_conv(spacing, trial, min_edge).divisor
    smaller = list(current.patch)
    smaller[axis] -= divisor[axis]
    if smaller[axis] < 1:
        raise ValueError(f"cannot shrink patch {current.patch} further along axis {axis}")
    return pool_and_conv(spacing, smaller, min_edge)
