"""``ds-seg3d plan``: layouts that fit a budget, ranked by expected throughput, and bad input."""
from __future__ import annotations

import re

import pytest

from ds_seg3d.__main__ import main
from ds_seg3d.memory.planner import Candidate, candidates
from ds_seg3d.memory.spec import DEEPSPEED_BUCKET, RunSpec
from ds_seg3d.parallel.ds_config import load_ds_config

TINY = ["--model", "unet3d", "--set", "model.params.levels=2", "--set", "model.params.base_width=4",
        "--set", "model.params.max_width=8", "--patch", "32", "32", "8", "--bucket", "65536", "--device", "cpu"]
HEAD = re.compile(r"^#(\d+)\s+stages=(\d+) dp=(\d+) micro-batches=(\d+) checkpoint=(\S+) zero=(\d) partition=(\S+)")
THROUGHPUT = re.compile(r"throughput ([0-9.]+) of ideal .* largest rank peak ([0-9.e+-]+) GiB of ([0-9.e+-]+) GiB")


def _layouts(out: str) -> list[dict]:
    rows, lines = [], out.splitlines()
    for i, line in enumerate(lines):
        m = HEAD.match(line)
        if m:
            t = THROUGHPUT.search(lines[i + 1])
            rows.append({"rank": int(m[1]), "stages": int(m[2]), "m": int(m[4]), "checkpoint": m[5],
                         "throughput": float(t[1]), "peak_gib": float(t[2]), "budget_gib": float(t[3])})
    return rows


def test_candidates_cover_stage_counts_that_divide_the_ranks():
    base = RunSpec(model="unet3d", params={"levels": 2, "base_width": 4}, patch=(32, 32, 8), ranks=4)
    specs = candidates(base, [1, 2, 3, 4], [1, 4], [0, 1], ["memory", "parameters"], [1, 0])
    assert {s.stages for s in specs} == {1, 2, 4}  # 3 does not divide 4 ranks
    assert len([s for s in specs if s.stages == 1]) == 2 * 2 * 2  # m x checkpoint x ZeRO, no partition choice
    assert len([s for s in specs if s.stages == 2]) == 2 * 2 * 2 * 2
    assert all(s.dp * s.stages == 4 for s in specs)


def test_throughput_counts_the_bubble_and_the_recompute():
    spec = RunSpec(model="unet3d", params={"levels": 2, "base_width": 4}, patch=(32, 32, 8), ranks=2, stages=2,
                   micro_batches=4)
    assert Candidate(spec, None).bubble == pytest.approx(1 / 5)
    assert Candidate(spec, None).throughput == pytest.approx(0.8)
    assert Candidate(spec.with_(checkpoint=1), None).throughput == pytest.approx(0.8 / (4 / 3))
    assert Candidate(spec.with_(stages=1), None).throughput == 1.0


def test_plan_prints_fitting_layouts_best_first(capsys):
    rc = main(["plan", "--budget-gb", "1", "--ranks", "2", "--micro-batches", "1", "4", "--checkpoint", "0", "1",
               "--zero", "1", "--partitions", "memory", *TINY])
    out = capsys.readouterr().out
    assert rc == 0, out
    layouts = _layouts(out)
    assert len(layouts) == 8 and "8 of 8 layouts fit" in out
    assert [r["rank"] for r in layouts] == list(range(1, 9))
    scores = [r["throughput"] for r in layouts]
    assert scores == sorted(scores, reverse=True)
    assert layouts[0]["stages"] == 1 and layouts[-1]["checkpoint"] != "off"
    assert all(r["peak_gib"] <= r["budget_gib"] for r in layouts)
    for column in ("in-flight", "held", "pipe buf", "working", "params", "grads", "optim", "buckets", "peak"):
        assert column in out
    assert "stages traced on the meta device at the full patch, kernel workspaces measured on 32x32x2, 32x32x4" in out


def test_plan_keeps_only_what_fits_and_says_when_nothing_does(capsys):
    args = ["--ranks", "2", "--micro-batches", "1", "--checkpoint", "0", "--zero", "1", "--partitions", "memory", *TINY]
    assert main(["plan", "--budget-gb", "1", *args]) == 0
    peaks = sorted(r["peak_gib"] for r in _layouts(capsys.readouterr().out))
    between = (peaks[0] + peaks[-1]) / 2
    assert peaks[0] < peaks[-1]
    assert main(["plan", "--budget-gb", str(between), *args]) == 0
    kept = _layouts(capsys.readouterr().out)
    assert 0 < len(kept) < len(peaks) and all(r["peak_gib"] <= between for r in kept)
    assert main(["plan", "--budget-gb", "0.0001", *args]) == 1
    assert "nothing fits" in capsys.readouterr().out


def test_plan_warns_when_deepspeeds_default_bucket_dominates(capsys):
    args = [a for a in TINY if a not in ("--bucket", "65536")]
    rc = main(["plan", "--budget-gb", "8", "--ranks", "2", "--stages", "2", "--micro-batches", "2", "--checkpoint", "0",
               "--zero", "1", "--partitions", "memory", "--bucket", str(DEEPSPEED_BUCKET), *args])
    out = capsys.readouterr().out
    assert rc == 0 and "ZeRO bucket 500,000,000 elements" in out
    assert "gradient reduction" in out and "note: DeepSpeed's ZeRO bucket" in out


@pytest.mark.parametrize("config", [None, "ds_configs/pipeline_zero1_cpu_fp32.json", "ds_configs/pipeline_zero1_gpu_bf16.json"])
def test_plan_reads_the_bucket_from_the_deepspeed_config(capsys, config):
    args = [a for a in TINY if a not in ("--bucket", "65536")]
    if config is not None:
        args += ["--deepspeed-config", config]
    rc = main(["plan", "--budget-gb", "8", "--ranks", "2", "--stages", "2", "--micro-batches", "2", "--checkpoint", "0",
               "--zero", "1", "--partitions", "memory", *args])
    out = capsys.readouterr().out
    path = config or "ds_configs/pipeline_zero1_cpu_fp32.json"
    elements = load_ds_config(path)["zero_optimization"]["reduce_bucket_size"]
    assert elements < DEEPSPEED_BUCKET
    assert rc == 0 and f"ZeRO bucket {elements:,} elements" in out


@pytest.mark.parametrize("argv,message", [
    (["--patch", "32", "32", "7"], "divisible"),
    (["--ranks", "0"], "--ranks must be >= 1"),
    (["--budget-gb", "-1"], "--budget-gb must be positive"),
    (["--set", "model.params.nope=3"], "nope"),
])
def test_plan_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    base = ["plan", "--budget-gb", "1", *TINY]
    for i, a in enumerate(argv):
        if a.startswith("--") and a in base:
            j = base.index(a)
            n = 3 if a == "--patch" else 1
            del base[j:j + 1 + n]
    rc = main([*base, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]
