"""``ds-seg3d evaluate`` on label NIfTIs written here: CSV contents, errors and exit codes."""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ds_seg3d import evaluate

SHAPE = (12, 10, 8)
SPACING = (2.0, 1.5, 3.0)  # mm; 9 mm^3 per voxel
AFFINE = np.diag(SPACING + (1.0,))
AFFINE[:3, 3] = (-20.0, 5.0, 30.0)
VOXEL_ML = 2.0 * 1.5 * 3.0 / 1000.0


def _save(path: Path, label: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), path)


def _run(pred: Path, truth: Path, out: Path, labels: str = "") -> int:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    argv = ["--pred", str(pred), "--truth", str(truth), "--out", str(out)]
    return evaluate.run(parser.parse_args(argv + (["--labels", labels] if labels else [])))


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture
def pairs(tmp_path):
    """Two cases with known overlap: a shifted box, a missed small box, and a perfect case."""
    truth_a = np.zeros(SHAPE, np.uint8)
    truth_a[2:6, 2:6, 2:6] = 1          # 64 voxels
    truth_a[8:10, 6:8, 5:7] = 2         # 8 voxels
    pred_a = np.zeros(SHAPE, np.uint8)
    pred_a[3:7, 2:6, 2:6] = 1           # shifted by one: 48 voxels shared
    truth_b = np.zeros(SHAPE, np.uint8)
    truth_b[1:4, 1:5, 1:3] = 1          # 24 voxels
    pred_b = truth_b.copy()
    pred_b[10, 8, 6] = 2                # label 2 only in the prediction
    _save(tmp_path / "pred" / "case_a.nii.gz", pred_a)
    _save(tmp_path / "truth" / "case_a.nii.gz", truth_a)
    _save(tmp_path / "pred" / "case_b.nii.gz", pred_b)
    _save(tmp_path / "truth" / "case_b.nii.gz", truth_b)
    return tmp_path


def test_csv_columns_and_values(pairs, capsys):
    out = pairs / "metrics.csv"
    assert _run(pairs / "pred", pairs / "truth", out, "kidney=1,cyst=2") == 0
    fields, rows = _read_csv(out)
    assert fields == ["case", "label", "dice", "volume_pred_ml", "volume_true_ml", "volume_error_pct"]
    got = {(r["case"], r["label"]): r for r in rows}
    assert set(got) == {("case_a", "kidney"), ("case_a", "cyst"), ("case_b", "kidney"), ("case_b", "cyst")}
    # (case, label): (Dice, predicted voxels, true voxels)
    expected = {
        ("case_a", "kidney"): (2 * 48 / (64 + 64), 64, 64),
        ("case_a", "cyst"): (0.0, 0, 8),
        ("case_b", "kidney"): (1.0, 24, 24),
        ("case_b", "cyst"): (0.0, 1, 0),
    }
    for key, (d, n_pred, n_true) in expected.items():
        row = got[key]
        assert float(row["dice"]) == pytest.approx(d, abs=1e-5)
        assert float(row["volume_pred_ml"]) == pytest.approx(n_pred * VOXEL_ML, abs=1e-3)
        assert float(row["volume_true_ml"]) == pytest.approx(n_true * VOXEL_ML, abs=1e-3)
        if n_true:
            assert float(row["volume_error_pct"]) == pytest.approx(100 * (n_pred - n_true) / n_true, abs=1e-3)
        else:
            assert math.isnan(float(row["volume_error_pct"]))
    printed = capsys.readouterr().out
    assert "kidney: mean Dice" in printed and str(out) in printed
    assert not list(out.parent.glob(".tmp-*"))


def test_default_label_names_come_from_the_values_present(pairs):
    out = pairs / "default.csv"
    assert _run(pairs / "pred", pairs / "truth", out) == 0
    _, rows = _read_csv(out)
    assert {(r["case"], r["label"]) for r in rows} == {
        ("case_a", "label_1"), ("case_a", "label_2"), ("case_b", "label_1"), ("case_b", "label_2")}


def test_cases_without_any_foreground_give_header_only(tmp_path):
    _save(tmp_path / "pred" / "empty.nii", np.zeros(SHAPE, np.uint8))
    _save(tmp_path / "truth" / "empty.nii", np.zeros(SHAPE, np.uint8))
    out = tmp_path / "empty.csv"
    assert _run(tmp_path / "pred", tmp_path / "truth", out) == 0
    fields, rows = _read_csv(out)
    assert fields == evaluate.FIELDS and rows == []


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_missing_reference_is_one_line_error_exit_2(pairs, capsys):
    _save(pairs / "pred" / "case_c.nii.gz", np.zeros(SHAPE, np.uint8))
    out = pairs / "metrics.csv"
    assert _run(pairs / "pred", pairs / "truth", out) == 2
    err = _one_line_error(capsys)
    assert str(pairs / "truth" / "case_c.nii.gz") in err and "no reference" in err
    assert not out.exists()


def test_shape_mismatch_is_an_error(pairs, capsys):
    _save(pairs / "pred" / "case_b.nii.gz", np.zeros((12, 10, 9), np.uint8))
    out = pairs / "metrics.csv"
    assert _run(pairs / "pred", pairs / "truth", out) == 2
    err = _one_line_error(capsys)
    assert str(pairs / "pred" / "case_b.nii.gz") in err and "shape" in err
    assert not out.exists()


def test_affine_mismatch_is_an_error(pairs, capsys):
    moved = AFFINE.copy()
    moved[0, 3] += 5.0
    _save(pairs / "pred" / "case_a.nii.gz", np.zeros(SHAPE, np.uint8), moved)
    assert _run(pairs / "pred", pairs / "truth", pairs / "m.csv") == 2
    assert "affine" in _one_line_error(capsys)


@pytest.mark.parametrize("setup, fragment", [
    ("empty_pred", "no NIfTI files"),
    ("garbage", "case_a.nii.gz"),
    ("bad_labels", "--labels: 'kidney=one' is not name=integer"),
])
def test_other_bad_input_exits_2(pairs, capsys, setup, fragment):
    labels = ""
    pred = pairs / "pred"
    if setup == "empty_pred":
        pred = pairs / "nothing"
        pred.mkdir()
    elif setup == "garbage":
        (pairs / "pred" / "case_a.nii.gz").write_bytes(b"not a nifti file")
    else:
        labels = "kidney=one"
    out = pairs / "m.csv"
    assert _run(pred, pairs / "truth", out, labels) == 2
    assert fragment in _one_line_error(capsys)
    assert not out.exists()
