"""GPU check of the memory planner (one GPU, bf16, under 10 minutes): largest trainable cube, predicted vs measured.

For the 25-layer deep CNN and the U-Net (their default sizes) with and without activation
checkpointing, the planner (``ds_seg3d.memory.prediction``, calibrated on thin slabs) picks the
largest cube edge whose single-stage training step fits the budget; that cube and the next one are
then trained for real (``ds_seg3d/memory/point.py`` under the ``deepspeed`` launcher, one rank,
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``), so the table shows the
planner's prediction beside each measured peak, and whether the next cube runs out of memory.

Multi-stage runs cannot share one GPU: for a 2-stage split each stage's sub-model is replayed at
full size in this process with its in-flight micro-batches (DeepSpeed's schedule and buffers, as
the planner replays them on slabs) and measured with the same counter; the table says so.

    python benchmarks/gpu_memory_check.py --out gpu_memory_check     # writes results.json and prints a table
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ds_seg3d.memory.replay import StageKey, replay_peak  # noqa: E402
from ds_seg3d.memory.prediction import MemoryModel, z_step  # noqa: E402
from ds_seg3d.memory.spec import RunSpec  # noqa: E402
from ds_seg3d.memory.sweep import launch  # noqa: E402

GIB = 2**30
MODELS = {"deep_cnn": {}, "unet3d": {}}  # the networks' default sizes: 25 layers x 32 channels; 4-level U-Net


def cube(spec: RunSpec, edge: int) -> RunSpec:
    return spec.with_(patch=(edge, edge, edge))


def largest_cube(spec: RunSpec, budget: int, step: int, lo: int, hi: int) -> tuple[int | None, dict[int, int]]:
    """Largest edge (multiple of ``step``) whose predicted peak fits; every tried edge's prediction."""
    tried: dict[int, int] = {}
    best = None
    edges = list(range(lo, hi + 1, step))
    a, b = 0, len(edges) - 1
    while a <= b:  # predicted peaks grow with the edge: bisect
        mid = (a + b) // 2
        e = edges[mid]
        spec_e = cube(spec, e)
        tried[e] = MemoryModel(spec_e, "cuda").predict(spec_e).max_peak
        if tried[e] <= budget:
            best, a = e, mid + 1
        else:
            b = mid - 1
    return best, tried


def release() -> None:
    """Hand this process's cached GPU memory back: the launched run shares the card with it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure(spec: RunSpec, out: Path, timeout: float) -> dict:
    status, records = launch(spec, out, timeout)
    rec = records[0]
    return {"status": rec.get("status", status), "measured": rec.get("measured_peak_bytes"),
            "method": rec.get("method"), "error": rec.get("error")}


def stage_check(spec: RunSpec) -> list[dict]:
    """2 stages, 2 micro-batches: each stage replayed at full size on this GPU vs the planner's slab prediction."""
    two = spec.with_(stages=2, ranks=2, micro_batches=2)
    model = MemoryModel(two, "cuda")
    pred = model.predict(two)
    rows = []
    for st in pred.stages:
        key = StageKey(st.start, st.stop, 2, st.stage, 2, two.checkpoint)
        torch.cuda.empty_cache()
        full, _ = replay_peak(two.layer_defs(), key, two.sample_shape, two.dtype, two.classes, "cuda")
        rows.append({"stage": st.stage, "layers": [st.start, st.stop], "in_flight": st.in_flight,
                     "predicted_activation_peak": st.activation_peak, "measured_activation_peak": full,
                     "how": "stage sub-model replayed alone on one GPU (DeepSpeed's schedule and buffers)"})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_memory_check"))
    p.add_argument("--budget-fraction", type=float, default=0.9, help="share of the GPU's memory to plan for")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per launched run")
    p.add_argument("--skip-next", action="store_true", help="do not launch the next cube up (saves time)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="after this many seconds only the largest predicted cubes are still launched")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    total = torch.cuda.get_device_properties(0).total_memory
    budget = int(args.budget_fraction * total)
    results = {"device": torch.cuda.get_device_name(0), "total_bytes": total, "budget_bytes": budget, "runs": []}
    # Three passes, so that a short time budget still measures every network once: the largest
    # predicted cubes first, then the next cube up, then the stage replays.
    todo = []
    for name, params in MODELS.items():
        for ckpt in (0, 1):
            spec = RunSpec(model=name, params=tuple(params.items()), patch=(64, 64, 64), precision="bf16",
                           checkpoint=ckpt)
            step = max(16, z_step(spec))
            edge, tried = largest_cube(spec, budget, step, 64, 512)
            release()
            row = {"model": name, "checkpoint": ckpt, "largest_predicted_edge": edge,
                   "predicted": {str(k): v for k, v in tried.items()}}
            results["runs"].append(row)
            if edge is not None:
                todo.append((row, spec, edge, step))
    for row, spec, edge, _ in todo:
        row["fit"] = measure(cube(spec, edge), args.out / f"{row['model']}_ckpt{row['checkpoint']}_{edge}", args.timeout)
        row["fit"]["predicted"] = int(row["predicted"][str(edge)])
        print(json.dumps(row, default=str), flush=True)
    for row, spec, edge, step in todo:
        if args.skip_next or time.time() - t0 > 0.85 * args.budget_s:
            break
        nxt = edge + step
        pred_next = MemoryModel(cube(spec, nxt), "cuda").predict(cube(spec, nxt)).max_peak
        release()
        row["next"] = measure(cube(spec, nxt), args.out / f"{row['model']}_ckpt{row['checkpoint']}_{nxt}",
                              args.timeout)
        row["next"].update(edge=nxt, predicted=pred_next)
        print(json.dumps(row, default=str), flush=True)
    for row, spec, edge, _ in todo:
        if row["checkpoint"] == 0 and time.time() - t0 < args.budget_s:
            row["stages"] = stage_check(cube(spec, edge))
            release()
            print(json.dumps(row, default=str), flush=True)
    results["seconds"] = round(time.time() - t0, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\n{results['device']}, budget {budget / GIB:.1f} GiB of {total / GIB:.1f} GiB, bf16, micro-batch 1")
    print(f"{'model':<9} {'ckpt':>4} {'cube':>5} {'predicted GiB':>14} {'measured GiB':>13} {'error %':>8}  next cube")
    for r in results["runs"]:
        fit = r.get("fit") or {}
        meas, pred = fit.get("measured"), fit.get("predicted")
        err = f"{100 * (pred / meas - 1):+.1f}" if meas and pred else "–"
        nxt = r.get("next")
        nxt_text = f"{nxt['edge']}^3: {nxt['status']}" if nxt else "not run"
        print(f"{r['model']:<9} {r['checkpoint']:>4} {r['largest_predicted_edge'] or '–':>5} "
              f"{(pred or 0) / GIB:>14.2f} {(meas or 0) / GIB:>13.2f} {err:>8}  {nxt_text}")
        for st in r.get("stages", []):
            print(f"    2 stages, stage {st['stage']} (in-flight {st['in_flight']}): activation peak predicted "
                  f"{st['predicted_activation_peak'] / GIB:.2f} GiB, measured {st['measured_activation_peak'] / GIB:.2f} "
                  f"GiB ({st['how']})")
    print(f"{results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
