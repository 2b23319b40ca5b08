"""Phantoms: seeded and reproducible, anatomy that poses the intended difficulty, valid MSD folders."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib.image as plt_image
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data_tools.phantoms import (
    INPLANE_SPACING,
    SLICE_SPACING,
    TASKS,
    TISSUES,
    Phantom,
    already_generated,
    generate_case,
    preview_png,
    register,
    render_case,
    write_msd_dataset,
)
from ds_seg3d.data.errors import DataError

SMALL = (48, 48, 24)
N_CASES = 20


def _interior(mask: np.ndarray, radius: int) -> np.ndarray:
    """Voxels ``radius`` voxels in-plane and one slice inside the mask: the part free of partial volume."""
    plane = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), radius)
    st = np.zeros(plane.shape + (3,), bool)
    st[:, :, 1] = plane
    st[radius, radius, :] = True
    return ndimage.binary_erosion(mask, st)


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def _world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World (RAS mm) coordinates of a mask's voxels, (N, 3)."""
    return np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3]


def _kidneys(p: Phantom) -> list[np.ndarray]:
    """The label split into the patient's right and left kidney at the spine's world x."""
    spine_x = _world_centroid(p.tissue == TISSUES["cancellous_bone"], p.affine)[0]
    x = np.arange(p.label.shape[0])[:, None, None] * p.affine[0, 0] + p.affine[0, 3]
    return [p.label.astype(bool) & (x > spine_x), p.label.astype(bool) & (x < spine_x)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data_tools")
    register(parser.add_subparsers())
    return parser


def _cli(*argv: str) -> int:
    args = _parser().parse_args(["phantoms", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def kidney_set(tmp_path_factory) -> Path:
    return write_msd_dataset(tmp_path_factory.mktemp("msd") / "kidney", "kidney", N_CASES, 11, SMALL)


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_case_other_seed_differs(task):
    first, again, other = (generate_case(task, s, SMALL) for s in (7, 7, 8))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    same_grid = first[0].shape == other[0].shape and np.allclose(first[2], other[2])
    assert not same_grid or not np.array_equal(first[0], other[0])
    assert not same_grid or not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("task", TASKS)
def test_types_shapes_and_binary_labels(task):
    for seed in range(3):
        image, label, affine = generate_case(task, seed, SMALL)
        assert image.dtype == np.int16 and label.dtype == np.uint8 and affine.dtype == np.float64
        assert image.shape == label.shape and affine.shape == (4, 4)
        assert all(0.9 * s - 1 <= n <= 1.1 * s + 1 for n, s in zip(image.shape, SMALL))
        assert set(np.unique(label).tolist()) == {0, 1}
        corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert corners.mean() < -900, "air outside the body"
        assert (image > 300).sum() > 10, "the spine's bone"


@pytest.mark.parametrize("seed", [0, 1])
def test_polycystic_kidneys_are_full_of_visible_cysts_of_many_sizes(seed):
    p = render_case("kidney", seed, (128, 128, 64))
    kidney, cyst = p.tissue == TISSUES["kidney"], p.tissue == TISSUES["cyst"]
    np.testing.assert_array_equal(p.label.astype(bool), kidney | cyst)  # the label covers every cyst
    cyst_hu, parenchyma_hu = p.image[_interior(cyst, 1)].mean(), p.image[_interior(kidney, 1)].mean()
    assert -10 < cyst_hu < 30 and 90 < parenchyma_hu < 170, "water-dense cysts, enhanced parenchyma"
    # Seen as a reader sees them: dark blobs in the lightly smoothed image, away from the outline.
    smooth = ndimage.gaussian_filter(p.image.astype(np.float32), (0.7, 0.7, 0))
    dark = smooth < (cyst_hu + parenchyma_hu) / 2
    for side in _kidneys(p):
        inner = ndimage.binary_erosion(side, ndimage.generate_binary_structure(2, 1)[:, :, None])
        blobs, n = ndimage.label(dark & inner)
        sizes = np.sort(ndimage.sum_labels(dark & inner, blobs, range(1, n + 1)))
        sizes = sizes[sizes >= 3]
        assert len(sizes) >= 5, f"only {len(sizes)} cysts seen in one kidney"
        assert sizes[-1] >= 10 * sizes[0], f"cysts of one size only: {sizes}"
        z_mid = int(np.median(np.nonzero(side.any(axis=(0, 1)))[0]))
        per_slice = [(np.bincount(ndimage.label(dark[:, :, z] & inner[:, :, z])[0].ravel())[1:] >= 2).sum()
                     for z in range(z_mid - 2, z_mid + 3)]
        assert min(per_slice) >= 3, f"cysts per mid slice: {per_slice}"
        # Enlarged: a normal kidney is about 1.5 vertebral bodies wide, these well over two.
        width = np.ptp(_world(side, p.affine)[:, 0])
        assert width > 2.2 * np.ptp(_world(p.tissue == TISSUES["cancellous_bone"], p.affine)[:, 0])
    # Some cysts bulge the outline: they reach voxels just outside the label.
    cysts, n = ndimage.label(cyst)
    outside = ndimage.binary_dilation(~p.label.astype(bool))
    assert len(np.unique(cysts[outside & cyst])) - 1 >= 3


def test_organs_keep_a_fat_plane_between_them():
    groups = {"kidney": ("kidney", "cyst"), "liver": ("liver", "hepatic_cyst"), "spleen": ("spleen",),
              "psoas": ("psoas",), "bowel": ("bowel", "fluid", "gas"), "vessel": ("vessel",)}
    touching = 0
    for task in TASKS:
        for seed in range(3):
            p = render_case(task, seed, (96, 96, 48))
            masks = {g: np.isin(p.tissue, [TISSUES[t] for t in names]) for g, names in groups.items()}
            for a in masks:
                grown = ndimage.binary_dilation(masks[a])
                touching += sum(int((grown & masks[b]).any()) for b in masks if b != a)
            near = ndimage.binary_dilation(masks["liver"], iterations=3) & ndimage.binary_dilation(
                masks["kidney"], iterations=3)
            if task == "kidney":  # the right kidney sits under the liver, fat in between
                assert near.any() and p.image[near & (p.tissue == TISSUES["visceral_fat"])].mean() < -40
    assert touching == 0


def test_body_fills_the_field_of_view_with_fat_and_a_muscle_wall():
    fat, muscle, visceral = TISSUES["fat"], TISSUES["muscle"], TISSUES["visceral_fat"]
    for task in TASKS:
        for seed in range(4):
            p = render_case(task, seed, SMALL)
            body = p.tissue != TISSUES["air"]
            xs = np.nonzero(body.any(axis=(1, 2)))[0]
            assert 0.75 <= (xs[-1] - xs[0] + 1) / body.shape[0] <= 0.92
            z = body.shape[2] // 2
            row = p.tissue[:, int(np.argwhere(body[:, :, z])[:, 1].mean()), z]
            runs = [int(t) for i, t in enumerate(row) if i == 0 or t != row[i - 1]]
            assert runs[:4] == [TISSUES["air"], fat, muscle, visceral], runs
            assert runs[-4:] == [visceral, muscle, fat, TISSUES["air"]], runs
            assert p.image[_interior(p.tissue == fat, 1)].mean() < -60


@pytest.mark.parametrize("seed", [5, 6])
def test_psoas_runs_craniocaudally_widens_caudally_and_matches_paraspinal_intensity(seed):
    p = render_case("psoas", seed, (128, 128, 64))
    psoas, para = p.tissue == TISSUES["psoas"], p.tissue == TISSUES["paraspinal"]
    fat = p.tissue == TISSUES["visceral_fat"]
    np.testing.assert_array_equal(p.label.astype(bool), psoas)
    psoas_hu, para_hu, fat_hu = (p.image[_interior(m, 2)].mean() for m in (psoas, para, fat))
    assert abs(psoas_hu - para_hu) < 10
    assert min(psoas_hu, para_hu) > fat_hu + 100
    # Only fat planes or bone lie between them: growing the psoas by one voxel never reaches the back muscles.
    grown = ndimage.binary_dilation(psoas, ndimage.generate_binary_structure(2, 1)[:, :, None])
    assert not (grown & para).any()
    # From high in the volume to its caudal end (the array's third axis points superior in RAS and LPS).
    area = psoas.sum(axis=(0, 1))
    z = np.nonzero(area)[0]
    assert len(z) >= 0.7 * psoas.shape[2] and z[0] == 0
    third = len(z) // 3
    assert area[z[:third]].mean() >= 1.8 * area[z[-third:]].mean()
    # Antero-lateral to the vertebral bodies, one on each side.
    body = _world(p.tissue == TISSUES["cancellous_bone"], p.affine)
    canal = _world_centroid(p.tissue == TISSUES["spinal_canal"], p.affine)
    for side in (np.greater, np.less):
        pts = _world(psoas, p.affine)
        pts = pts[side(pts[:, 0], body[:, 0].mean())]
        assert abs(pts[:, 0].mean() - body[:, 0].mean()) > np.ptp(body[:, 0]) / 2
        assert pts[:, 1].mean() > canal[1]
    # Not the only muscle-dense structure near the spine: other tissues sit within 15 HU of it.
    decoys = [t for t in ("muscle", "kidney", "vessel", "bowel", "spleen", "liver")
              if _interior(p.tissue == TISSUES[t], 1).any()
              and abs(p.image[_interior(p.tissue == TISSUES[t], 1)].mean() - psoas_hu) < 15]
    assert len(decoys) >= 3, decoys


@pytest.mark.parametrize("task", TASKS)
def test_bowel_loops_hold_fluid_with_gas_floating_anteriorly(task):
    p = render_case(task, 2, (96, 96, 48))
    gas, fluid = p.tissue == TISSUES["gas"], p.tissue == TISSUES["fluid"]
    assert p.image[_interior(gas, 1)].mean() < -800 and -20 < p.image[_interior(fluid, 1)].mean() < 40
    loops, n = ndimage.label(np.isin(p.tissue, [TISSUES[t] for t in ("bowel", "fluid", "gas")]))
    levels = 0
    for i in range(1, n + 1):
        g, f = gas & (loops == i), fluid & (loops == i)
        if g.sum() > 5 and f.sum() > 5:
            levels += 1
            assert _world_centroid(g, p.affine)[1] > _world_centroid(f, p.affine)[1], "gas rises anteriorly"
    assert levels >= 1


def test_ras_and_lps_cases_agree_in_world_coordinates():
    seen = set()
    for seed in range(20):
        p = render_case("kidney", seed, SMALL)
        codes = nib.aff2axcodes(p.affine)
        seen.add(codes)
        body = _world_centroid(p.image > -500, p.affine)
        liver = _world_centroid(p.tissue == TISSUES["liver"], p.affine)
        spine = _world_centroid(p.tissue == TISSUES["cancellous_bone"], p.affine)
        assert liver[0] > body[0], f"liver on the patient's right ({codes})"
        assert spine[1] < body[1], f"spine posterior ({codes})"
    assert seen == {("R", "A", "S"), ("L", "P", "S")}


def test_dataset_json_lists_loadable_cases(kidney_set):
    meta = json.loads((kidney_set / "dataset.json").read_text())
    assert meta["tensorImageSize"] == "3D" and meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "kidney"}
    assert meta["numTraining"] == N_CASES == len(meta["training"])
    assert meta["numTest"] == 0 and meta["test"] == []
    assert isinstance(meta["name"], str) and isinstance(meta["description"], str)
    ids = set()
    for entry in meta["training"]:
        case_id = re.fullmatch(r"\./imagesTr/(kidney_\d{3})\.nii\.gz", entry["image"]).group(1)
        assert entry["label"] == f"./labelsTr/{case_id}.nii.gz"
        ids.add(case_id)
        image, label = nib.load(kidney_set / entry["image"]), nib.load(kidney_set / entry["label"])
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert image.shape == label.shape
        np.testing.assert_allclose(image.affine, label.affine)
        assert set(np.unique(np.asarray(label.dataobj)).tolist()) == {0, 1}
        assert np.asarray(image.dataobj).min() < -900
    assert len(ids) == N_CASES
    assert sorted(p.name for p in kidney_set.parent.iterdir()) == ["kidney"], "no temporary folder left"


def test_dataset_mixes_orientations_and_anisotropic_spacings(kidney_set):
    codes, eps = set(), 1e-4
    for path in sorted((kidney_set / "imagesTr").glob("*.nii.gz")):
        image = nib.load(path)
        codes.add(nib.aff2axcodes(image.affine))
        sx, sy, sz = image.header.get_zooms()
        assert abs(sx - sy) < eps
        assert INPLANE_SPACING[0] - eps <= sx <= INPLANE_SPACING[1] + eps
        assert SLICE_SPACING[0] - eps <= sz <= SLICE_SPACING[1] + eps
        assert sz > sx
    assert codes == {("R", "A", "S"), ("L", "P", "S")}


def test_cli_same_parameters_is_a_no_op(kidney_set, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in kidney_set.rglob("*")}
    assert _cli(str(kidney_set), "--task", "kidney", "--cases", str(N_CASES), "--seed", "11",
                "--shape", *map(str, SMALL)) == 0
    assert "already" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in kidney_set.rglob("*")} == stamps


def test_cli_refuses_other_generation_and_foreign_folder(kidney_set, tmp_path):
    before = (kidney_set / "dataset.json").read_text()
    with pytest.raises(DataError) as err:
        _cli(str(kidney_set), "--task", "kidney", "--cases", str(N_CASES), "--seed", "12",
             "--shape", *map(str, SMALL))
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(kidney_set))
    assert (kidney_set / "dataset.json").read_text() == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError) as err:
        _cli(str(foreign), "--task", "psoas", "--cases", "2")
    assert "\n" not in str(err.value) and str(foreign) in str(err.value)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"], "no temporary folder left"


