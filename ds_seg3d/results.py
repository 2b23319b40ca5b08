"""Files people read: written so that no reader ever sees half of one, and results markdown by section.

Every writer here writes under a ``.tmp-`` name and renames only a complete file (``write_files``
renames a whole set together, so a failure leaves neither half-written files nor a mix of old and new
ones). ``replace_section`` rewrites one ``## `` section of a markdown file in place, so several
scripts can each own a section of the same file (BENCHMARKS.md, EXPERIMENTS.md); ``machine()`` says
what the numbers in such a section were measured on.
"""
from __future__ import annotations

import csv
import os
import platform
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any


def machine() -> dict:
    """What the numbers were measured on; the load average says whether others shared the cores."""
    cpu = platform.processor() or "unknown CPU"
    if Path("/proc/cpuinfo").is_file():
        cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name")), cpu)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "ram_gib": round(ram, 1),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            **{p: metadata.version(p) for p in ("torch", "deepspeed")}}


def replace_section(path: Path, heading: str, body: str, intro: str = "") -> None:
    """Replace the lines from ``heading`` to the next ``## `` heading (or the end); append when absent."""
    lines = (path.read_text() if path.exists() else intro).splitlines()
    start = next((i for i, l in enumerate(lines) if l.rstrip() == heading), None)
    new = [heading, "", *body.rstrip("\n").splitlines()]
    if start is None:
        lines = [*lines, "", *new] if lines else new
    else:
        fence, end = False, len(lines)
        for j in range(start + 1, len(lines)):
            fence ^= lines[j].startswith("```")
            if not fence and lines[j].startswith("## "):
                end = j
                break
        lines = [*lines[:start], *new, *([""] + lines[end:] if end < len(lines) else [])]
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv_atomic(path: Path, rows: Sequence[dict], fieldnames: Sequence[str] | None = None) -> None:
    """Rows as CSV under ``fieldnames`` (default: the first row's keys; None and missing values are
    written empty, other keys ignored): temp name, then rename."""
    fields = list(fieldnames if fieldnames is not None else rows[0])
    tmp = path.with_name(".tmp-" + path.name)
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: v for k, v in row.items() if v is not None} for row in rows)
    os.replace(tmp, path)


def save_png(fig: Any, path: Path, dpi: int = 90) -> None:
    """A matplotlib figure as PNG: temp name, then rename, so a reader never sees half a chart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.stem}.png")
    fig.savefig(tmp, dpi=dpi, format="png")
    os.replace(tmp, path)


BENCHMARKS_INTRO = ("# Benchmarks\n\nMeasured numbers; each section names the command that wrote it "
                    "(see benchmarks/README.md).\n")


def write_section(md: Path, section: str, intro: str = BENCHMARKS_INTRO) -> None:
    """Replace the section whose first line (``## Title``) heads ``section``; other sections stay."""
    heading, _, body = section.lstrip("\n").partition("\n")
    replace_section(Path(md), heading.rstrip(), body.lstrip("\n"), intro=intro)


def csv_writer(fields: Sequence[str], rows: Sequence[dict]) -> Callable[[Path], None]:
    """A writer for ``write_files``: ``rows`` as CSV under ``fields``."""
    def write(path: Path) -> None:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(fields))
            w.writeheader()
            w.writerows(rows)
    return write


def write_files(outputs: dict[Path, Callable[[Path], None]]) -> None:
    """Write every output under a temp name, then rename them all; on any failure remove the temps."""
    temps: dict[Path, Path] = {}
    try:
        for path, write in outputs.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temps[path] = path.with_name(".tmp-" + path.name)
            write(temps[path])
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
