"""What does a DeepSpeed training step cost over plain PyTorch, and how well do 2 pipeline stages scale?

The driver: it launches ``training_ranks.py`` (the rank roles) with the ``deepspeed`` launcher,
``--role single`` on 1 rank (stage timings of the candidate splits; the single-stage PipelineEngine
and a plain PyTorch loop of the same layers, step by step in turn) and ``--role pipe`` on 2 ranks
(the same model as 2 stages), then ``torch_pipelining_ranks.py`` on 2 ranks (the same layers, split
and micro-batches on ``torch.distributed.pipelining``: 1F1B, and the zero-bubble V schedule), and
writes the report and the chart.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_training.py --write-md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, Path(__file__).resolve().parent):  # run as a plain script from a checkout
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from training_ranks import CLASSES, MODELS, MS, PATCH, SEED, STAGES  # noqa: E402

from ds_seg3d.results import save_png, write_section  # noqa: E402

SECTION = "## Training step"
RANKS = Path(__file__).resolve().with_name("training_ranks.py")
TORCH_RANKS = RANKS.with_name("torch_pipelining_ranks.py")
TORCH_NAMES = {"1f1b": "torch 1F1B", "zbv": "torch ZBV"}


# ---------------------------------------------------------------- driver side

def launch(ranks: int, role_args: list[str], work: Path, total: int, desc: str, script: Path = RANKS) -> None:
    """One ``deepspeed --num_gpus N`` launch of a rank script, with a progress bar fed by rank 0."""
    from tqdm import tqdm

    from tests.launch import run_deepspeed, tail

    (work / "progress").unlink(missing_ok=True)
    with ThreadPoolExecutor(1) as pool, tqdm(total=total, desc=desc, unit="step") as bar:
        job = pool.submit(run_deepspeed, script, [*role_args, "--work", str(work)],
                          num_ranks=ranks, timeout=900, check=False)
        while not job.done():
            time.sleep(1.0)
            done = (work / "progress").read_text() if (work / "progress").exists() else ""
            bar.update(int(done or 0) - bar.n)
    proc = job.result()
    if proc.returncode != 0:
        raise SystemExit(f"error: {desc}: the launch exited with {proc.returncode}:\n{tail(proc.stdout, 30)}")


def stats(values: list[float]) -> tuple[float, float]:
    """Median and interquartile range."""
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return float(med), float(q3 - q1)


def med_parts(steps: list[dict]) -> dict[str, float]:
    """Median of each part of a step's time (compute, p2p, ...) over steps."""
    return {k: float(np.median([s["parts"].get(k, 0.0) for s in steps])) for k in steps[0]["parts"]}


def ceiling(t: list[float], joint: list[float], m: int) -> float:
    """1F1B efficiency from the stage times t alone, communication free: fill and drain once, then the slowest
    stage; the single stage does one autograd call per micro-batch (the sum of the ``joint`` stage times)."""
    return m * sum(joint) / (len(t) * (sum(t) + (m - 1) * max(t)))


def versus_torch(single_s: dict, ds_pipe: list[dict], torch_ranks: list[dict]) -> dict:
    """torch.distributed.pipelining on the same model: step times, E and peaks per schedule, and how far its
    1F1B losses are from DeepSpeed's (same weights, data, optimizer and step sequence: they must agree)."""
    out: dict[str, Any] = {}
    for kind, r0 in torch_ranks[0].items():
        r1 = torch_ranks[1][kind]
        ms = sorted({s["m"] for s in r0["steps"]})
        pipe_s = {m: stats([max(a["s"], b["s"]) for a, b in zip(r0["steps"], r1["steps"]) if a["m"] == m]) for m in ms}
        out[kind] = {"parts": r0["parts"], "pipe": pipe_s, "peak": [r0["peak"], r1["peak"]],
                     "eff": {m: single_s[m][0] / pipe_s[m][0] / STAGES for m in ms},
                     "sched_cpu": {m: [float(np.median([s["parts"]["schedule_cpu"] / s["parts"]["schedule"]
                                                        for s in r["steps"] if s["m"] == m])) for r in (r0, r1)]
                                   for m in ms}}
    last = torch_ranks[1]["1f1b"]["steps"]  # rank 1 holds the last stage
    rel = [abs(t["loss"] / d["loss"] - 1) for t, d in zip(last, ds_pipe[1]["steps"])]
    if len(last) != len(ds_pipe[1]["steps"]) or max(rel) > 1e-3:
        raise SystemExit(f"error: torch 1F1B and DeepSpeed losses differ by up to {max(rel):.1e} (relative): "
                         "the two pipelines are not running the same training")
    out["loss_rel"] = max(rel)
    return out


