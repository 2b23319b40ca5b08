"""Geometry: reorientation, resampling, crop boxes and the way back onto the original grid."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine
from nibabel.orientations import axcodes2ornt, ornt_transform

from ds_seg3d.data import geometry as geo


def oriented_affine(axcodes: str, spacing=(1.0, 2.0, 3.0), origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    """An affine whose array axes point along ``axcodes`` with the given voxel sizes."""
    aff = np.eye(4)
    for axis, (world, flip) in enumerate(axcodes2ornt(axcodes)):
        aff[int(world), axis] = flip * spacing[axis]
    aff[:3, 3] = origin
    return aff


def ellipsoid(shape, affine, centre, radii) -> np.ndarray:
    """Voxels whose centre (world, mm) lies inside an axis-aligned ellipsoid."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    world = apply_affine(affine, idx.reshape(-1, 3)).reshape(*shape, 3)
    r2 = (((world - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1)
    return (r2 <= 1.0).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.astype(bool).sum() + b.astype(bool).sum())


def full_geometry(affine, shape, spacing, crop_start=None, crop_stop=None):
    """Geometry of a whole case (RAS, resampled to ``spacing``), optionally with a crop box."""
    ras_arr, ras_affine, codes = geo.reorient_to_ras(np.zeros(shape, np.uint8), affine)
    res_shape = geo.resampled_shape(ras_arr.shape, geo.voxel_spacing(ras_affine), spacing)
    start = crop_start if crop_start is not None else (0, 0, 0)
    stop = crop_stop if crop_stop is not None else res_shape
    return geo.make_geometry(affine, shape, codes, ras_affine, spacing, start, stop), ras_affine


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR", "ASL", "SLP", "LAI"])
def test_reorient_is_exact_and_reversible(codes):
    rng = np.random.default_rng(1)
    arr = rng.random((4, 5, 6)).astype(np.float32)
    aff = oriented_affine(codes)
    ras, ras_aff, found = geo.reorient_to_ras(arr, aff)
    assert found == codes
    assert nib.aff2axcodes(ras_aff) == ("R", "A", "S")
    assert ras.shape == geo.canonical_shape(arr.shape, codes)
    assert np.array_equal(geo.from_ras(ras, codes), arr)
    # Every voxel keeps its world point.
    for idx in [(0, 0, 0), (2, 1, 3), tuple(s - 1 for s in ras.shape)]:
        src = np.rint(apply_affine(np.linalg.inv(aff), apply_affine(ras_aff, idx))).astype(int)
        assert ras[idx] == arr[tuple(src)]


def test_ras_and_lps_versions_give_identical_canonical_arrays():
    rng = np.random.default_rng(2)
    ras_img = nib.Nifti1Image(rng.random((6, 7, 8)).astype(np.float32), oriented_affine("RAS"))
    lps_img = ras_img.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt("LPS")))
    assert nib.aff2axcodes(lps_img.affine) == ("L", "P", "S")
    a, a_aff, _ = geo.reorient_to_ras(np.asanyarray(ras_img.dataobj), ras_img.affine)
    b, b_aff, codes = geo.reorient_to_ras(np.asanyarray(lps_img.dataobj), lps_img.affine)
    assert codes == "LPS"
    assert np.array_equal(a, b)
    np.testing.assert_allclose(a_aff, b_aff, atol=1e-9)


def test_resample_identity_is_an_exact_copy():
    arr = np.random.default_rng(3).random((5, 6, 7)).astype(np.float32)
    out = geo.resample(arr, (0.8, 0.8, 3.0), (0.8, 0.8, 3.0), order=1)
    assert out is not arr and np.array_equal(out, arr)
    np.testing.assert_array_equal(geo.resampled_affine(np.eye(4), (1, 1, 1), (1, 1, 1)), np.eye(4))


def test_resampled_shape_rounds_the_physical_extent():
    assert geo.resampled_shape((10, 10, 10), (1.0, 1.0, 3.0), (1.5, 1.5, 1.5)) == (7, 7, 20)
    assert geo.resampled_shape((3, 3, 3), (1.0, 1.0, 1.0), (100.0, 100.0, 100.0)) == (1, 1, 1)


def test_resample_ellipsoid_keeps_dice_above_095():
    shape, src, dst = (120, 120, 36), (0.8, 0.8, 3.0), (1.5, 1.5, 1.5)
    aff = oriented_affine("RAS", spacing=src, origin=(0, 0, 0))
    centre, radii = (48.0, 46.0, 52.0), (30.0, 20.0, 25.0)  # kidney/liver-sized, mm
    label = ellipsoid(shape, aff, centre, radii)
    out = geo.resample(label, src, dst, order=0)
    assert out.dtype == np.uint8 and out.shape == geo.resampled_shape(shape, src, dst)
    expected = ellipsoid(out.shape, geo.resampled_affine(aff, src, dst), centre, radii)
    assert dice(out, expected) >= 0.95
    # ... and back onto the original grid through the stored geometry.
    geometry, _ = full_geometry(aff, shape, dst)
    back = geo.to_original_grid(out, geometry, order=0)
    assert back.shape == shape and dice(back, label) >= 0.95


