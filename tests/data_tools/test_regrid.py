"""``data-tools regrid``: a scan on a finer grid with a cut field of view, and a label map put back."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from data_tools.__main__ import main
from data_tools.regrid import reframed_grid
from ds_seg3d.paths import SAMPLE_CT_IMAGE, SAMPLE_CT_LABEL

KIDNEYS = (2, 3)


def test_reframed_scan_has_the_new_spacing_and_the_kept_field_of_view(tmp_path: Path) -> None:
    out = tmp_path / "fine.nii.gz"
    assert main(["regrid", str(SAMPLE_CT_IMAGE), str(out), "--spacing", "2", "2", "2", "--crop-anterior", "0.3"]) == 0
    src, fine = nib.load(SAMPLE_CT_IMAGE), nib.load(out)
    assert fine.header.get_zooms()[:3] == pytest.approx((2.0, 2.0, 2.0))
    extent = np.asarray(src.shape) * np.asarray(src.header.get_zooms()[:3]) * [1, 0.7, 1]
    assert np.asarray(fine.shape) == pytest.approx(np.floor(extent / 2), abs=0)
    # the same world point shows the same tissue: the scan's centre voxel against the fine grid's nearest
    centre = src.affine @ [*(np.asarray(src.shape) // 2), 1]
    ijk = np.rint(np.linalg.inv(fine.affine) @ centre)[:3].astype(int)
    a, b = src.get_fdata()[tuple(np.asarray(src.shape) // 2)], fine.get_fdata()[tuple(ijk)]
    assert abs(a - b) < 150, (a, b)  # HU; trilinear over 3 mm voxels


def test_a_label_map_comes_back_onto_the_original_grid(tmp_path: Path) -> None:
    """Kidneys put on the fine grid without their anterior third and back: the same kidneys."""
    seg = nib.load(SAMPLE_CT_LABEL)
    kidneys = nib.Nifti1Image(np.isin(np.asarray(seg.dataobj), KIDNEYS).astype(np.uint8), seg.affine)
    fine = resample_from_to(kidneys, reframed_grid(kidneys, (2.0, 2.0, 2.0), 0.3), order=0)
    nib.save(fine, tmp_path / "fine_pred.nii.gz")
    back = tmp_path / "back.nii.gz"
    assert main(["regrid", str(tmp_path / "fine_pred.nii.gz"), str(back), "--like", str(SAMPLE_CT_IMAGE)]) == 0
    a, b = np.asarray(kidneys.dataobj) > 0, np.asarray(nib.load(back).dataobj) > 0
    assert nib.load(back).shape == kidneys.shape
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice >= 0.9, dice
    assert not (tmp_path / ".tmp-back.nii.gz").exists()


def test_regrid_needs_one_target_and_names_a_bad_file(tmp_path: Path, capsys) -> None:
    assert main(["regrid", str(SAMPLE_CT_IMAGE), str(tmp_path / "x.nii.gz")]) == 2
    assert "give either --spacing" in capsys.readouterr().err
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    assert main(["regrid", str(bad), str(tmp_path / "y.nii.gz"), "--spacing", "2", "2", "2"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("\n") == 1
    assert not (tmp_path / "y.nii.gz").exists()
