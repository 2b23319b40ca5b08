"""``ds-seg3d evaluate`` on label NIfTIs written here: CSV, summary and plot contents, errors, exit codes."""
from __future__ import annotations

import argparse
import csv
import gzip
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ds_seg3d.evaluation import evaluate
from ds_seg3d.evaluation.metrics import hd95_mm

REPO = Path(__file__).resolve().parents[2]

SHAPE = (12, 10, 8)
SPACING = (2.0, 1.5, 3.0)  # mm; 9 mm^3 per voxel
AFFINE = np.diag(SPACING + (1.0,))
AFFINE[:3, 3] = (-20.0, 5.0, 30.0)
VOXEL_ML = 2.0 * 1.5 * 3.0 / 1000.0


def _save(path: Path, label: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), path)


def _run(pred: Path, truth: Path, out: Path, labels: str = "", *extra: str) -> int:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    argv = ["--pred", str(pred), "--truth", str(truth), "--out", str(out), *extra]
    return evaluate.run(parser.parse_args(argv + (["--labels", labels] if labels else [])))


def _outputs(out: Path) -> list[Path]:
    return [out, out.with_name(out.stem + ".summary.csv"), out.with_name(out.stem + ".bland_altman.png")]


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
    assert fields == evaluate.FIELDS
    assert fields == ["case", "label", "dice", "hd95_mm", "volume_pred_ml", "volume_true_ml", "volume_error_pct"]
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
            assert row["volume_error_pct"] == "nan"
        if n_pred and n_true:
            assert float(row["hd95_mm"]) >= 0.0
        else:  # exactly one side empty: written as a literal a spreadsheet or float() reads
            assert row["hd95_mm"] == "inf"
    # spacing from the reference affine: the kidney box moved one voxel along the 2 mm axis
    kidney_a = float(got[("case_a", "kidney")]["hd95_mm"])
    assert kidney_a == pytest.approx(hd95_mm(_load(pairs / "pred" / "case_a.nii.gz") == 1,
                                             _load(pairs / "truth" / "case_a.nii.gz") == 1, SPACING), abs=1e-3)
    assert 0.0 < kidney_a <= SPACING[0] + 1e-6
    assert float(got[("case_b", "kidney")]["hd95_mm"]) == 0.0
    printed = capsys.readouterr().out
    assert "HD95" in printed and str(out) in printed
    assert not list(out.parent.glob(".tmp-*"))


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


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
    summary_fields, summary = _read_csv(_outputs(out)[1])
    assert "label" in summary_fields and summary == []
    assert not _outputs(out)[2].exists()  # nothing to plot


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
    assert not any(p.exists() for p in _outputs(out))


def test_shape_mismatch_is_an_error(pairs, capsys):
    _save(pairs / "pred" / "case_b.nii.gz", np.zeros((12, 10, 9), np.uint8))
    out = pairs / "metrics.csv"
    assert _run(pairs / "pred", pairs / "truth", out) == 2
    err = _one_line_error(capsys)
    assert str(pairs / "pred" / "case_b.nii.gz") in err and "shape" in err
    assert not any(p.exists() for p in _outputs(out))


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
    assert not any(p.exists() for p in _outputs(out))
    assert not list(pairs.glob(".tmp-*"))


@pytest.mark.parametrize("setup, fragment", [
    ("truncated", "cannot read the voxel data"),
    ("four_d", "expected a 3D label map"),
])
def test_unreadable_or_non_3d_label_exits_2(pairs, capsys, setup, fragment):
    bad = pairs / "truth" / "case_b.nii.gz"
    if setup == "truncated":
        whole = gzip.decompress(bad.read_bytes())
        bad.write_bytes(gzip.compress(whole[: len(whole) - 200]))
    else:
        _save(bad, np.zeros(SHAPE + (2,), np.uint8))
    out = pairs / "m.csv"
    assert _run(pairs / "pred", pairs / "truth", out) == 2
    err = _one_line_error(capsys)
    assert str(bad) in err and fragment in err
    assert not any(p.exists() for p in _outputs(out))


def test_output_that_cannot_be_written_exits_2_and_leaves_no_temps(pairs, capsys):
    out = pairs / "taken.csv"
    out.mkdir()  # a folder where the CSV should go
    assert _run(pairs / "pred", pairs / "truth", out) == 2
    assert "taken.csv" in _one_line_error(capsys)
    assert out.is_dir() and not list(pairs.glob(".tmp-*"))