def summarise(single: dict, pipe: list[dict], torch_ranks: list[dict]) -> dict:
    """Per model: medians and IQRs, back-to-back pair ratios, efficiencies and the per-stage breakdown."""
    out = {}
    for name, s in single.items():
        pairs = [{r["loop"]: r for r in pair} for pair in zip(s["steps"][0::2], s["steps"][1::2])]
        p0, p1 = pipe[0][name], pipe[1][name]  # rank = stage when dp = 1
        cand = s["candidates"][p0["method"]]
        if p0["parts"] != cand["parts"]:
            raise SystemExit(f"error: {name}: DeepSpeed split {p0['parts']}, expected {cand['parts']}")
        pipe_s = {m: stats([max(a["s"], b["s"]) for a, b in zip(p0["steps"], p1["steps"]) if a["m"] == m]) for m in MS}
        at = lambda m: [p for p in pairs if p["plain"]["m"] == m] if m else pairs  # noqa: E731
        single_s = {m: stats([p["deepspeed"]["s"] for p in at(m)]) for m in MS}
        loss_rel = max(abs(p["deepspeed"]["loss"] / p["plain"]["loss"] - 1) for p in pairs)
        if loss_rel > 1e-4:  # then the two loops would not be timing the same training
            raise SystemExit(f"error: {name}: plain and DeepSpeed losses differ by {loss_rel:.1e} (relative)")
        out[name] = {
            **{k: s[k] for k in ("params", "optimizer", "candidates")}, "method": p0["method"], "cand": cand,
            "single": single_s, "plain": {m: stats([p["plain"]["s"] for p in at(m)]) for m in MS},
            "ratio": {m: stats([p["deepspeed"]["s"] / p["plain"]["s"] for p in at(m)]) for m in [*MS, 0]},
            "ratio_cpu": {m: stats([p["deepspeed"]["cpu"] / p["plain"]["cpu"] for p in at(m)]) for m in [*MS, 0]},
            "frame": {m: [float(np.median([p[k]["s"] - p[k]["parts"]["compute"] for p in at(m)]))
                          for k in ("deepspeed", "plain")] for m in MS},
            "opt_step": [float(np.median([p[k]["parts"]["step"] for p in pairs])) for k in ("deepspeed", "plain")],
            "loss_rel": loss_rel,
            "core": float(np.median([r["cpu"] / r["s"] for r in s["steps"]])),
            "pipe": pipe_s, "eff": {m: single_s[m][0] / pipe_s[m][0] / STAGES for m in MS},
            "ceiling": {m: ceiling(cand["joint"], cand["joint"], m) for m in MS},
            "stage_parts": [{m: med_parts([r for r in p["steps"] if r["m"] == m]) for m in MS} for p in (p0, p1)],
            "crossing_bytes": p0["crossing_bytes"], "ping_pong_s": p0["ping_pong_s"], "peak": [p0["peak"], p1["peak"]],
            "torch": versus_torch(single_s, [p0, p1], [t[name] for t in torch_ranks]),
        }
    return out


def machine(loads: list[str]) -> str:
    """Hardware, load and versions: numbers on a shared 2-core machine mean little without them."""
    import deepspeed

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    return (f"{len(os.sched_getaffinity(0))} CPUs ({cpu}), {mem / 2**20:.0f} GiB RAM, shared by the ranks and with "
            f"other users of this machine (load average {' -> '.join(loads)} at the start, between the launches, at "
            f"the end). Python {platform.python_version()}, torch {torch.__version__}, deepspeed "
            f"{deepspeed.__version__}, gloo backend, OMP_NUM_THREADS=1 per rank")


