"""``data-tools halves``: one real scan -> its right half and mirrored left half, labels remapped, atomically."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_tools.__main__ import main as data_tools_main
from data_tools.halves import write_halves
from ds_seg3d.data.errors import DataError
from ds_seg3d.paths import SAMPLE_CT

CT = SAMPLE_CT
IMAGE, LABEL = CT / "example_ct_sm.nii.gz", CT / "example_seg.nii.gz"
SPEC = "kidney=2,3;psoas=88,89"


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_halves_of_the_real_ct(tmp_path: Path) -> None:
    out = write_halves(IMAGE, LABEL, tmp_path / "halves", SPEC, name="ct")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "kidney", "2": "psoas"}
    src_img = np.asarray(nib.as_closest_canonical(nib.load(IMAGE)).dataobj)
    src_lab = np.asarray(nib.as_closest_canonical(nib.load(LABEL)).dataobj)
    mid = src_img.shape[0] // 2
    right_img, left_img = (_load(out / "imagesTr" / f"ct_{s}.nii.gz") for s in ("right", "left"))
    right_lab, left_lab = (_load(out / "labelsTr" / f"ct_{s}.nii.gz") for s in ("right", "left"))
    assert right_img.shape == left_img.shape == (mid, *src_img.shape[1:])
    np.testing.assert_array_equal(right_img, src_img[:mid])
    np.testing.assert_array_equal(left_img, src_img[-mid:][::-1])  # mirrored: the midline at the far edge
    # each half holds one kidney and one psoas, remapped to 1 and 2, voxel for voxel
    for half, src in ((right_lab, src_lab[:mid]), (left_lab, src_lab[-mid:][::-1])):
        assert set(np.unique(half)) == {0, 1, 2}
        np.testing.assert_array_equal(half == 1, np.isin(src, [2, 3]))
        np.testing.assert_array_equal(half == 2, np.isin(src, [88, 89]))
    zooms = nib.load(out / "imagesTr" / "ct_left.nii.gz").header.get_zooms()
    assert np.allclose(zooms, nib.load(IMAGE).header.get_zooms())


@pytest.mark.parametrize("spec, problem", [("kidney", "not name=value"), ("kidney=x", "not name=value"),
                                           ("kidney=2;spleen=199", "no voxel of spleen")])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, spec: str, problem: str, capsys) -> None:
    out = tmp_path / "halves"
    assert data_tools_main(["halves", str(IMAGE), str(LABEL), str(out), "--labels", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and problem in err and str(LABEL) in err
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_refuses_a_mismatched_grid_and_a_full_folder(tmp_path: Path) -> None:
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), small)
    with pytest.raises(DataError, match="does not match"):
        write_halves(IMAGE, small, tmp_path / "a", SPEC)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        write_halves(IMAGE, LABEL, full, SPEC)


def test_writing_the_same_halves_again_is_a_no_op(tmp_path: Path) -> None:
    out = write_halves(IMAGE, LABEL, tmp_path / "halves", SPEC, name="ct")
    stamp = (out / "dataset.json").stat().st_mtime_ns
    assert write_halves(IMAGE, LABEL, out, SPEC, name="ct") == out
    assert (out / "dataset.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="not these halves"):
        write_halves(IMAGE, LABEL, out, "kidney=2,3", name="ct")
