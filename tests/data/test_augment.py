"""augment(): spatial transforms keep image and label aligned; everything follows the generator."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from ds_seg3d.data.augment import AugmentConfig, augment

SPATIAL_ONLY = AugmentConfig(scale_range=(1.0, 1.0), shift_range=(0.0, 0.0), noise_prob=0.0)


def blob_patch(shape=(12, 12, 10)) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric bright blob (so every flip and turn moves it) and the label that marks it."""
    image = np.zeros(shape, dtype=np.float32)
    image[1:4, 2:7, 1:3] = 10.0
    image[1, 2, 1] = 20.0  # breaks the remaining symmetry of the box
    label = (image > 5).astype(np.uint8)
    label[1, 2, 1] = 2
    return image, label


@pytest.mark.parametrize("shape", [(12, 12, 10), (12, 9, 10)])
def test_label_follows_the_intensity_blob(shape):
    image, label = blob_patch(shape)
    placements = set()
    for seed in range(120):
        img, lbl = augment(image, label, np.random.default_rng(seed), SPATIAL_ONLY)
        assert img.shape == shape and lbl.shape == shape and lbl.dtype == label.dtype
        np.testing.assert_array_equal(lbl > 0, img > 5)
        np.testing.assert_array_equal(lbl == 2, img > 15)
        placements.add(tuple(np.argwhere(lbl == 2)[0]))
    # Flips alone reach 8 placements of the marker voxel; quarter turns (x == y only) reach more.
    assert len(placements) == (8 if shape[0] != shape[1] else 16)


def test_intensity_changes_do_not_move_the_label():
    image, label = blob_patch()
    cfg = AugmentConfig(scale_range=(0.8, 1.2), shift_range=(-0.5, 0.5), noise_prob=0.0)
    for seed in range(10):
        img, lbl = augment(image, label, np.random.default_rng(seed), cfg)
        np.testing.assert_array_equal(lbl > 0, img > 4)


def test_channels_ride_along():
    image, label = blob_patch()
    stacked = np.stack([image, -image])
    img, lbl = augment(stacked, label, np.random.default_rng(3), SPATIAL_ONLY)
    assert img.shape == stacked.shape
    np.testing.assert_array_equal(img[0], -img[1])
    np.testing.assert_array_equal(lbl > 0, img[0] > 5)


def test_forced_flip_and_turn_match_numpy():
    image, label = blob_patch()
    flip_x = AugmentConfig(flip_prob=(1.0, 0.0, 0.0), rot90_prob=0.0, scale_range=(1.0, 1.0),
                           shift_range=(0.0, 0.0), noise_prob=0.0)
    img, lbl = augment(image, label, np.random.default_rng(0), flip_x)
    np.testing.assert_array_equal(img, image[::-1])
    np.testing.assert_array_equal(lbl, label[::-1])
    turn = AugmentConfig(flip_prob=(0.0, 0.0, 0.0), rot90_prob=1.0, scale_range=(1.0, 1.0),
                         shift_range=(0.0, 0.0), noise_prob=0.0)
    img, lbl = augment(image, label, np.random.default_rng(0), turn)
    k = next(k for k in (1, 2, 3) if np.array_equal(lbl, np.rot90(label, k, axes=(0, 1))))
    np.testing.assert_array_equal(img, np.rot90(image, k, axes=(0, 1)))
    assert img.flags.c_contiguous and lbl.flags.c_contiguous


def test_same_generator_same_result_and_seeds_differ():
    image, label = blob_patch()
    image = image + np.random.default_rng(9).standard_normal(image.shape).astype(np.float32)
    cfg = AugmentConfig(noise_prob=1.0)
    a = augment(image, label, np.random.default_rng(42), cfg)
    b = augment(image, label, np.random.default_rng(42), cfg)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = augment(image, label, np.random.default_rng(43), cfg)
    assert not np.array_equal(a[0], c[0])


def test_disabled_config_is_a_no_op_and_inputs_are_never_modified():
    image, label = blob_patch()
    image_copy, label_copy = image.copy(), label.copy()
    for seed in range(5):
        img, lbl = augment(image, label, np.random.default_rng(seed), AugmentConfig.disabled())
        np.testing.assert_array_equal(img, image_copy)
        np.testing.assert_array_equal(lbl, label_copy)
    augment(image, label, np.random.default_rng(0), AugmentConfig(noise_prob=1.0))
    np.testing.assert_array_equal(image, image_copy)
    np.testing.assert_array_equal(label, label_copy)


def test_noise_has_the_requested_strength():
    image = np.zeros((24, 24, 24), dtype=np.float32)
    label = np.zeros(image.shape, dtype=np.uint8)
    cfg = AugmentConfig(flip_prob=(0.0, 0.0, 0.0), rot90_prob=0.0, scale_range=(1.0, 1.0), shift_range=(0.0, 0.0),
                        noise_std_range=(0.5, 0.5), noise_prob=1.0)
    img, _ = augment(image, label, np.random.default_rng(1), cfg)
    assert img.dtype == np.float32
    assert abs(float(img.std()) - 0.5) < 0.02 and abs(float(img.mean())) < 0.02


