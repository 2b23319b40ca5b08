"""``ds-seg3d bench memory``: predict, then measure, each rank's peak over a sweep of configurations.

Every point is predicted by the planner first (``prediction``), then launched as a real
multi-rank run with the ``deepspeed`` launcher (``point.py`` on every rank). A point that runs out
of memory, fails or times out becomes rows with its status and the sweep goes on. The CSV is
rewritten after every point, so an interrupted sweep keeps what it measured.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from ds_seg3d.memory.spec import RunSpec
from ds_seg3d.parallel.launch import deepspeed_launcher, free_port, launch_env
from ds_seg3d.results import write_csv_atomic

POINT_MODULE = "ds_seg3d.memory.point"
UNET = {"levels": 3, "base_width": 8, "max_width": 32}
DEEP_CNN = {"depth": 25, "width": 8}
DEEPER_CNN = {"depth": 121, "width": 8}
"""The same network five times deeper: what a pipeline is for. Its full-resolution tail (upsampling,
head, loss), which no split can divide, is a small share of the whole, unlike the 25-layer network's."""
PATCH = (128, 128, 16)
BUDGET_MIB = 256
"""Per-rank budget of the largest-patch check (the sweep's models need 100-400 MiB per rank)."""
BUDGET_STEP, BUDGET_Z_MAX = 4, 128
"""Z grid of the largest-patch check: one step changes a rank's peak by 5-15 %, more than the planner's error."""
COLUMNS = [
    "config", "group", "rank", "stage", "status", "predicted_peak_bytes", "measured_peak_bytes", "error_pct",
    "method", "predicted_phase", "model", "params", "patch", "stages", "ranks", "dp", "micro_batches", "in_flight",
    "checkpoint", "partition", "zero", "precision", "bucket", "plain", "boundaries", "measured_boundaries",
    "pred_held_bytes", "pred_pipe_buffers_bytes", "pred_working_bytes", "pred_params_bytes", "pred_grads_bytes",
    "pred_optimizer_bytes", "pred_buckets_bytes", "pred_profile_leftover_bytes", "pred_states_between_steps_bytes",
    "measured_step_start_bytes", "measured_state_bytes", "rss_peak_minus_init_bytes", "point_seconds", "error",
]


@dataclasses.dataclass(frozen=True)
class Point:
    spec: RunSpec
    group: str
    """What the point demonstrates: "scaling", "schedule", "zero", "precision", "size", "budget"."""


def sweep_points(quick: bool) -> list[Point]:
    """The configurations of the sweep; ``quick`` keeps 15 points, every swept dimension at least once."""
    u = RunSpec(model="unet3d", params=tuple(UNET.items()), patch=PATCH)
    d = RunSpec(model="deep_cnn", params=tuple(DEEP_CNN.items()), patch=PATCH)
    pts = [
        Point(u, "scaling"),
        Point(u.with_(stages=2, ranks=2), "scaling"),
        Point(u.with_(stages=2, ranks=2, partition="parameters"), "scaling"),
        Point(u.with_(stages=4, ranks=4), "scaling"),
        Point(u.with_(stages=2, ranks=2, micro_batches=4), "schedule"),
        Point(u.with_(stages=2, ranks=2, micro_batches=4, checkpoint=1), "schedule"),
        Point(u.with_(stages=2, ranks=4, micro_batches=2), "zero"),
        Point(u.with_(stages=2, ranks=2, micro_batches=2, zero=0), "zero"),
        Point(u.with_(plain=True, ranks=2, micro_batches=2, zero=2), "zero"),
        Point(u.with_(plain=True, ranks=2, micro_batches=2, zero=3), "zero"),
        Point(u.with_(stages=2, ranks=2, micro_batches=2, precision="bf16"), "precision"),
        Point(u.with_(stages=2, ranks=2, micro_batches=2, patch=(128, 128, 32)), "size"),
        Point(d, "scaling"),
        Point(d.with_(stages=2, ranks=2), "scaling"),
        Point(d.with_(params=(("depth", 13), ("width", 12)), stages=2, ranks=2), "size"),
    ]
    if not quick:
        pts += [
            Point(u.with_(stages=4, ranks=4, partition="parameters"), "scaling"),
            Point(d.with_(stages=2, ranks=2, partition="parameters"), "scaling"),
            Point(d.with_(stages=4, ranks=4), "scaling"),
            Point(d.with_(stages=4, ranks=4, partition="parameters"), "scaling"),
            Point(u.with_(stages=4, ranks=4, micro_batches=8), "schedule"),
            Point(u.with_(stages=4, ranks=4, micro_batches=8, checkpoint=2), "schedule"),
            Point(u.with_(stages=2, ranks=2, micro_batches=2, bucket=None), "zero"),
        ]
        pts = with_partition_points(pts)
    return pts


