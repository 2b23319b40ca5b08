"""``memory.md`` of a sweep: the targets with their verdicts and every rank's predicted and measured peak,
written with the sweep's charts (``write_report``)."""
from __future__ import annotations

from pathlib import Path

from ds_seg3d.memory import charts
from ds_seg3d.memory.checks import (
    MIB,
    MIN_POINTS,
    TOLERANCE_PCT,
    accuracy,
    all_partition_balance,
    budget_networks,
    largest_patch,
    measured_ok,
    number,
    unique_rows,
)
from ds_seg3d.results import write_text_atomic


def _mib(v: float | None) -> str:
    return "–" if v is None else f"{v / MIB:,.1f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def targets_markdown(rows: list[dict], budget: int | None) -> list[str]:
    acc = accuracy(rows)
    lines = ["| target | measured | result |", "|---|---|---|"]
    worst = acc["worst"]
    where = f" (worst: {worst['config']}, rank {worst['rank']}: {float(worst['error_pct']):+.1f} %)" if worst else ""
    lines.append(f"| prediction within ±{TOLERANCE_PCT:.0f} % of the measured per-rank peak, >= {MIN_POINTS} points | "
                 f"{acc['within']} of {acc['rows']} rank peaks on {acc['points']} points; largest error "
                 f"{acc['max_abs_error_pct'] if acc['max_abs_error_pct'] is not None else float('nan'):.1f} %{where}"
                 f"{'; failed points: ' + ', '.join(acc['failed']) if acc['failed'] else ''} | {verdict(acc['pass'])} |")
    for e in all_partition_balance(rows):
        default = e.get("parameters")
        beside = f"; DeepSpeed's default (parameters): {_mib(default['largest'])} MiB" if default else ""
        lines.append(f"| {e['network']}, p = {e['p']}, m = 1: largest stage <= 1.2 x unsplit / p (memory "
                     f"partition) | {_mib(e['memory']['largest'])} MiB vs 1.2 x {_mib(e['unsplit'])} / {e['p']} = "
                     f"{_mib(e['limit'])} MiB{beside} | {verdict(e['pass'])} |")
    if budget is not None:
        for params in budget_networks(rows):
            entries = largest_patch(rows, budget, params)
            text = "; ".join(f"p = {e['p']}: Z = {e['z']} measures {_mib(e['measured'])} MiB, Z = {e['z_next']} "
                             f"{_mib(e['measured_next'])} MiB" for e in entries)
            ok = all(e["pass"] for e in entries) and entries[0]["grows"]
            lines.append(f"| largest trainable patch ({entries[0]['network']}, 128 x 128 x Z) on {budget / MIB:.0f} "
                         f"MiB grows with p as predicted | {text} | {verdict(ok)} |")
    return lines


def rows_markdown(rows: list[dict]) -> list[str]:
    lines = ["| configuration | rank | stage | in-flight | predicted MiB | measured MiB | error % | peak at | held | "
             "pipe buffers | working set | states | buckets | profile leftover |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in unique_rows(rows):
        err = number(r, "error_pct")
        states = sum(number(r, k) or 0 for k in ("pred_params_bytes", "pred_grads_bytes", "pred_optimizer_bytes"))
        status = "" if measured_ok(r) else f" ({r['status']})"
        lines.append(
            f"| {r['config']}{status} | {r['rank']} | {r['stage']} | {r.get('in_flight', '')} | "
            f"{_mib(number(r, 'predicted_peak_bytes'))} | {_mib(number(r, 'measured_peak_bytes'))} | "
            f"{'' if err is None else f'{err:+.1f}'} | {r.get('predicted_phase', '')} | "
            f"{_mib(number(r, 'pred_held_bytes'))} | {_mib(number(r, 'pred_pipe_buffers_bytes'))} | "
            f"{_mib(number(r, 'pred_working_bytes'))} | {states / MIB:,.2f} | {_mib(number(r, 'pred_buckets_bytes'))} | "
            f"{_mib(number(r, 'pred_profile_leftover_bytes'))} |")
    return lines


def methods(rows: list[dict]) -> str:
    return ", ".join(sorted({r["method"] for r in rows if r.get("method")})) or "none"


def write_report(rows: list[dict], out: Path, budget: int | None = None) -> None:
    """``memory.md`` and ``memory.png`` (plus the partition and budget charts when the sweep has them)."""
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Memory sweep", "", f"Measured with: {methods(rows)} (per rank, one training step after a warm-up step).",
          "", *targets_markdown(rows, budget), "", *rows_markdown(rows), ""]
    write_text_atomic(out / "memory.md", "\n".join(md))
    charts.plot_sweep(rows, out / "memory.png")
    if all_partition_balance(rows):
        charts.plot_partition(rows, out / "memory_partition.png")
    if budget is not None and budget_networks(rows):
        charts.plot_budget(rows, budget, out / "memory_budget.png")