@pytest.mark.parametrize("kwargs", [
    {"flip_prob": (0.5, 1.5, 0.0)}, {"rot90_prob": -0.1}, {"scale_range": (1.2, 0.8)},
    {"scale_range": (0.0, 1.0)}, {"noise_std_range": (-0.1, 0.1)}, {"flip_prob": (0.5, 0.5)},
])
def test_invalid_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        AugmentConfig(**kwargs)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="differs from label shape"):
        augment(np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 5), np.uint8), np.random.default_rng(0))


# ---------------------------------------------------------------- nnU-Net's augmentation (MONAI)

from ds_seg3d.data.augment import NnUNetAugment, region  # noqa: E402


def _block(shape) -> tuple[np.ndarray, np.ndarray]:
    """A label box and an image that is the label times 10 plus a gradient: alignment is checkable."""
    label = np.zeros(shape, np.uint8)
    x, y, z = shape
    label[x // 3: 2 * x // 3, y // 4: 3 * y // 4, z // 3: 2 * z // 3] = 1
    image = (10.0 * label + np.linspace(0, 1, x)[:, None, None]).astype(np.float32)[None]
    return image, label


def test_region_leaves_room_for_rotation_and_zoom():
    assert region((64, 64, 32)) == (104, 104, 52)  # +-30 degrees about every axis, zoom down to 0.85
    assert region((64, 64, 32), slices=True)[:2] == (108, 108)  # a full in-plane turn: the diagonal
    assert region((96, 96, 16))[2] == 20  # anisotropic: in-plane rotation only, Z just for the zoom


def test_nnunet_augmentation_is_seeded_and_keeps_image_and_label_aligned():
    aug = NnUNetAugment((32, 32, 16))
    image, label = _block(aug.region)
    a, b = aug(image, label, seed=5), aug(image, label, seed=5)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    outputs = [aug(image, label, seed=s) for s in range(24)]
    assert len({o[0].tobytes() for o in outputs}) > 20  # different seeds, different draws
    for img, lab in outputs:
        assert img.shape == (1, 32, 32, 16) and lab.shape == (32, 32, 16) and lab.dtype == np.int64
        assert set(np.unique(lab)) <= {0, 1}
        inside, outside = img[0][lab == 1], img[0][lab == 0]
        if inside.size and outside.size:  # intensity transforms move values; the box stays brighter
            assert np.median(inside) > np.median(outside)


def test_without_any_draw_the_patch_is_the_regions_centre():
    aug = NnUNetAugment((16, 16, 8))
    for t in aug.pipeline.transforms:  # switch every random transform off
        if hasattr(t, "prob"):
            t.prob = 0.0
    image, label = _block(aug.region)
    out_image, out_label = aug(image, label, seed=0)
    start = [(r - p) // 2 for r, p in zip(aug.region, (16, 16, 8))]
    centre = tuple(slice(s, s + p) for s, p in zip(start, (16, 16, 8)))
    assert np.array_equal(out_label, label[centre]) and np.allclose(out_image[0], image[0][centre])


def test_slice_networks_are_mirrored_and_rotated_in_plane_only():
    aug = NnUNetAugment((32, 32, 8), slices=True)
    flips = [t for t in aug.pipeline.transforms if type(t).__name__ == "RandFlipd"]
    assert [f.flipper.spatial_axis for f in flips] == [0, 1]
    affine = next(t for t in aug.pipeline.transforms if type(t).__name__ == "RandAffined")
    ranges = affine.rand_affine.rand_affine_grid.rotate_range
    assert tuple(ranges[0]) == (0.0, 0.0) and tuple(ranges[1]) == (0.0, 0.0) and ranges[2][1] > 3.1


def test_spatial_prob_sets_how_often_patches_are_rotated_and_scaled():
    def resampled(aug: NnUNetAugment) -> int:  # patches whose label is no longer the region's centre, mirrored
        for t in aug.pipeline.transforms:  # intensity transforms off: only the spatial ones and the flips draw
            if hasattr(t, "prob") and type(t).__name__ not in ("RandZoomd", "RandAffined", "RandFlipd"):
                t.prob = 0.0
        image, label = _block(aug.region)
        start = [(r - p) // 2 for r, p in zip(aug.region, aug.patch)]
        centre = label[tuple(slice(s, s + p) for s, p in zip(start, aug.patch))].astype(np.int64)
        mirrors = {np.ascontiguousarray(np.flip(centre, axes)).tobytes()
                   for n in range(4) for axes in itertools.combinations(range(3), n)}
        return sum(aug(image, label, seed=s)[1].tobytes() not in mirrors for s in range(40))

    never, default, always = (NnUNetAugment((16, 16, 8), spatial_prob=p) for p in (0.0, 0.2, 1.0))
    for aug, p in ((never, 0.0), (default, 0.2), (always, 1.0)):
        spatial = [t for t in aug.pipeline.transforms if type(t).__name__ in ("RandZoomd", "RandAffined")]
        assert [t.prob for t in spatial] == [p, p]
    assert resampled(never) == 0
    assert 0 < resampled(default) < resampled(always)