def partition_points() -> list[Point]:
    """The partition comparison: the three networks at p = 1, 2, 4 and m = 1, memory beside DeepSpeed's
    default ("parameters") split, enough to check the balance target without the rest of the sweep."""
    pts = []
    for model, params in (("unet3d", UNET), ("deep_cnn", DEEP_CNN), ("deep_cnn", DEEPER_CNN)):
        base = RunSpec(model=model, params=tuple(params.items()), patch=PATCH)
        pts.append(Point(base, "scaling"))
        for p in (2, 4):
            pts += [Point(base.with_(stages=p, ranks=p, partition=m), "scaling") for m in ("memory", "parameters")]
    return pts


def with_partition_points(points: list[Point]) -> list[Point]:
    """``points`` plus the partition comparison points they lack."""
    have = {p.spec.label() for p in points}
    return points + [p for p in partition_points() if p.spec.label() not in have]


def budget_points(model: Any, budget: int, stage_counts: tuple[int, ...] = (1, 2, 4)) -> list[Point]:
    """For each p (m = 1, memory partition): the largest patch Z the planner says fits ``budget``,
    and the next Z up, on a grid of ``BUDGET_STEP``, for the network ``model`` (a ``MemoryModel``) predicts."""
    base = model.base.with_(stages=1, ranks=1, patch=PATCH)
    pts = []
    for p in stage_counts:
        spec = base.with_(stages=p, ranks=p)
        z = model.largest_z(spec, budget, z_max=BUDGET_Z_MAX, step=BUDGET_STEP)
        if z is None:
            continue
        pts += [Point(spec.with_(patch=(*PATCH[:2], z)), "budget"),
                Point(spec.with_(patch=(*PATCH[:2], z + BUDGET_STEP)), "budget")]
    return pts


# ---------------------------------------------------------------- launching