def test_cli_fills_an_empty_folder_and_rejects_bad_counts(tmp_path):
    out = tmp_path / "psoas"
    out.mkdir()
    assert _cli(str(out), "--task", "psoas", "--cases", "2", "--seed", "1", "--shape", *map(str, SMALL),
                "--preview") == 0
    picture = plt_image.imread(out / "preview.png")
    assert picture.shape[0] > 200 and picture.shape[1] > 3 * picture.shape[0] / 2, "a row per case"
    red = (picture[..., 0] > 0.8) & (picture[..., 1] < 0.3) & (picture[..., 2] < 0.3)
    assert red.sum() > 20, "label contours drawn in red"
    gray = np.abs(picture[..., 0] - picture[..., 1]) < 0.02
    assert (gray & (picture[..., 0] > 0.5) & (picture[..., 0] < 0.9)).sum() > 1000, "soft tissue shown"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "psoas"} and meta["numTraining"] == 2
    assert all((out / e["label"]).is_file() for e in meta["training"])
    assert already_generated(out, "psoas", 2, 1, SMALL)
    with pytest.raises(DataError, match="--cases"):
        _cli(str(tmp_path / "none"), "--task", "psoas", "--cases", "0")
    assert not (tmp_path / "none").exists()


def test_preview_of_a_folder_without_cases_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError) as err:
        preview_png(tmp_path)
    assert "\n" not in str(err.value) and "dataset.json" in str(err.value)
    assert list(tmp_path.iterdir()) == []
