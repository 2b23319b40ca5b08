"""Phantoms: seeded and reproducible, anatomy that poses the intended difficulty, valid MSD folders."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data_tools.errors import DataError
from data_tools.phantoms import (INPLANE_SPACING, SLICE_SPACING, TASKS, TISSUES, already_generated,
                                 generate_case, register, render_case, write_msd_dataset)

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


def test_kidney_label_covers_darker_cysts():
    p = render_case("kidney", 3, (96, 96, 48))
    kidney, cyst = p.tissue == TISSUES["kidney"], p.tissue == TISSUES["cyst"]
    assert cyst.sum() > 100 and ndimage.label(cyst)[1] >= 2
    assert p.label[cyst].all() and p.label[kidney].all()
    np.testing.assert_array_equal(p.label.astype(bool), kidney | cyst)
    cyst_hu, kidney_hu = p.image[_interior(cyst, 2)].mean(), p.image[_interior(kidney, 2)].mean()
    assert cyst_hu < kidney_hu - 10


def test_psoas_matches_paraspinal_intensity_and_differs_in_shape():
    p = render_case("psoas", 5, (128, 128, 64))
    psoas, para = p.tissue == TISSUES["psoas"], p.tissue == TISSUES["paraspinal"]
    fat = p.tissue == TISSUES["visceral_fat"]
    psoas_hu, para_hu, fat_hu = (p.image[_interior(m, 3)].mean() for m in (psoas, para, fat))
    assert abs(psoas_hu - para_hu) < 10
    assert min(psoas_hu, para_hu) > fat_hu + 100
    np.testing.assert_array_equal(p.label.astype(bool), psoas)
    # Only a fat plane or bone lies between them: growing the psoas by one voxel never reaches the back muscles.
    grown = ndimage.binary_dilation(psoas, ndimage.generate_binary_structure(2, 1)[:, :, None])
    assert not (grown & para).any()
    # Widens caudally: the array's third axis points superior in both RAS and LPS storage.
    area = psoas.sum(axis=(0, 1))
    z = np.nonzero(area)[0]
    third = len(z) // 3
    assert area[z[:third]].mean() > 1.5 * area[z[-third:]].mean()


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
    assert _cli(str(out), "--task", "psoas", "--cases", "2", "--seed", "1", "--shape", *map(str, SMALL)) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "psoas"} and meta["numTraining"] == 2
    assert all((out / e["label"]).is_file() for e in meta["training"])
    assert already_generated(out, "psoas", 2, 1, SMALL)
    with pytest.raises(DataError, match="--cases"):
        _cli(str(tmp_path / "none"), "--task", "psoas", "--cases", "0")
    assert not (tmp_path / "none").exists()