def launch(spec: RunSpec, folder: Path, timeout: float) -> tuple[str, list[dict[str, Any]]]:
    """Run one point on ``spec.ranks`` ranks; (launch status, the rank records that were written)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cmd = [deepspeed_launcher(), "--num_gpus", str(spec.ranks), "--master_port", str(free_port()),
           "--module", POINT_MODULE, "--spec", spec.to_json(), "--out", str(folder)]
    with open(folder / "launch.log", "w") as log:
        proc = subprocess.Popen(cmd, env=launch_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timeout after {timeout:.0f} s"
        except BaseException:  # interrupted: take the ranks down with the launcher
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    records = []
    for rank in range(spec.ranks):
        path = folder / f"rank{rank}.json"
        records.append(json.loads(path.read_text()) if path.exists() else {"rank": rank, "status": status})
    return status, records


# ---------------------------------------------------------------- rows


def rows_for(point: Point, prediction: Any, records: list[dict[str, Any]], launch_status: str) -> list[dict]:
    spec = point.spec
    topo = spec.topology()
    rows = []
    for rec in records:
        rank = rec["rank"]
        stage = topo.stage_of(rank)
        row: dict[str, Any] = {
            "config": spec.label(), "group": point.group, "rank": rank, "stage": stage, "model": spec.model,
            "params": json.dumps(dict(spec.params)), "patch": "x".join(map(str, spec.patch)), "stages": spec.stages,
            "ranks": spec.ranks, "dp": spec.dp, "micro_batches": spec.micro_batches, "checkpoint": spec.checkpoint,
            "partition": "-" if spec.plain else spec.partition, "zero": spec.zero, "precision": spec.precision,
            "bucket": spec.bucket_elements, "plain": spec.plain,
        }
        status = rec.get("status", launch_status)
        if status == "ok" and launch_status != "ok":
            status = f"ok (launch: {launch_status})"
        row["status"] = status
        row["error"] = rec.get("error", "" if status.startswith("ok") else launch_status)
        if isinstance(prediction, str):
            row["error"] = (row["error"] + "; " if row["error"] else "") + f"prediction failed: {prediction}"
        elif prediction is not None:
            sp = prediction.stages[stage]
            st = sp.states
            row.update({
                "predicted_peak_bytes": prediction.rank_peak(rank), "predicted_phase": sp.phase,
                "in_flight": sp.in_flight, "boundaries": json.dumps(prediction.boundaries),
                "pred_held_bytes": sp.held, "pred_pipe_buffers_bytes": sp.pipe_buffers,
                "pred_working_bytes": sp.working, "pred_params_bytes": st.params, "pred_grads_bytes": st.grads,
                "pred_optimizer_bytes": st.optimizer,
                "pred_buckets_bytes": st.buckets_backward if sp.phase == "backward" else st.buckets_reduce,
                "pred_profile_leftover_bytes": prediction.rank_peak(rank) - (sp.peak - sp.profile_leftover),
                "pred_states_between_steps_bytes": st.persistent,
            })
        if "measured_peak_bytes" in rec:
            row.update({
                "measured_peak_bytes": rec["measured_peak_bytes"], "method": rec["method"],
                "measured_boundaries": json.dumps(rec["boundaries"]),
                "measured_step_start_bytes": rec["step_start_bytes"], "measured_state_bytes": rec["state_bytes"],
                "rss_peak_minus_init_bytes": rec.get("rss_peak_minus_init_bytes"),
            })
            if row.get("predicted_peak_bytes"):
                row["error_pct"] = round(100.0 * (row["predicted_peak_bytes"] / rec["measured_peak_bytes"] - 1), 2)
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    write_csv_atomic(path, rows, COLUMNS)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Predictor:
    """One ``MemoryModel`` per network / X / Y / precision, shared by the points that fit it."""

    def __init__(self, device: str = "cpu") -> None:
        self.device, self.models = device, {}

    def model(self, spec: RunSpec) -> Any:
        from ds_seg3d.memory.prediction import MemoryModel

        key = (spec.model, spec.params, spec.patch[:2], spec.micro_batch, spec.precision, spec.classes)
        if key not in self.models:
            self.models[key] = MemoryModel(spec, self.device)
        return self.models[key]

    def __call__(self, spec: RunSpec) -> Any:
        try:
            return self.model(spec).predict(spec)
        except Exception as err:  # noqa: BLE001 - a prediction failure is a row, not the end of the sweep
            return f"{type(err).__name__}: {err}"


def run_sweep(points: list[Point], out: Path, timeout: float = 600.0, device: str = "cpu",
              predictor: Predictor | None = None) -> list[dict]:
    """Predict and launch every point; the CSV under ``out`` grows after each one."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    predictor = predictor or Predictor(device)
    rows: list[dict] = []
    launched: dict[str, tuple[Any, str, list[dict[str, Any]], float]] = {}
    bar = tqdm(points, desc="bench memory", unit="point")
    for i, point in enumerate(bar):
        label = point.spec.label()
        bar.set_postfix_str(label[:60])
        if label not in launched:  # a configuration two groups share is launched once, listed in both
            t0 = time.perf_counter()
            prediction = predictor(point.spec)
            status, records = launch(point.spec, out / "points" / f"{i:02d}", timeout)
            launched[label] = (prediction, status, records, round(time.perf_counter() - t0, 1))
        prediction, status, records, seconds = launched[label]
        rows += [dict(row, point_seconds=seconds) for row in rows_for(point, prediction, records, status)]
        write_csv(out / "memory.csv", rows)
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="folder for memory.csv, memory.png, memory.md")
    p.add_argument("--quick", action="store_true",
                   help="15 points, every swept dimension at least once (about 6 min on 2 shared cores)")
    p.add_argument("--budget-mib", type=int, default=BUDGET_MIB,
                   help="per-rank budget of the largest-patch check (full sweep only)")
    p.add_argument("--partition", action="store_true",
                   help="add every partition comparison point (three networks, p = 1, 2, 4, m = 1) to --quick")
    p.add_argument("--only-partition", action="store_true",
                   help="run the partition comparison points only (15 points)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a point is recorded as timed out")


def run(args: argparse.Namespace) -> int:
    from ds_seg3d.memory.tables import write_report

    predictor = Predictor()
    points = partition_points() if args.only_partition else sweep_points(args.quick)
    if args.partition:
        points = with_partition_points(points)
    quick = args.quick or args.only_partition
    budget = args.budget_mib * 2**20
    if not quick:
        for params in (DEEP_CNN, DEEPER_CNN):
            points += budget_points(predictor.model(RunSpec(model="deep_cnn", params=tuple(params.items()),
                                                            patch=PATCH)), budget)
    rows = run_sweep(points, args.out, args.timeout, predictor=predictor)
    write_report(rows, args.out, budget=None if quick else budget)
    failed = sum(1 for r in rows if not str(r["status"]).startswith("ok"))
    print(f"{len(points)} points, {len(rows)} rows ({failed} failed): {args.out / 'memory.csv'}, "
          f"{args.out / 'memory.png'}, {args.out / 'memory.md'}")
    return 0