def table(head: str, rows: list[list[Any]]) -> list[str]:
    """A markdown table; the first column is left-aligned text, the others right-aligned numbers."""
    cols = head.split(" | ")
    return ["| " + head + " |", "|---|" + "---:|" * (len(cols) - 1), *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def report(res: dict, args: argparse.Namespace, command: str, loads: list[str], png: str, minutes: float) -> str:
    """The "## Training step" section of BENCHMARKS.md."""
    ok = lambda good: "PASS" if good else "MISS"  # noqa: E731
    pm = lambda v: f"{v[0]:.3f} ± {v[1] / 2:.3f}"  # noqa: E731
    sl = lambda t: " / ".join(f"{v:.3f}" for v in t)  # noqa: E731
    u, c, opt = MODELS["unet3d"], MODELS["deep_cnn"], next(iter(res.values()))["optimizer"]
    desc = {"unet3d": f"U-Net ({u.levels} levels, widths {u.widths()[0]}-{u.widths()[-1]}, {u.convs_per_level} "
                      "convs per level)", "deep_cnn": f"deep CNN ({c.depth} conv layers, width {c.width})"}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    verdict = ("Targets: engine overhead <= 1.1x (all pairs): " + ", ".join(
        f"{n} {r['ratio'][0][0]:.3f}x {ok(r['ratio'][0][0] <= 1.1)}" for n, r in res.items()) + "; 2-stage "
        "efficiency >= 0.9 x ideal: " + ", ".join(f"{n} {sum(r['eff'][m] >= 0.9 * m / (m + STAGES - 1) for m in MS)}"
                                                  f" of {len(MS)} m PASS" for n, r in res.items()) + ".")
    goals = {"unet3d": {8: 0.80, 4: 0.65}, "deep_cnn": {8: 0.80}}  # E at m, the targets set for 2 stages
    verdict += " E targets: " + ", ".join(f"{n} E = {r['eff'][m]:.2f} at m = {m} (>= {g:.2f}: {ok(r['eff'][m] >= g)})"
                                          for n, r in res.items() for m, g in goals.get(n, {}).items()) + "."
    shares = [r["core"] for r in res.values()] + [p["compute_cpu"] / p["compute"] for r in res.values()
                                                  for sp in r["stage_parts"] for p in sp.values()]
    if min(shares) < 0.9:
        verdict += (f" **Disturbed run**: at times a rank got only {min(shares):.0%} of a core (other processes); "
                    "the tables below say where.")
    lines = [
        SECTION, "", f"Written by `{command}` on {now} ({minutes:.1f} min).  ", f"Machine: {machine(loads)}.", "",
        verdict, "",
        "; ".join(f"{desc[n]}: {r['params'] / 1e6:.2f} M parameters" for n, r in res.items()) + f". Patch "
        f"{'x'.join(map(str, PATCH))}, micro-batch 1, {CLASSES} classes, fp32, `DiceCELoss`, seeded random patches "
        f"and labels (the same for every loop and rank), layers seeded with {SEED}. DeepSpeed runs the shipped "
        f"`ds_configs/pipeline_zero1_cpu_fp32.json` (ZeRO-1; its \"Adam\" with `torch_adam` builds `torch.optim."
        f"{opt}`; WarmupCosineLR; gradient clipping 12; CSV monitor into a temporary folder); m is set per step "
        f"with `engine.set_train_batch_size(m)`. The plain loop: `build_sequential` of the same layers and seed, "
        f"`torch.optim.{opt}` with the same hyper-parameters, `clip_grad_norm_(12)`, the same WarmupCosineLR, the "
        f"same m micro-batches accumulated (loss / m). {args.warmup} warm-up steps, then {args.rounds} timed rounds; "
        f"a round runs every m once, DeepSpeed and plain back to back (taking turns to go first). Times: median ± "
        f"IQR/2, seconds per optimizer step.", "",
        "### Engine overhead: single-stage PipelineEngine vs plain PyTorch (1 rank)", "",
        "Other processes on this machine change the speed of the same work by tens of percent from step to step, so "
        "the ratio is taken within each pair of back-to-back steps (median ± IQR/2 over the pairs; a row of one m "
        f"has {args.rounds} pairs, the *all* row every pair, and it is the one the target is judged on). *CPU "
        "ratio*: the same with the rank's thread CPU time, which time spent descheduled does not inflate. "
        "*framework*: step time minus forward + backward (optimizer, clipping, ZeRO-1 bookkeeping, schedule, "
        "monitor), median ms per step.", "",
        *table("model | m | plain s | DeepSpeed s | DeepSpeed / plain | CPU ratio | framework ms, DeepSpeed / plain | "
               "target <= 1.1x", [[n, m or "all", pm(r["plain"][m]) if m else "", pm(r["single"][m]) if m else "",
                                  pm(r["ratio"][m]), pm(r["ratio_cpu"][m]), f"{r['frame'][m][0] * 1e3:.1f} / "
                                  f"{r['frame'][m][1] * 1e3:.1f}" if m else "", ok(r["ratio"][m][0] <= 1.1)]
                                 for n, r in res.items() for m in [*MS, 0]]), "",
        "Both loops do the same arithmetic: per-step losses agree to a relative " + ", ".join(
            f"{r['loss_rel']:.1e} ({n})" for n, r in res.items()) + ". The rank got " + ", ".join(
            f"{r['core']:.0%} ({n})" for n, r in res.items()) + " of a core (median thread CPU time / wall time).",
        "", "### Two-stage pipeline (2 ranks, one thread each, 1F1B)", "",
        f"Speed-up S(m) = T_single(m) / T_pipe(m): T_single is the single-stage engine above (1 rank, one core, "
        f"same m), T_pipe the slower rank's step; efficiency E = S / p, p = {STAGES}. With balanced stages and free "
        f"communication 1F1B gives E = m / (m + p - 1) (*ideal*). *ceiling* puts the stage times t_s (each stage's "
        f"forward + backward of one micro-batch, alone on one core, back-propagated in one autograd call as "
        f"ds-seg3d's engine does) into the same model: m·t_1 / (p·(Σt + (m - 1)·max t)), t_1 being one unsplit "
        f"micro-batch. Target (ours): E >= 0.9 x ideal. The split is DeepSpeed's `uniform` or `parameters` or "
        f"ds-seg3d's `time` (each layer's forward + backward timed, the slowest stage minimised), whichever has the "
        f"faster slowest stage in one autograd call (*stock DeepSpeed*: the same stages with each output "
        f"back-propagated on its own, as DeepSpeed 0.19.8's engine does):", "",
        *table("model | partition | boundaries | stage s, one autograd call | stock DeepSpeed | max / mean | "
               "chosen", [[n, k, cd["parts"], sl(cd["joint"]), sl(cd["ds"]),
                           f"{max(cd['joint']) / np.mean(cd['joint']):.2f}",
                           "yes" if k == r["method"] else ""] for n, r in res.items()
                          for k, cd in r["candidates"].items()]), "",
        *table("model | m | T_single s | T_pipe s | S | E | ideal | ceiling | E / ideal | target",
               [[n, m, pm(r["single"][m]), pm(r["pipe"][m]), f"{STAGES * r['eff'][m]:.2f}", f"{r['eff'][m]:.2f}",
                 f"{m / (m + STAGES - 1):.2f}", f"{r['ceiling'][m]:.2f}", f"{r['eff'][m] * (m + STAGES - 1) / m:.2f}",
                 ok(r["eff"][m] >= 0.9 * m / (m + STAGES - 1))] for n, r in res.items() for m in MS]), "",
        "Where each rank's step goes (median s per step). *compute*: forward + backward; *core*: the share of a core "
        "the rank's thread got meanwhile (CPU time / wall time); *alone*: m x the stage's time alone; *p2p*: "
        "blocking gloo send/recv, waiting for the other stage included; *step*: ZeRO-1 reduce, the gradient-norm "
        "all-reduce over both stages (clipping: the last stage waits there for the first), optimizer; *other*: "
        "loading, schedule, loss broadcast, monitor.", "",
        *table("model | m | stage | compute | core | alone | p2p | step | other",
               [[n, m, st, f"{p['compute']:.3f}", f"{p['compute_cpu'] / p['compute']:.0%}",
                 f"{m * r['cand']['joint'][st]:.3f}", *(f"{p[k]:.3f}" for k in ("p2p", "step", "other"))]
                for n, r in res.items() for m in MS for st, p in enumerate(sp[m] for sp in r["stage_parts"])]),
        "", "What limits the numbers (from this run):", "", *limits(res), "",
        f"![pipeline efficiency vs micro-batches]({png})", "", *versus_torch_report(res, pm), ""]
    return "\n".join(lines)


def gap_line(name: str, r: dict) -> str:
    """What this run can attribute of the step-time gap to torch 1F1B at the largest m."""
    m = max(MS)
    gap = r["pipe"][m][0] - r["torch"]["1f1b"]["pipe"][m][0]
    sent, opt = m * r["ping_pong_s"], r["opt_step"][0] - r["opt_step"][1]
    per_cpu = [sp[m]["compute_cpu"] / (m * t) for sp, t in zip(r["stage_parts"], r["cand"]["joint"])]
    return (f"- **{name}**: {gap:+.3f} s per step at m = {m} (ds-seg3d {'ahead' if gap <= 0 else 'behind'}). "
            "DeepSpeed's gloo send/recv is blocking (a send returns when the other stage has received) and its "
            "schedule sends a micro-batch's activations only after receiving an earlier one's gradient, where torch "
            f"sends right after the forward pass and batches `isend`/`irecv`: {m} round trips of "
            f"{r['ping_pong_s'] * 1e3:.1f} ms = {sent:.3f} s per step at most on the critical path, and sending "
            "early without blocking did not measurably shorten the step (\"Early, non-blocking sends\" below). "
            f"ZeRO-1's optimizer step costs {opt * 1e3:.1f} ms more than a plain one. The stages' compute in the "
            f"DeepSpeed run took {per_cpu[0]:.2f}x / {per_cpu[1]:.2f}x the CPU time of the stage alone (torch's "
            "compute is not timed apart from its schedule, so any difference there is not attributed).")


def versus_torch_report(res: dict, pm: Any) -> list[str]:
    """The side-by-side subsection: the same model on torch.distributed.pipelining."""
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    r0 = next(iter(res.values()))
    ratios = {n: r["pipe"][max(MS)][0] / r["torch"]["1f1b"]["pipe"][max(MS)][0] for n, r in res.items()}
    lines = [
        "### Side by side with torch.distributed.pipelining (2 ranks)", "",
        "The pipeline a user would pick instead, on the same layers (seeded alike), micro-batches, optimizer "
        f"(`torch.optim.{r0['optimizer']}`, same hyper-parameters), clipping by the global norm over both ranks (12) "
        "and WarmupCosineLR, gradients averaged over the m micro-batches "
        "(`benchmarks/torch_pipelining_ranks.py`): *torch 1F1B* is `PipelineStage` + `Schedule1F1B` on the split "
        "the DeepSpeed run used (`ScheduleGPipe` at m = 1: torch refuses 1F1B with fewer micro-batches than stages, "
        "and with one micro-batch both run one forward and one backward); *torch ZBV* is `ScheduleZBVZeroBubble`, "
        "4 virtual stages, two per rank in a V (rank 0: stages 0 and 3), split by measured layer time ("
        + ", ".join(f"{n} {r['torch']['zbv']['parts']}" for n, r in res.items()) + "), each backward split into "
        "input and weight gradients to fill the bubble; it needs m >= 2, and its stages return copies of outputs "
        "that are views (autograd refuses its in-place detach of a view). torch 1F1B's losses agree with "
        "DeepSpeed's step by step to a relative " + ", ".join(f"{r['torch']['loss_rel']:.1e} ({n})"
                                                               for n, r in res.items())
        + ": both run the same training. T: the slower rank's step, median ± IQR/2; E = T_single / T / p with "
        "the T_single above.", "",
        "Step time at m = 8, ds-seg3d (DeepSpeed engine, one backward per stage) against torch 1F1B: "
        + ", ".join(f"{n} {v:.2f}x ({'at least as fast: PASS' if v <= 1.0 else f'{v - 1:.0%} behind: MISS'})"
                    for n, v in ratios.items()) + ".", "",
        *(gap_line(n, r) for n, r in res.items()), "",
        *table("model | m | ds-seg3d T s | E | torch 1F1B T s | E | torch ZBV T s | E",
               [[n, m, pm(r["pipe"][m]), f"{r['eff'][m]:.2f}", pm(r["torch"]["1f1b"]["pipe"][m]),
                 f"{r['torch']['1f1b']['eff'][m]:.2f}",
                 *((pm(r["torch"]["zbv"]["pipe"][m]), f"{r['torch']['zbv']['eff'][m]:.2f}")
                   if m in r["torch"]["zbv"]["pipe"] else ("n/a", ""))] for n, r in res.items() for m in MS]), "",
        "Peak memory of each rank over one step at m = 8 (live tensor bytes recorded by `torch.profiler`, started "
        "before the model is built, so parameters, gradients, optimizer states, buffers and activations all count; "
        "the method of `bench memory`), MiB:", "",
        *table("model | pipeline | boundaries | rank 0 | rank 1",
               [row for n, r in res.items() for row in (
                   [n, "ds-seg3d (DeepSpeed, ZeRO-1)", r["cand"]["parts"], *map(mib, r["peak"])],
                   *([n, TORCH_NAMES[k], r["torch"][k]["parts"], *map(mib, r["torch"][k]["peak"])]
                     for k in ("1f1b", "zbv")))]), ""]
    return lines


def limits(res: dict) -> list[str]:
    """Where the time goes, in numbers from this run, for every target a model misses or only just meets."""
    out, m = [], max(MS)
    for n, r in res.items():
        f1, f8 = r["frame"][min(MS)], r["frame"][m]
        out.append(f"- **{n}, engine overhead** ({r['ratio'][0][0]:.3f}x wall, {r['ratio_cpu'][0][0]:.3f}x CPU over "
                   f"all pairs): forward + backward is the same work in both loops; the engine adds "
                   f"{(f1[0] - f1[1]) * 1e3:.1f} ms of framework time per step at m = {min(MS)} "
                   f"({(f1[0] - f1[1]) / r['plain'][min(MS)][0]:.1%} of a plain step) and {(f8[0] - f8[1]) * 1e3:.1f} "
                   f"ms at m = {m}. The optimizer step alone (ZeRO-1: gradients into its flat partition, norm, "
                   f"clipping, {r['optimizer']}, parameters copied back) takes {r['opt_step'][0] * 1e3:.1f} ms against "
                   f"{r['opt_step'][1] * 1e3:.1f} ms plain (medians over all steps).")
        s0, s1 = r["stage_parts"][0][m], r["stage_parts"][1][m]
        t, stock = r["cand"]["joint"], r["cand"]["ds"]
        line = (f"- **{n}, pipeline at m = {m}** (E = {r['eff'][m]:.2f}, ideal {m / (m + STAGES - 1):.2f}): the "
                f"{r['method']} split runs its stages in {t[0]:.3f} / {t[1]:.3f} s per micro-batch (alone), which caps "
                f"E at {r['ceiling'][m]:.2f}.")
        if t[0] < 0.95 * stock[0]:
            line += (f" Stage 0 sends {r['cand']['crossing']} tensors (U-Net skips); stock DeepSpeed 0.19.8 "
                     f"back-propagates them one at a time with `retain_graph`, re-traversing the encoder graph they "
                     f"share ({stock[0]:.3f} s for stage 0, ceiling {ceiling(stock, t, m):.2f}); ds-seg3d's engine "
                     f"does one autograd call.")
        share = [sp["compute_cpu"] / sp["compute"] for sp in (s0, s1)]
        per_cpu = [sp["compute_cpu"] / (m * tt) for sp, tt in zip((s0, s1), t)]
        out.append(line + f" The boundary carries {r['crossing_bytes'] / 2**20:.1f} MiB per micro-batch; a gloo "
                   f"round trip (activations out, gradients back, both ranks ready) takes {r['ping_pong_s'] * 1e3:.1f} "
                   f"ms, {r['ping_pong_s'] * m:.3f} s of the {s0['p2p']:.3f} / {s1['p2p']:.3f} s the stages spend in "
                   f"send/recv per step; the rest is waiting for the other stage. Compute took {s0['compute']:.3f} / "
                   f"{s1['compute']:.3f} s against {m * t[0]:.3f} / {m * t[1]:.3f} s alone: the ranks' threads got "
                   f"{share[0]:.0%} / {share[1]:.0%} of a core"
                   + (" (other processes on the 2 shared cores)" if min(share) < 0.9 else "") + " and used "
                   f"{per_cpu[0]:.2f}x / {per_cpu[1]:.2f}x the CPU time of the stage alone"
                   + (" (the same work ran slower per CPU second: caches and memory bandwidth are shared too)."
                      if max(per_cpu) > 1.1 else "."))
    return out


def plot(res: dict, path: Path) -> None:
    """Efficiency vs m: measured, the balance ceiling and the 1F1B ideal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    grid = np.linspace(1, max(MS), 100)
    ax.plot(grid, grid / (grid + STAGES - 1), "k-", label="ideal m / (m + p - 1)")
    for i, (n, r) in enumerate(res.items()):
        ax.plot(MS, [r["eff"][m] for m in MS], "o-", color=f"C{i}", label=f"{n} measured ({r['method']} split)")
        ax.plot(MS, [r["ceiling"][m] for m in MS], "--", color=f"C{i}", alpha=0.6, label=f"{n} ceiling from stage times")
        t = r["torch"]["1f1b"]["eff"]
        ax.plot(list(t), list(t.values()), "x:", color=f"C{i}", label=f"{n} torch.distributed.pipelining 1F1B")
    ax.set(xscale="log", ylim=(0, 1), xlabel="micro-batches per step m", ylabel="efficiency E = S / p",
           title=f"{STAGES}-stage pipeline vs 1 stage, CPU ranks (1 thread each)")
    ax.minorticks_off()
    ax.set_xticks(MS, [str(m) for m in MS])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)




def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (each runs every m once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at m = 1 first")
    p.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "results" / "training_pipeline.png")
    p.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md", help="file that --write-md updates")
    p.add_argument("--write-md", action="store_true", help=f'replace the "{SECTION}" section of --md')
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shown = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/bench_training.py", *map(shlex.quote, shown)])
    common = ["--models", *args.models, "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    steps = (args.warmup + args.rounds * len(MS)) * len(args.models)
    load = lambda: " / ".join(f"{x:.2f}" for x in os.getloadavg())  # noqa: E731
    loads, start = [load()], time.time()
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        work = Path(tmp)
        launch(1, ["--role", "single", *common], work, steps, "1 rank: single stage + plain")
        single = json.loads((work / "single.json").read_text())
        # the method whose slowest stage, in one autograd call as ds-seg3d's engine runs it, is fastest
        methods = [min(c, key=lambda k: max(c[k]["joint"])) for c in (single[n]["candidates"] for n in args.models)]
        loads.append(load())
        launch(STAGES, ["--role", "pipe", *common, "--partitions", *methods], work, steps, "2 ranks: 2-stage pipe")
        pipe = [json.loads((work / f"pipe_rank{r}.json").read_text()) for r in range(STAGES)]
        loads.append(load())
        torch_steps = (2 * args.warmup + args.rounds * (2 * len(MS) - 1)) * len(args.models)  # ZBV: m >= 2
        launch(STAGES, [*common, "--partitions", *methods], work, torch_steps,
               "2 ranks: torch.distributed.pipelining", script=TORCH_RANKS)
        torch_ranks = [json.loads((work / f"torch_rank{r}.json").read_text()) for r in range(STAGES)]
    loads.append(load())
    res = summarise(single, pipe, torch_ranks)
    plot(res, args.png)
    section = report(res, args, command, loads, os.path.relpath(args.png.resolve(), args.md.resolve().parent),
                     (time.time() - start) / 60)
    print(section)
    if args.write_md:
        write_section(args.md, section)
        print(f"wrote {args.md} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
