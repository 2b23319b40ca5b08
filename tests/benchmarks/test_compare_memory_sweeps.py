"""``benchmarks/compare_memory_sweeps.py``: two sweeps' rank peaks matched by point and rank."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import compare_memory_sweeps

FIELDS = ["config", "rank", "stage", "status", "measured_peak_bytes", "predicted_peak_bytes", "error_pct", "model",
          "stages", "measured_boundaries"]


def _sweep(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        w.writerows(rows)
    return path


def test_peaks_are_matched_by_point_and_rank_and_moves_are_reported(tmp_path, capsys):
    mib = 2**20
    before = _sweep(tmp_path / "before.csv", [
        ["u p2", 0, 0, "ok", 100 * mib, 100 * mib, 0.0, "unet3d", 2, "[0, 4, 6]"],
        ["u p2", 1, 1, "ok", 200 * mib, 200 * mib, 0.0, "unet3d", 2, "[0, 4, 6]"],
        ["moved", 1, 1, "ok", 200 * mib, 200 * mib, 0.0, "unet3d", 2, "[0, 4, 6]"],
        ["only before", 0, 0, "ok", 5 * mib, 5 * mib, 0.0, "unet3d", 1, "[0, 6]"],
        ["failed", 0, 0, "error", 0, 1, 0.0, "unet3d", 1, "[0, 6]"]])
    after = _sweep(tmp_path / "after.csv", [
        ["u p2", 0, 0, "ok", 100 * mib, 100 * mib, 0.0, "unet3d", 2, "[0, 4, 6]"],
        ["u p2", 1, 1, "ok", 150 * mib, 160 * mib, 6.7, "unet3d", 2, "[0, 4, 6]"],
        ["moved", 1, 1, "ok", 50 * mib, 50 * mib, 0.0, "unet3d", 2, "[0, 3, 6]"],
        ["failed", 0, 0, "ok", 7 * mib, 7 * mib, 0.0, "unet3d", 1, "[0, 6]"]])
    md = tmp_path / "B.md"
    md.write_text("# B\n\n## Other\n\nkept\n")
    assert compare_memory_sweeps.main([str(before), str(after), "--md", str(md), "--write-md"]) == 0
    text = md.read_text()
    assert "kept" in text and compare_memory_sweeps.SECTION in text
    assert "| unet3d | receiving (stage > 0) | 1 | -25.0 % |" in text
    assert "| unet3d | stage 0 | 1 | +0.0 % |" in text
    assert "| u p2 | 1 | 1 | 200.0 | 150.0 | -25.0 % | +6.7 % |" in text
    assert "2 of 2 within ±10 %" in text and "(2 measured in only one, left out)" in text
    assert "1 more whose stage boundaries differ" in text and "| moved |" not in text


def test_a_file_that_is_not_a_sweep_is_named(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="x.csv: not a bench memory sweep"):
        compare_memory_sweeps.main([str(bad), str(bad)])