def test_spacing_follows_the_affine_columns_not_its_diagonal(tmp_path):
    """A permuted affine: array axis 0 steps 2.5 mm along y; a slab shifted 2 voxels on it is 5 mm away."""
    affine = np.array([[0.0, 1.0, 0.0, 0.0], [2.5, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0, 0, 0, 1.0]])
    truth = np.zeros((9, 8, 7), np.uint8)
    truth[2, 1:7, 1:6] = 1
    _save(tmp_path / "truth" / "slab.nii.gz", truth, affine)
    _save(tmp_path / "pred" / "slab.nii.gz", np.roll(truth, 2, axis=0), affine)
    out = tmp_path / "slab.csv"
    assert _run(tmp_path / "pred", tmp_path / "truth", out) == 0
    (row,) = _read_csv(out)[1]
    assert float(row["hd95_mm"]) == pytest.approx(2 * 2.5)
    assert float(row["volume_true_ml"]) == pytest.approx(30 * 2.5 / 1000.0, abs=1e-3)


def test_summary_file_matches_the_rows(pairs, capsys):
    out = pairs / "metrics.csv"
    assert _run(pairs / "pred", pairs / "truth", out, "kidney=1,cyst=2") == 0
    _, rows = _read_csv(out)
    fields, summary = _read_csv(_outputs(out)[1])
    assert fields[:2] == ["label", "n_cases"]
    by_label = {s["label"]: s for s in summary}
    assert list(by_label) == ["kidney", "cyst"]
    for label, s in by_label.items():
        mine = [r for r in rows if r["label"] == label]
        dices = [float(r["dice"]) for r in mine]
        hds = [float(r["hd95_mm"]) for r in mine]
        errs = [abs(float(r["volume_error_pct"])) for r in mine]
        assert int(s["n_cases"]) == len(mine) == 2
        assert float(s["dice_mean"]) == pytest.approx(np.mean(dices), abs=1e-5)
        assert float(s["dice_median"]) == pytest.approx(np.median(dices), abs=1e-5)
        assert int(s["hd95_inf_cases"]) == sum(math.isinf(h) for h in hds)
        finite_hd = [h for h in hds if math.isfinite(h)]
        if finite_hd:
            assert float(s["hd95_mm_mean"]) == pytest.approx(np.mean(finite_hd), abs=1e-3)
        else:
            assert s["hd95_mm_mean"] == "nan"
        assert float(s["share_under_5pct_volume_error"]) == pytest.approx(sum(e < 5 for e in errs) / len(mine))
        defined = [e for e in errs if not math.isnan(e)]
        assert float(s["abs_volume_error_pct_mean"]) == pytest.approx(np.mean(defined), abs=1e-3)
    # kidney: case_a 0% and case_b 0% volume error; cyst: -100% and undefined (empty truth)
    assert float(by_label["kidney"]["share_under_5pct_volume_error"]) == 1.0
    assert float(by_label["cyst"]["share_under_5pct_volume_error"]) == 0.0
    assert int(by_label["cyst"]["hd95_inf_cases"]) == 2
    printed = capsys.readouterr().out
    assert "|vol err|" in printed and str(_outputs(out)[1]) in printed


def test_bland_altman_png_is_written_and_no_plot_skips_it(pairs):
    out = pairs / "metrics.csv"
    assert _run(pairs / "pred", pairs / "truth", out, "kidney=1,cyst=2") == 0
    png = _outputs(out)[2]
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    png.unlink()
    assert _run(pairs / "pred", pairs / "truth", out, "", "--no-plot") == 0
    assert out.exists() and _outputs(out)[1].exists() and not png.exists()


def test_command_line_contract(pairs):
    """The documented command through ``python -m ds_seg3d``: exit codes and the CSV columns."""
    out = pairs / "cli" / "metrics.csv"
    cmd = [sys.executable, "-m", "ds_seg3d", "evaluate", "--pred", str(pairs / "pred"),
           "--truth", str(pairs / "truth"), "--out", str(out)]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    fields, rows = _read_csv(out)
    assert {"case", "label", "dice", "hd95_mm", "volume_pred_ml", "volume_true_ml", "volume_error_pct"} <= set(fields)
    assert len(rows) == 4 and all(p.exists() for p in _outputs(out))
    bad = subprocess.run([*cmd[:5], str(pairs / "missing"), *cmd[6:]], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "missing" in bad.stderr
