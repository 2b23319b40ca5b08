"""The sweep's checks, computed from its CSV rows alone: planner accuracy, partition balance, largest patch.

``ds-seg3d bench memory`` (``memory.md``, the charts) and ``benchmarks/bench_memory.py`` (the "Memory
scaling" section of BENCHMARKS.md) read the same functions, so both always show one table's numbers.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

MIB = 2**20
TOLERANCE_PCT = 10.0
MIN_POINTS = 12
BALANCE = 1.2


def number(row: dict, key: str) -> float | None:
    value = row.get(key)
    if value in (None, ""):
        return None
    return float(value)


def measured_ok(row: dict) -> bool:
    return str(row.get("status", "")).startswith("ok") and number(row, "measured_peak_bytes") is not None


def by_config(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        out[row["config"]].append(row)
    return dict(out)


def unique_rows(rows: list[dict]) -> list[dict]:
    """One row per (configuration, rank): a configuration that serves two checks (a partition point
    that is also a largest-patch point) is measured once but listed under both groups."""
    seen: set[tuple[str, str]] = set()
    out = []
    for r in rows:
        key = (r["config"], str(r["rank"]))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _point_peak(rows: list[dict], key: str) -> float | None:
    values = [number(r, key) for r in rows]
    return None if any(v is None for v in values) or not values else max(values)


def _find(rows: list[dict], **match: Any) -> list[dict]:
    """Rows of the single configuration whose columns equal ``match`` (as strings)."""
    found = by_config([r for r in rows if all(str(r.get(k)) == str(v) for k, v in match.items())])
    return next(iter(found.values())) if len(found) == 1 else []


def accuracy(rows: list[dict]) -> dict[str, Any]:
    """Prediction within +-10 % of the measured peak on every rank of every measured point."""
    measured = [r for r in unique_rows(rows) if measured_ok(r) and number(r, "predicted_peak_bytes")]
    configs = by_config(measured)
    errors = [abs(number(r, "error_pct")) for r in measured]
    failed = sorted({r["config"] for r in rows if not measured_ok(r)})
    worst = max(measured, key=lambda r: abs(number(r, "error_pct")), default=None)
    return {"points": len(configs), "rows": len(measured), "within": sum(e <= TOLERANCE_PCT for e in errors),
            "max_abs_error_pct": max(errors, default=None), "worst": worst, "failed": failed,
            "pass": bool(errors) and max(errors) <= TOLERANCE_PCT and len(configs) >= MIN_POINTS}


def network_label(model: str, params: str | dict) -> str:
    """``deep_cnn(depth=25,width=8)``: the network part of a configuration label."""
    import json

    values = json.loads(params) if isinstance(params, str) else dict(params)
    return f"{model}({','.join(f'{k}={v}' for k, v in sorted(values.items()))})"


def networks(rows: list[dict], group: str = "scaling") -> list[tuple[str, str]]:
    """(model, params) of every network with rows in ``group``, in the order they first appear."""
    seen: dict[tuple[str, str], None] = {}
    for r in rows:
        if r.get("group") == group:
            seen.setdefault((r["model"], r["params"]), None)
    return list(seen)


def partition_balance(rows: list[dict], model: str = "unet3d", params: str | None = None) -> list[dict[str, Any]]:
    """m = 1: largest stage's measured peak against the unsplit peak / p, memory vs DeepSpeed's default.

    ``params`` picks one network of ``model`` (the CSV's JSON); without it the model must have one."""
    common = dict(model=model, micro_batches=1, checkpoint=0, zero=1, precision="fp32", plain=False, group="scaling")
    if params is not None:
        common["params"] = params
    unsplit = _find(rows, stages=1, **common)
    if not unsplit or not all(measured_ok(r) for r in unsplit):
        return []
    u = _point_peak(unsplit, "measured_peak_bytes")
    net = network_label(model, unsplit[0]["params"])
    out = []
    mine = [r for r in rows if r["model"] == model and (params is None or r["params"] == params)]
    for p in sorted({int(r["stages"]) for r in mine if int(r["stages"]) > 1}):
        entry: dict[str, Any] = {"model": model, "network": net, "params": unsplit[0]["params"], "p": p,
                                 "unsplit": u, "limit": BALANCE * u / p}
        for method in ("memory", "parameters"):
            pts = _find(rows, stages=p, ranks=p, partition=method, **common)
            if pts and all(measured_ok(r) for r in pts):
                entry[method] = {
                    "largest": _point_peak(pts, "measured_peak_bytes"),
                    "stages": [number(r, "measured_peak_bytes") for r in sorted(pts, key=lambda r: int(r["rank"]))],
                    "predicted": [number(r, "predicted_peak_bytes") for r in sorted(pts, key=lambda r: int(r["rank"]))],
                    "boundaries": pts[0].get("measured_boundaries") or pts[0].get("boundaries"),
                }
        if "memory" in entry:
            entry["pass"] = entry["memory"]["largest"] <= entry["limit"]
            out.append(entry)
    return out


def all_partition_balance(rows: list[dict]) -> list[dict[str, Any]]:
    """``partition_balance`` of every network in the sweep."""
    return [e for model, params in networks(rows) for e in partition_balance(rows, model, params)]


def largest_patch(rows: list[dict], budget: int, params: str | None = None) -> list[dict[str, Any]]:
    """Per p: the planner's largest Z measured under the budget, and the next Z measured over it
    (``params``: one network of the budget check, by default the first)."""
    budget_rows = [r for r in rows if r.get("group") == "budget"]
    if params is None and budget_rows:
        params = budget_rows[0]["params"]
    mine = [r for r in budget_rows if r["params"] == params]
    pts = by_config(mine)
    per_p: dict[int, list[tuple[int, float | None, float | None]]] = defaultdict(list)
    for config_rows in pts.values():
        r0 = config_rows[0]
        z = int(r0["patch"].split("x")[-1])
        meas = _point_peak(config_rows, "measured_peak_bytes") if all(measured_ok(r) for r in config_rows) else None
        per_p[int(r0["stages"])].append((z, _point_peak(config_rows, "predicted_peak_bytes"), meas))
    out = []
    for p, entries in sorted(per_p.items()):
        entries.sort()
        (z_fit, pred_fit, meas_fit), (z_next, pred_next, meas_next) = entries[0], entries[-1]
        out.append({"p": p, "z": z_fit, "predicted": pred_fit, "measured": meas_fit, "z_next": z_next,
                    "predicted_next": pred_next, "measured_next": meas_next, "params": params,
                    "network": network_label(mine[0]["model"], params),
                    "pass": meas_fit is not None and meas_next is not None and meas_fit <= budget < meas_next})
    grows = all(a["z"] < b["z"] for a, b in zip(out, out[1:]))
    for entry in out:
        entry["grows"] = grows
    return out


def budget_networks(rows: list[dict]) -> list[str]:
    """The params (JSON) of every network in the largest-patch check."""
    return [params for _, params in networks(rows, group="budget")]
