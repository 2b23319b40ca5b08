"""Memory scaling: the planner's per-rank peak beside the measured one over a sweep of real launches.

Runs ``python -m ds_seg3d bench memory`` (or reads a folder it wrote, ``--from``), checks the
targets, and with ``--write-md`` replaces the "## Memory scaling" section of BENCHMARKS.md and
copies the charts to ``benchmarks/results/memory_*.png``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py --write-md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from ds_seg3d.bench.report import (  # noqa: E402
    MIB, number, accuracy, by_config, largest_patch, methods, partition_balance, rows_markdown, targets_markdown,
)
from ds_seg3d.bench.sweep import BUDGET_MIB, DEEP_CNN, UNET, read_csv, sweep_points  # noqa: E402
from ds_seg3d.report import write_section

SECTION = "## Memory scaling"
CHARTS = ("memory.png", "memory_partition.png", "memory_budget.png")


def machine(loads: list[str], when: str) -> str:
    import deepspeed
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    return (f"{len(os.sched_getaffinity(0))} CPUs ({cpu}), {mem / 2**20:.0f} GiB RAM, shared with other users "
            f"(load average {' -> '.join(loads)} {when}). Python {platform.python_version()}, "
            f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, gloo, OMP_NUM_THREADS=1 per rank")


def bf16_scratchpad() -> str:
    """oneDNN's bf16 weight-gradient scratchpad of one conv on slabs of growing Z (why bf16 slabs mislead)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sizes = []
    for z in (8, 16, 32):
        conv = torch.nn.Conv3d(8, 8, 3, padding=1, bias=False).bfloat16()
        x = torch.randn(1, 8, 128, 128, z).bfloat16().requires_grad_()
        y = conv(x)
        g = torch.randn_like(y)
        torch.autograd.grad(y, (x, conv.weight), g, retain_graph=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            torch.autograd.grad(y, (x, conv.weight), g, retain_graph=True)
        sizes.append(max(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"))
    return " / ".join(f"{s / MIB:.1f}" for s in sizes) + " MiB at Z = 8 / 16 / 32"


def limits(rows: list[dict], budget: int) -> list[str]:
    out = []
    acc = accuracy(rows)
    worst = acc["worst"]
    fp32 = [r for r in rows if r.get("precision") == "fp32" and number(r, "error_pct") is not None]
    if worst is not None:
        f32 = max(fp32, key=lambda r: abs(number(r, "error_pct")), default=None)
        fp32_text = f"; in fp32 {float(f32['error_pct']):+.1f} % ({f32['config']}, rank {f32['rank']})" if f32 else ""
        out.append(f"- **Accuracy.** Largest error {float(worst['error_pct']):+.1f} % ({worst['config']}, rank "
                   f"{worst['rank']}){fp32_text}. The planner replays each stage's DeepSpeed schedule on slabs of the patch "
                   f"(full X, Y; one and two Z steps) and extrapolates linearly in Z; fp32 kernels are exactly linear "
                   f"there. Two things move a measured peak by a few MiB from run to run: whether the previous "
                   f"step's ZeRO bucket is still referenced when the next step peaks, and where in the backward pass "
                   f"the peak falls.")
    bf = [r for r in rows if r.get("precision") == "bf16" and number(r, "error_pct") is not None]
    if bf:
        e = max(abs(number(r, "error_pct")) for r in bf)
        out.append(f"- **bf16 on this CPU** (largest error {e:.1f} %): oneDNN's bf16 weight-gradient scratchpad of "
                   f"an 8 -> 8 channel 3^3 convolution on 128 x 128 slabs is {bf16_scratchpad()}, not linear in Z, "
                   f"so slabs under- or over-state the working set of bf16 stages; fp32 kernels have no such term.")
    for model in ("unet3d", "deep_cnn"):
        for e in partition_balance(rows, model):
            pts = [r for r in by_config([r for r in rows if r.get("group") == "scaling" and r["model"] == model
                                         and str(r["stages"]) == str(e["p"]) and r["partition"] == "memory"
                                         and str(r["micro_batches"]) == "1"]).values()]
            if not pts:
                continue
            big = max(pts[0], key=lambda r: number(r, "measured_peak_bytes") or 0)
            leftover = number(big, "pred_profile_leftover_bytes") or 0
            fixed = sum(number(big, k) or 0 for k in ("pred_pipe_buffers_bytes", "pred_working_bytes")) + leftover
            parts, best, exact = planner_best(model, e["p"])
            reach = ("within the target" if best <= e["limit"] else "out of the target's reach for any split")
            best_text = (f"the planner's best over every split is {parts} at {_mib(best)} MiB" if exact else
                         f"no split gets the largest stage below {_mib(best)} MiB (planner: the cheapest last stage, "
                         f"layers [{parts[1]}, {parts[2]}), alone)")
            out.append(
                f"- **{model}, p = {e['p']}** (memory partition {e['memory']['boundaries']}, largest stage "
                f"{_mib(e['memory']['largest'])} MiB against {_mib(e['limit'])} MiB"
                + (f"; DeepSpeed's parameters split {e['parameters']['boundaries']}: "
                   f"{_mib(e['parameters']['largest'])} MiB" if "parameters" in e else "")
                + f"): {best_text}, {reach}. The largest stage (rank {big['rank']}) holds "
                f"{_mib(number(big, 'pred_held_bytes'))} MiB of activations and pays {_mib(fixed)} MiB that do not "
                f"shrink with p: the backward working set of its full-resolution layers and the loss "
                f"({_mib(number(big, 'pred_working_bytes'))}) and DeepSpeed's pipe buffers "
                f"({_mib(number(big, 'pred_pipe_buffers_bytes'))}: receive and gradient buffers, loaded inputs and "
                f"labels, the last stage's retained outputs)"
                + (f" and the partition profile's leftover tensors ({_mib(leftover)})" if leftover else "")
                + ". A layer is the smallest unit a split can move, and the full-resolution levels are the largest "
                "layers.")
    entries = largest_patch(rows, budget)
    if entries:
        out.append("- **Largest patch.** " + "; ".join(
            f"p = {e['p']}: Z = {e['z']} (predicted {_mib(e['predicted'])}, measured {_mib(e['measured'])} MiB)"
            for e in entries) + f" on {budget / MIB:.0f} MiB: it grows with p only as far as the largest stage "
            "shrinks, for the reasons above.")
    return out


def planner_best(model: str, stages: int) -> tuple[list[int], int, bool]:
    """The planner's best split of the sweep's network at p = ``stages``, m = 1 (``memory_model.best_split``)."""
    from ds_seg3d.bench.memory_model import MemoryModel, best_split
    from ds_seg3d.bench.spec import RunSpec
    from ds_seg3d.bench.sweep import PATCH

    params = UNET if model == "unet3d" else DEEP_CNN
    spec = RunSpec(model=model, params=tuple(params.items()), patch=PATCH, stages=stages, ranks=stages)
    return best_split(MemoryModel(spec), spec)


def _mib(v: float | None) -> str:
    return "–" if v is None else f"{v / MIB:,.1f}"


def section(rows: list[dict], command: str, sweep: str, loads: list[str], when: str, budget: int) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    quick = [r for r in rows if r.get("point_seconds")]
    acc = accuracy(rows)
    lines = [
        SECTION, "", f"Written by `{command}` on {now}, from the sweep `{sweep}`.  ", f"Machine: {machine(loads, when)}.",
        "",
        f"Every point is first predicted by the planner (`ds_seg3d.bench.memory_model`, as `python -m ds_seg3d plan` "
        f"uses it), then launched on real ranks with the `deepspeed` launcher (`ds_seg3d/bench/point.py`): the "
        f"pipeline built by `build_pipeline` and `initialize_pipeline` as `ds_seg3d.train` builds it (or the plain "
        f"engine for ZeRO-2/3), `DiceCELoss`, fresh random images and int64 labels per micro-batch, one warm-up "
        f"step, then one measured step. Measured per rank: {methods(rows)} (the profiler runs from before the model "
        f"is built, so parameters, optimizer states, DeepSpeed's buffers and activations are all counted). "
        f"Networks: U-Net {UNET}, deep CNN {DEEP_CNN} (and one wider, shallower deep CNN), 3 classes, patch 128 x 128 x "
        f"16 unless named. DeepSpeed configs: the shipped `pipeline_zero1_cpu_fp32.json` / `plain_zero3.json` with the "
        f"point's ZeRO stage and precision, ZeRO buckets of 2^20 elements"
        + (" (one point keeps DeepSpeed's default 5e8)" if any("bucket=" in r["config"] for r in rows) else "")
        + f" and the CSV monitor off. {acc['points']} points, {acc['rows']} rank peaks"
        + (f"; {len(set(r['config'] for r in rows if not str(r['status']).startswith('ok')))} failed" if acc["failed"]
           else "") + ".", "", "### Targets", "", *targets_markdown(rows, budget), "", "### Every rank of every point",
        "", "Bytes in MiB. *held*: activations x in-flight micro-batches (with checkpointing: checkpoint boundaries "
        "x in-flight); *pipe buffers*: what the stage keeps between steps; *working set*: the rest of the activation "
        "peak (backward working set, recomputation, engine copies); *states*: parameters, gradients, fp32 master and "
        "Adam moments under the ZeRO stage; *buckets*: ZeRO communication buffers; *profile leftover*: tensors the "
        "partition profile leaves alive on the ranks that ran it.", "", *rows_markdown(rows), "",
        "### What limits the numbers", "", *limits(rows, budget), "",
        "GPU check: `benchmarks/gpu_memory_check.py` (largest bf16 cube of the 25-layer CNN and the U-Net with and "
        "without checkpointing on one GPU, predicted beside measured; stages replayed one at a time); its results "
        "are in the section \"Memory on one GPU\" below.", "",
    ]
    if quick:
        q = {r["config"]: float(r["point_seconds"]) for r in quick}
        quick_labels = {p.spec.label() for p in sweep_points(quick=True)}
        in_quick = [v for k, v in q.items() if k in quick_labels]
        lines += [f"Point wall times (prediction + launch): median {sorted(q.values())[len(q) // 2]:.0f} s, "
                  f"total {sum(q.values()) / 60:.1f} min for {len(q)} points; the {len(in_quick)} points of "
                  f"`bench memory --quick` took {sum(in_quick) / 60:.1f} min of them (target: >= 12 points within "
                  f"20 min: {'PASS' if len(in_quick) >= 12 and sum(in_quick) <= 1200 else 'MISS'}).", ""]
    for chart in CHARTS:
        lines.append(f"![{chart}](benchmarks/results/{chart.replace('memory.png', 'memory_sweep.png')})")
    return "\n".join(lines) + "\n"




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_memory", help="sweep folder (CSV, PNG, md)")
    p.add_argument("--from", dest="source", type=Path, help="report on a folder `bench memory` already wrote")
    p.add_argument("--quick", action="store_true", help="the 15-point sweep (no largest-patch check)")
    p.add_argument("--partition", action="store_true", help="with --quick: add every partition comparison point")
    p.add_argument("--only-partition", action="store_true", help="the 10 partition comparison points only")
    p.add_argument("--budget-mib", type=int, default=BUDGET_MIB)
    p.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--write-md", action="store_true", help=f'replace the "{SECTION}" section of --md')
    args = p.parse_args(argv)
    shown = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/bench_memory.py", *map(shlex.quote, shown)])
    loads = [" / ".join(f"{v:.2f}" for v in os.getloadavg())]
    folder = args.source
    flags = ((["--quick"] if args.quick else []) + (["--partition"] if args.partition else [])
             + (["--only-partition"] if args.only_partition else []))
    sweep = f"python -m ds_seg3d bench memory --out {args.source or args.out}" + "".join(f" {f}" for f in flags)
    when = "when this report was written; the sweep ran earlier on the same shared machine"
    if folder is None:
        folder = args.out
        t0 = time.time()
        cmd = [sys.executable, "-m", "ds_seg3d", "bench", "memory", "--out", str(folder),
               "--budget-mib", str(args.budget_mib), *flags]
        rc = subprocess.call(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if rc != 0:
            print(f"error: {' '.join(cmd)} exited with {rc}", file=sys.stderr)
            return rc
        when = f"before and after the {(time.time() - t0) / 60:.0f}-minute sweep"
    loads.append(" / ".join(f"{v:.2f}" for v in os.getloadavg()))
    csv_path = folder / "memory.csv"
    if not csv_path.exists():
        print(f"error: {csv_path}: no sweep results", file=sys.stderr)
        return 2
    rows = read_csv(csv_path)
    budget = args.budget_mib * MIB
    from ds_seg3d.bench.report import write_report

    write_report(rows, folder, budget=None if args.quick or args.only_partition else budget)
    text = section(rows, command, sweep, loads, when, budget)
    results = ROOT / "benchmarks" / "results"
    for chart in CHARTS:
        if (folder / chart).exists():
            shutil.copyfile(folder / chart, results / chart.replace("memory.png", "memory_sweep.png"))
    if args.write_md:
        write_section(args.md, text)
        print(f"wrote the {SECTION!r} section of {args.md}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
