"""Per-rank peaks of two ``bench memory`` sweeps of the same points, side by side: what a change to the engine did.

    python benchmarks/compare_memory_sweeps.py BEFORE/sweep/memory.csv AFTER/sweep/memory.csv \\
        --before-label "DeepSpeed's receive path" --after-label "one copy" --write-md

Rows are matched by point (the ``config`` column) and rank; points measured in only one sweep, or whose
measured stage boundaries differ (a cost-model change can move a split), are left out and counted. The section says, per model and for stage 0 and the receiving stages apart, how the
measured peaks moved, lists every point whose peak moved by more than 1 %, and how far the planner's
predictions are from the new measurements (the +-10 % target of ``bench memory``).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import shlex
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from ds_seg3d.results import write_section  # noqa: E402

SECTION = "## Fewer copies of received tensors"


def read(path: Path) -> dict[tuple[str, int], dict[str, str]]:
    """``(config, rank) -> row`` of the points measured without error."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise SystemExit(f"error: {path}: {e.strerror}") from None
    need = {"config", "rank", "stage", "status", "measured_peak_bytes", "predicted_peak_bytes", "error_pct", "model"}
    if not rows or not need <= set(rows[0]):
        raise SystemExit(f"error: {path}: not a bench memory sweep CSV (needs columns {', '.join(sorted(need))})")
    return {(r["config"], int(r["rank"])): r for r in rows if r["status"] == "ok"}


def compare(before: dict, after: dict) -> list[dict]:
    """One record per (point, rank) measured in both sweeps."""
    out = []
    for key in sorted(before.keys() & after.keys()):
        b, a = before[key], after[key]
        if b.get("measured_boundaries") != a.get("measured_boundaries"):
            continue  # the split moved: a different stage, not the same one measured twice
        mb, ma = int(b["measured_peak_bytes"]), int(a["measured_peak_bytes"])
        out.append({"config": key[0], "rank": key[1], "stage": int(a["stage"]), "model": a["model"],
                    "stages": int(a.get("stages") or 1), "before": mb, "after": ma, "change": ma / mb - 1,
                    "error_after": float(a["error_pct"])})
    return out


def report(rows: list[dict], args: argparse.Namespace, left_out: int, split_moved: int = 0) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    pct = lambda v: f"{100 * v:+.1f} %"  # noqa: E731
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shown = shlex.join(sys.argv[1:]) if len(sys.argv) > 1 else f"{args.before} {args.after}"
    worst = max(rows, key=lambda r: abs(r["error_after"]))
    within = sum(abs(r["error_after"]) <= 10 for r in rows)
    lines = [SECTION, "", f"Written by `python benchmarks/compare_memory_sweeps.py {shown}` on {now}.", "",
             f"The same `bench memory` points measured twice on this machine: *before* with {args.before_label}, "
             f"*after* with {args.after_label}; {len(rows)} rank peaks in both sweeps"
             + (f" ({left_out} measured in only one, left out)" if left_out else "")
             + (f"; {split_moved} more whose stage boundaries differ between the sweeps are left out too (a "
                "different stage, not the same one measured twice)" if split_moved else "") + ". A pipeline's stage 0 "
             "receives nothing; the other stages receive the tensors the stage before sends (a U-Net's skips).", "",
             "| model | ranks | count | median change | largest fall | largest rise |", "|---|---|---:|---:|---:|---:|"]
    for model in sorted({r["model"] for r in rows}):
        for label, pick in (("stage 0", lambda r: r["stage"] == 0 and r["stages"] > 1),
                            ("receiving (stage > 0)", lambda r: r["stage"] > 0),
                            ("1 stage (no pipeline)", lambda r: r["stages"] == 1)):
            sel = [r["change"] for r in rows if r["model"] == model and pick(r)]
            if sel:
                lines.append(f"| {model} | {label} | {len(sel)} | {pct(float(np.median(sel)))} | {pct(min(sel))} | "
                             f"{pct(max(sel))} |")
    moved = [r for r in rows if abs(r["change"]) > 0.01]
    lines += ["", f"Planner against the *after* peaks: {within} of {len(rows)} within ±10 % (largest error "
              f"{worst['error_after']:+.1f} %, {worst['config']}, rank {worst['rank']}).", "",
              f"Every rank peak that moved by more than 1 % ({len(moved)}):", "",
              "| point | rank | stage | before MiB | after MiB | change | planner error after |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['config']} | {r['rank']} | {r['stage']} | {mib(r['before'])} | {mib(r['after'])} | "
              f"{pct(r['change'])} | {r['error_after']:+.1f} % |" for r in sorted(moved, key=lambda r: r["change"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path, help="memory.csv of the earlier sweep")
    p.add_argument("after", type=Path, help="memory.csv of the later sweep")
    p.add_argument("--before-label", default="the earlier code")
    p.add_argument("--after-label", default="the later code")
    p.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md", help="file that --write-md updates")
    p.add_argument("--write-md", action="store_true", help=f'replace the "{SECTION}" section of --md')
    args = p.parse_args(argv)
    before, after = read(args.before), read(args.after)
    rows = compare(before, after)
    if not rows:
        raise SystemExit(f"error: {args.before} and {args.after} share no measured point")
    moved = len(before.keys() & after.keys()) - len(rows)
    section = report(rows, args, len(before.keys() ^ after.keys()), moved)
    print(section)
    if args.write_md:
        write_section(args.md, section)
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
