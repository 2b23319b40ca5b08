"""nnU-Net's planning rules against answers computed with nnunetv2 2.8.1's own functions.

The expected strides, kernels and patches below were produced by ``get_pool_and_conv_props`` of
nnunetv2 2.8.1 (z, y, x order) and are written here reversed into this project's X, Y, Z order.
"""
from __future__ import annotations

import pytest

from ds_seg3d.planning.rules import initial_patch, pad_shape, pool_and_conv, reduce_patch, target_spacing


def _xyz(rows):
    return tuple(tuple(reversed(r)) for r in rows)


# (spacing z,y,x), (patch z,y,x) -> strides, kernels, padded patch (z,y,x), all from nnunetv2 2.8.1
KNOWN = [
    ((3.0, 1.2, 1.2), (32, 64, 64),
     [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
     [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], (32, 64, 64)),
    ((1.0, 1.0, 1.0), (128, 128, 128),
     [[1, 1, 1]] + [[2, 2, 2]] * 5, [[3, 3, 3]] * 6, (128, 128, 128)),
    ((5.0, 0.8, 0.8), (20, 320, 256),
     [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]],
     [[1, 3, 3], [1, 3, 3]] + [[3, 3, 3]] * 5, (20, 320, 256)),
    ((2.5, 0.7, 0.7), (56, 224, 224),
     [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
     [[1, 3, 3]] + [[3, 3, 3]] * 5, (56, 224, 224)),
    ((1.5, 1.5, 1.5), (96, 160, 160),
     [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], [[3, 3, 3]] * 6, (96, 160, 160)),
    ((1.25, 0.8, 0.8), (40, 213, 200),
     [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]], [[3, 3, 3]] * 6, (40, 224, 224)),
]


@pytest.mark.parametrize(("spacing", "patch", "strides", "kernels", "padded"), KNOWN,
                         ids=[f"{'x'.join(map(str, k[0]))}-{'x'.join(map(str, k[1]))}" for k in KNOWN])
def test_pool_and_conv_matches_nnunet(spacing, patch, strides, kernels, padded):
    topo = pool_and_conv(tuple(reversed(spacing)), tuple(reversed(patch)))
    assert topo.strides == _xyz(strides)
    assert topo.kernels == _xyz(kernels)
    assert topo.patch == tuple(reversed(padded))


def test_the_issue_example_pools_in_plane_first_and_convolves_in_plane_first():
    topo = pool_and_conv((1.2, 1.2, 3.0), (64, 64, 32))
    assert topo.strides == ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert topo.kernels[0] == (3, 3, 1) and set(topo.kernels[1:]) == {(3, 3, 3)}
    assert topo.divisor == (16, 16, 8) and topo.levels == 5


def test_pad_shape_rounds_each_axis_up_to_its_divisor():
    assert pad_shape((20, 33, 64), (4, 16, 32)) == (20, 48, 64)


def test_initial_patch_has_equal_extent_in_mm_and_respects_the_median_shape():
    patch = initial_patch((1.0, 1.0, 2.0), (1000, 1000, 1000), 256**3)
    assert patch[0] == patch[1] == pytest.approx(2 * patch[2], abs=1)
    assert abs(patch[0] * patch[1] * patch[2] - 256**3) / 256**3 < 0.02
    assert initial_patch((1.0, 1.0, 2.0), (120, 100, 40), 256**3) == (120, 100, 40)


@pytest.mark.parametrize(("spacings", "shapes", "expected"), [
    # isotropic-ish: the median
    ([(1.0, 1.0, 1.0), (0.8, 0.8, 1.2), (0.9, 0.9, 1.1)], [(200, 200, 150)] * 3, (0.9, 0.9, 1.1)),
    # 5 mm slices and few of them: the 10th percentile of Z (nnU-Net's ACDC case)
    ([(1.5, 1.5, 10.0), (1.4, 1.4, 5.0), (1.6, 1.6, 6.5), (1.5, 1.5, 10.0), (1.5, 1.5, 8.0)],
     [(240, 240, 10)] * 5, (1.5, 1.5, 5.0 + 0.4 * (6.5 - 5.0))),
    # coarse Z but as many voxels: the median stays
    ([(0.8, 0.8, 5.0)] * 4, [(256, 256, 256)] * 4, (0.8, 0.8, 5.0)),
])
def test_target_spacing_follows_nnunet(spacings, shapes, expected):
    assert target_spacing(spacings, shapes) == pytest.approx(expected)


def test_reduce_patch_shrinks_the_axis_largest_against_the_median():
    spacing, median = (1.0, 1.0, 1.0), (200, 200, 100)
    topo = pool_and_conv(spacing, (128, 128, 128))
    smaller = reduce_patch(spacing, topo.patch, median)
    assert smaller.patch[2] < 128 and smaller.patch[:2] == (128, 128)  # Z: 128 / 100 is the largest ratio
    assert all(p % d == 0 for p, d in zip(smaller.patch, smaller.divisor))
