"""Peak measurement, the sweep's rows and reports, and one real 2-rank sweep point (predicted vs measured)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from ds_seg3d.memory.charts import plot_depth
from ds_seg3d.memory.checks import accuracy, all_partition_balance, budget_networks, largest_patch, partition_balance
from ds_seg3d.memory.measurement import CPU_METHOD, PeakTracker, rss_bytes, state_tensors, unique_storage_bytes
from ds_seg3d.memory.spec import RunSpec
from ds_seg3d.memory.sweep import (
    COLUMNS,
    Point,
    partition_points,
    read_csv,
    rows_for,
    sweep_points,
    with_partition_points,
    write_csv,
)
from ds_seg3d.memory.tables import rows_markdown, write_report

MIB = 2**20


# ---------------------------------------------------------------- measurement


def test_tracker_sees_a_transient_allocation_and_what_persists():
    tracker = PeakTracker("cpu").start()
    keep = torch.empty(3 * MIB, dtype=torch.uint8)
    with tracker.window("w"):
        tmp = torch.empty(5 * MIB, dtype=torch.uint8)
        del tmp
        kept_too = torch.empty(MIB, dtype=torch.uint8)
    tracker.stop()
    r = tracker.result("w")
    assert r.method == CPU_METHOD
    assert r.start == 3 * MIB                 # what was alive when the window opened
    assert r.peak == 8 * MIB                  # 3 kept + 5 transient
    assert r.end == 4 * MIB                   # 3 + 1 still alive
    del keep, kept_too


def test_tracker_counts_autograd_buffers_of_a_backward_pass():
    conv = torch.nn.Conv3d(2, 4, 3, padding=1)
    x = torch.randn(1, 2, 8, 8, 8, requires_grad=True)
    tracker = PeakTracker("cpu").start()
    with tracker.window("fb"):
        y = conv(x)
        y.sum().backward()
    tracker.stop()
    out_bytes = 4 * 8**3 * 4
    assert tracker.result("fb").peak >= out_bytes + x.numel() * 4  # output and input gradient at least


def test_unique_storages_count_views_once():
    flat = torch.zeros(1000)
    views = [flat[:500], flat[500:], flat.view(10, 100)]
    assert unique_storage_bytes(views) == 4000
    assert unique_storage_bytes([flat, torch.zeros(10)]) == 4040


def test_state_tensors_include_optimizer_moments():
    model = torch.nn.Linear(10, 10)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    params = sum(p.numel() for p in model.parameters()) * 4
    # parameters, gradients, exp_avg and exp_avg_sq (plus Adam's scalar step counters)
    assert 4 * params <= unique_storage_bytes(state_tensors(model, opt)) <= 4 * params + 64


def test_rss_helpers_report_a_baseline_and_a_resettable_peak():
    base = rss_bytes()
    assert base is not None and base > 0
    # In a fresh process: this one may hold freed pages that a new block would reuse without growing.
    code = ("import torch; from ds_seg3d.memory.measurement import peak_rss_bytes, reset_peak_rss, rss_bytes\n"
            "base = rss_bytes(); assert reset_peak_rss()\n"
            "block = torch.ones(64 * 2**20, dtype=torch.uint8)  # touched pages count\n"
            "assert peak_rss_bytes() >= base + 32 * 2**20 and int(block[-1]) == 1\n"
            "del block; assert reset_peak_rss() and peak_rss_bytes() < base + 32 * 2**20\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------- spec, rows, reports


def test_spec_round_trips_and_refuses_bad_layouts():
    spec = RunSpec(model="unet3d", params={"levels": 2, "base_width": 4}, patch=(32, 32, 8), stages=2, ranks=4,
                   micro_batches=2)
    assert RunSpec.from_json(spec.to_json()) == spec
    assert spec.dp == 2 and "p2 m2 memory zero1" in spec.label()
    cfg = spec.ds_config()
    assert cfg["zero_optimization"]["reduce_bucket_size"] == spec.bucket_elements
    assert cfg["train_batch_size"] == 4 and cfg["gradient_accumulation_steps"] == 2
    with pytest.raises(ValueError, match="ZeRO-2 needs the plain engine"):
        spec.with_(zero=2)
    with pytest.raises(ValueError, match="divisible"):
        spec.with_(patch=(32, 32, 7))
    with pytest.raises(ValueError, match="does not divide"):
        spec.with_(ranks=3)


def test_quick_sweep_covers_every_dimension_with_at_least_12_points():
    points = sweep_points(quick=True)
    specs = [p.spec for p in points]
    assert len(points) >= 12 and len({s.label() for s in specs}) == len(specs)
    assert {s.stages for s in specs} >= {1, 2, 4}
    assert {s.zero for s in specs} >= {0, 1, 2, 3} and {s.precision for s in specs} == {"fp32", "bf16"}
    assert any(s.checkpoint for s in specs) and {s.partition for s in specs} >= {"memory", "parameters"}
    assert len({s.patch for s in specs}) > 1 and len({s.params for s in specs}) > 2


def _fake_rows(measured: dict[tuple[int, int], float], spec: RunSpec, group: str, factor: float) -> list[dict]:
    """Rows as ``rows_for`` writes them, measured as given, predicted at ``factor`` x measured."""
    records = [{"rank": r, "status": "ok", "measured_peak_bytes": int(measured[(spec.stages, r)]),
                "method": CPU_METHOD, "boundaries": [0, 1], "step_start_bytes": 0, "state_bytes": 0}
               for r in range(spec.ranks)]
    rows = rows_for(Point(spec, group), None, records, "ok")
    for row in rows:
        row["predicted_peak_bytes"] = int(round(factor * row["measured_peak_bytes"]))
        row["error_pct"] = round(100 * (row["predicted_peak_bytes"] / row["measured_peak_bytes"] - 1), 2)
    return rows


def test_partition_points_compare_both_methods_for_every_network():
    pts = partition_points()
    nets = {(p.spec.model, p.spec.params) for p in pts}
    assert {m for m, _ in nets} == {"unet3d", "deep_cnn"} and len(nets) == 3  # the deep CNN at two depths
    layouts = {(p.spec.model, p.spec.params, p.spec.stages, p.spec.partition) for p in pts if p.spec.stages > 1}
    assert layouts == {(*n, s, k) for n in nets for s in (2, 4) for k in ("memory", "parameters")}
    assert {(p.spec.model, p.spec.params) for p in pts if p.spec.stages == 1} == nets
    assert all(p.spec.micro_batches == 1 and p.spec.ranks == p.spec.stages for p in pts)
    quick = sweep_points(quick=True)
    merged = with_partition_points(quick)
    labels = [p.spec.label() for p in merged]
    assert len(labels) == len(set(labels)) and merged[: len(quick)] == quick
    assert {p.spec.label() for p in pts} <= set(labels)
    assert with_partition_points(sweep_points(quick=False)) == sweep_points(quick=False)


def test_targets_are_computed_from_rows_and_reports_are_written(tmp_path):
    u = RunSpec(model="unet3d", params={"levels": 2, "base_width": 4}, patch=(32, 32, 8))
    rows = _fake_rows({(1, 0): 100 * MIB}, u, "scaling", 1.04)
    rows += _fake_rows({(2, 0): 55 * MIB, (2, 1): 58 * MIB}, u.with_(stages=2, ranks=2), "scaling", 1.03)
    rows += _fake_rows({(2, 0): 90 * MIB, (2, 1): 30 * MIB}, u.with_(stages=2, ranks=2, partition="parameters"),
                       "scaling", 0.88)
    acc = accuracy(rows)
    assert acc["points"] == 3 and acc["rows"] == 5 and acc["within"] == 3
    assert acc["max_abs_error_pct"] == pytest.approx(12.0, abs=0.01)
    assert not acc["pass"]  # fewer than 12 points and errors above 10 %
    (bal,) = partition_balance(rows)
    assert bal["memory"]["largest"] == 58 * MIB and bal["parameters"]["largest"] == 90 * MIB
    assert bal["limit"] == pytest.approx(1.2 * 100 * MIB / 2) and bal["pass"]
    budget = 64 * MIB
    rows += _fake_rows({(1, 0): 60 * MIB}, u.with_(patch=(32, 32, 8)), "budget", 1.01)
    rows += _fake_rows({(1, 0): 70 * MIB}, u.with_(patch=(32, 32, 12)), "budget", 0.99)
    (lp,) = largest_patch(rows, budget)
    assert (lp["z"], lp["z_next"], lp["pass"]) == (8, 12, True)

    # a second network of the same model: balance and budget checks stay per network
    d1 = RunSpec(model="deep_cnn", params={"depth": 5, "width": 4}, patch=(32, 32, 8))
    d2 = d1.with_(params={"depth": 9, "width": 4})
    for spec, (one, two) in ((d1, (40 * MIB, 30 * MIB)), (d2, (80 * MIB, 45 * MIB))):
        rows += _fake_rows({(1, 0): one}, spec, "scaling", 1.0)
        rows += _fake_rows({(2, 0): two, (2, 1): two - MIB}, spec.with_(stages=2, ranks=2), "scaling", 1.0)
        rows += _fake_rows({(1, 0): 60 * MIB}, spec.with_(patch=(32, 32, 8)), "budget", 1.0)
        rows += _fake_rows({(1, 0): 70 * MIB}, spec.with_(patch=(32, 32, 16)), "budget", 1.0)
    before = accuracy(rows)
    rows += _fake_rows({(1, 0): 40 * MIB}, d1, "budget", 1.0)  # d1's unsplit point serves both checks
    assert accuracy(rows)["rows"] == before["rows"] and accuracy(rows)["points"] == before["points"]
    assert rows_markdown(rows) == rows_markdown(rows[:-1])  # listed once
    assert partition_balance(rows, "deep_cnn") == []  # ambiguous without params
    entries = all_partition_balance(rows)
    assert [(e["network"], e["pass"]) for e in entries] == [
        ("unet3d(base_width=4,levels=2)", True), ("deep_cnn(depth=5,width=4)", False),
        ("deep_cnn(depth=9,width=4)", True)]
    assert len(budget_networks(rows)) == 3
    assert [e["z_next"] for p in budget_networks(rows) for e in largest_patch(rows, budget, p)] == [12, 16, 16]
    assert [e["z"] for e in largest_patch(rows, budget, budget_networks(rows)[1])] == [8]

    write_csv(tmp_path / "memory.csv", rows)
    back = read_csv(tmp_path / "memory.csv")
    assert list(back[0]) == COLUMNS and len(back) == len(rows)
    assert back[0]["boundaries"] == "" and rows[0].get("boundaries") is None  # no prediction: empty cell
    assert not list(tmp_path.glob(".tmp-*"))  # written under a temp name, then renamed
    assert accuracy(back)["max_abs_error_pct"] == acc["max_abs_error_pct"]  # strings from the CSV work too
    write_report(back, tmp_path, budget=budget)
    md = (tmp_path / "memory.md").read_text()
    assert "MISS" in md and "unet3d(base_width=4,levels=2), p = 2, m = 1" in md
    assert md.count("largest trainable patch") == 3 and "deep_cnn(depth=9,width=4), p = 2" in md
    for name in ("memory.png", "memory_partition.png", "memory_budget.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = [{"depth": d, "p": p, "partition": m, "ratio": 1 + 4 / d} for d in (5, 9) for p in (2, 4)
             for m in ("memory", "parameters")]
    plot_depth(curve, [{"depth": 9, "p": 2, "partition": "memory", "ratio": 1.1}], tmp_path / "depth.png", 1.2)
    assert (tmp_path / "depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- one real launch


@pytest.mark.multirank
def test_two_rank_point_is_predicted_within_ten_percent(tmp_path):
    """A 2-stage U-Net with 2 micro-batches on 2 real ranks: the CSV row of every rank against the planner."""
    from ds_seg3d.memory.sweep import run_sweep

    spec = RunSpec(model="unet3d", params={"levels": 2, "base_width": 8, "max_width": 16}, patch=(96, 96, 8),
                   stages=2, ranks=2, micro_batches=2)
    rows = run_sweep([Point(spec, "scaling")], tmp_path, timeout=900)
    assert [r["status"] for r in rows] == ["ok", "ok"], json.dumps(rows, default=str)[:2000]
    for row in rows:
        assert row["method"] == CPU_METHOD
        assert row["measured_boundaries"] == row["boundaries"]  # the planner predicted the run's own split
        assert abs(row["error_pct"]) <= 10.0, row
        assert row["measured_peak_bytes"] > row["measured_step_start_bytes"] > 0
    with open(tmp_path / "memory.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2
