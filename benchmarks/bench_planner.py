"""How long ``ds-seg3d plan`` takes, and whether its fast path predicts what replaying every stage does.

1. The README's example, ``ds-seg3d plan --budget-gb 40 --ranks 8 --patch 128 128 128`` (112 layouts of the
   default U-Net over 8 ranks), run ``--repeats`` times as a user runs it: wall clock per run, and whether
   anything but the progress bar reached stderr.
2. The same layouts predicted in one process both ways the planner knows: every stage traced on the meta
   device at the full patch with kernel workspaces measured on two slabs (the CPU default), and every
   stage replayed with real kernels on the two slabs and extrapolated in Z (the GPU method); the time of
   each and the largest difference between their per-layout peaks.

``--write-md`` replaces the "Planner speed" section of BENCHMARKS.md. Run on a quiet machine::

    OMP_NUM_THREADS=1 python benchmarks/bench_planner.py --write-md
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from ds_seg3d.results import machine, write_section  # noqa: E402

SECTION = "## Planner speed"
EXAMPLE = ["plan", "--budget-gb", "40", "--ranks", "8", "--patch", "128", "128", "128"]


def time_command(repeats: int) -> tuple[list[float], list[str]]:
    """Wall clock of each run of the README's example, and the stderr lines that are not its progress bar."""
    times, noise = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ds_seg3d", *EXAMPLE], capture_output=True, text=True,
                              cwd=ROOT, check=False)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"ds-seg3d {' '.join(EXAMPLE)} failed: {proc.stderr[-500:]}")
        noise += [line for line in proc.stderr.replace("\r", "\n").splitlines()
                  if line.strip() and not line.startswith("predicting:")]
    return times, noise


def compare_methods() -> dict:
    """Every layout of the example predicted by tracing and by slab replays: seconds and largest difference."""
    import torch

    from ds_seg3d.memory.planner import candidates
    from ds_seg3d.memory.prediction import MemoryModel
    from ds_seg3d.memory.spec import RunSpec, shipped_bucket

    base = RunSpec(model="unet3d", patch=(128, 128, 128), ranks=8, bucket=shipped_bucket())
    specs = candidates(base, [1, 2, 4, 8], [1, 2, 4, 8], [0, 1], ["memory", "parameters"], [1, 0])
    out: dict = {"layouts": len(specs)}
    peaks = {}
    for name, traced in (("traced", True), ("replayed", False)):
        torch.manual_seed(0)
        start = time.perf_counter()
        model = MemoryModel(base, "cpu", traced=traced)
        peaks[name] = [model.predict(spec).max_peak for spec in specs]
        out[f"{name}_s"] = time.perf_counter() - start
        out[f"{name}_stages"] = model.calibrator.replays
    diffs = [abs(a - b) / b for a, b in zip(peaks["traced"], peaks["replayed"])]
    out["max_diff_pct"] = 100 * max(diffs)
    out["median_diff_pct"] = 100 * statistics.median(diffs)
    return out


def section(times: list[float], noise: list[str], cmp: dict | None, command: str) -> str:
    m = machine()
    lines = [SECTION, "", "```", command, "```", "",
             f"Machine: {m['nproc']} CPUs ({m['cpu']}), load average {m['load_avg'][0]} at the end; torch "
             f"{m['torch']}, deepspeed {m['deepspeed']}. Date: {datetime.date.today().isoformat()}.", "",
             f"- `ds-seg3d {' '.join(EXAMPLE)}` (the README's example): {len(times)} runs, wall clock median "
             f"{statistics.median(times):.1f} s (min {min(times):.1f}, max {max(times):.1f}); "
             + ("stderr held only the progress bar." if not noise else
                f"stderr also held {len(noise)} other line(s), e.g. `{noise[0][:120]}`.")]
    if cmp is not None:
        lines += [f"- The same {cmp['layouts']} layouts in one process: traced on the meta device "
                  f"{cmp['traced_s']:.1f} s ({cmp['traced_stages']} stage traces, kernel workspaces measured once), "
                  f"replayed with real kernels on slabs {cmp['replayed_s']:.1f} s ({cmp['replayed_stages']} stage "
                  f"replays); their largest-rank peaks differ by at most {cmp['max_diff_pct']:.2f} % (median "
                  f"{cmp['median_diff_pct']:.2f} %). Both are checked against measured peaks by `bench memory` "
                  "(\"Memory scaling\")."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of the README's example (default 3)")
    p.add_argument("--no-compare", action="store_true", help="skip the traced-vs-replayed comparison (minutes)")
    p.add_argument("--write-md", nargs="?", const=ROOT / "BENCHMARKS.md", type=Path, help="BENCHMARKS.md to update")
    args = p.parse_args(argv)
    times, noise = time_command(args.repeats)
    cmp = None if args.no_compare else compare_methods()
    command = "OMP_NUM_THREADS=1 python benchmarks/bench_planner.py" + (" --no-compare" if args.no_compare else "") \
        + (f" --repeats {args.repeats}" if args.repeats != 3 else "") + (" --write-md" if args.write_md else "")
    text = section(times, noise, cmp, command)
    print(text)
    if args.write_md:
        write_section(args.write_md, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