def test_linear_image_resampled_matches_world_points_of_shard_affine():
    # Trilinear interpolation reproduces a linear function exactly, so each shard voxel must hold
    # the function's value at the world point its affine gives: any offset or scale error shows.
    shape, src, dst = (30, 24, 10), (0.8, 0.9, 3.0), (1.5, 1.5, 1.5)
    aff = oriented_affine("LPS", spacing=src, origin=(7.0, 3.0, -11.0))
    coef, c0 = np.array([0.5, -0.25, 0.125]), 3.0
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    image = (apply_affine(aff, idx) @ coef + c0).reshape(shape).astype(np.float64)
    ras, ras_aff, codes = geo.reorient_to_ras(image, aff)
    spacing = geo.voxel_spacing(ras_aff)
    res = geo.resample(ras, spacing, dst, order=1)
    start, stop = (2, 3, 4), (res.shape[0] - 2, res.shape[1] - 3, res.shape[2] - 4)
    crop = res[tuple(slice(a, b) for a, b in zip(start, stop))]
    geometry = geo.make_geometry(aff, shape, codes, ras_aff, dst, start, stop)
    assert geometry.resampled_shape == res.shape
    np.testing.assert_allclose(geo.voxel_spacing(geometry.affine), dst)
    cidx = np.stack(np.meshgrid(*[np.arange(s) for s in crop.shape], indexing="ij"), -1).reshape(-1, 3)
    expected = (apply_affine(geometry.affine, cidx) @ coef + c0).reshape(crop.shape)
    np.testing.assert_allclose(crop, expected, atol=1e-9)


def test_shard_affine_maps_to_the_same_world_point_without_resampling():
    rng = np.random.default_rng(4)
    shape, spacing = (9, 8, 7), (1.0, 2.0, 3.0)
    aff = oriented_affine("PSR", spacing=spacing)
    arr = rng.integers(0, 5, shape).astype(np.uint8)
    ras, ras_aff, codes = geo.reorient_to_ras(arr, aff)
    target = geo.voxel_spacing(ras_aff)
    start, stop = (1, 2, 0), (ras.shape[0] - 1, ras.shape[1], ras.shape[2] - 2)
    crop = ras[tuple(slice(a, b) for a, b in zip(start, stop))]
    geometry = geo.make_geometry(aff, shape, codes, ras_aff, target, start, stop)
    for idx in np.ndindex(crop.shape):
        orig = apply_affine(np.linalg.inv(aff), apply_affine(geometry.affine, idx))
        assert np.allclose(orig, np.rint(orig), atol=1e-9)
        assert crop[idx] == arr[tuple(np.rint(orig).astype(int))]


def test_to_original_grid_round_trip_is_exact_without_resampling():
    rng = np.random.default_rng(5)
    shape = (12, 10, 8)
    aff = oriented_affine("LPI", spacing=(0.7, 0.7, 2.5))
    label = np.zeros(shape, np.uint8)
    label[3:9, 2:7, 1:6] = rng.integers(0, 4, (6, 5, 5))
    ras, ras_aff, codes = geo.reorient_to_ras(label, aff)
    start, stop = geo.mask_box(ras > 0, 1)
    geometry = geo.make_geometry(aff, shape, codes, ras_aff, geo.voxel_spacing(ras_aff), start, stop)
    crop = ras[tuple(slice(a, b) for a, b in zip(start, stop))]
    assert crop.size < label.size
    back = geo.to_original_grid(crop, geometry)
    assert back.dtype == label.dtype and np.array_equal(back, label)


@pytest.mark.parametrize("resampled", [False, True])
def test_to_original_grid_maps_probability_maps_channel_wise(resampled):
    shape, src = (40, 36, 14), (0.8, 0.8, 3.0)
    aff = oriented_affine("LPS", spacing=src)
    label = ellipsoid(shape, aff, apply_affine(aff, (np.asarray(shape) - 1) / 2), (9.0, 8.0, 12.0))
    assert label.any()
    label[label > 0] += (np.indices(shape)[0][label > 0] % 2).astype(np.uint8)  # two classes
    ras, ras_aff, codes = geo.reorient_to_ras(label, aff)
    spacing = geo.voxel_spacing(ras_aff)
    dst = (1.5, 1.5, 1.5) if resampled else spacing
    shard = geo.resample(ras, spacing, dst, order=0)
    start, stop = geo.mask_box(shard > 0, 2)
    geometry = geo.make_geometry(aff, shape, codes, ras_aff, dst, start, stop)
    crop = shard[tuple(slice(a, b) for a, b in zip(start, stop))]
    probs = np.stack([(crop == c).astype(np.float32) for c in range(3)])
    out = geo.to_original_grid(probs, geometry, order=1, fill=(1.0, 0.0, 0.0))
    assert out.shape == (3, *shape) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)  # linear weights keep a partition of unity
    predicted = out.argmax(0)
    labels_back = geo.to_original_grid(crop, geometry, order=0)
    if resampled:
        assert dice(predicted > 0, label > 0) >= 0.9
    else:
        assert np.array_equal(predicted, label) and np.array_equal(labels_back, label)


def test_to_original_grid_rejects_an_array_of_the_wrong_shape():
    geometry, _ = full_geometry(np.eye(4), (4, 4, 4), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="crop box"):
        geo.to_original_grid(np.zeros((3, 4, 4), np.uint8), geometry)


def test_body_box_takes_the_largest_component_and_adds_the_margin():
    image = np.full((40, 30, 20), -1000.0, np.float32)
    image[10:30, 8:20, 5:15] = 40.0  # body
    image[5:35, 25:28, 2:18] = 300.0  # table: separate, smaller
    start, stop = geo.body_box(image, -500.0, 3)
    assert start == (7, 5, 2) and stop == (33, 23, 18)
    start, stop = geo.body_box(image, -500.0, (50, 0, 1))
    assert start == (0, 8, 4) and stop == (40, 20, 16)
    assert geo.body_box(np.zeros((4, 5, 6)), 1.0, 2) == ((0, 0, 0), (4, 5, 6))
