"""PNG charts of a memory sweep: predicted beside measured per stage, partitions, patch on a budget."""
from __future__ import annotations

from pathlib import Path

from ds_seg3d.memory.checks import (
    MIB,
    all_partition_balance,
    budget_networks,
    by_config,
    largest_patch,
    measured_ok,
    number,
    unique_rows,
)
from ds_seg3d.results import save_png


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt





def short_label(row: dict) -> str:
    """A tick label: network, patch depth and the engine layout, without the network's full parameters."""
    import json

    params = json.loads(row["params"]) if row.get("params") else {}
    net = "U-Net" if row["model"] == "unet3d" else f"CNN{params.get('depth', '')}w{params.get('width', '')}"
    parts = [net, "Z" + row["patch"].split("x")[-1]]
    if str(row["plain"]) == "True":
        parts.append(f"plain ZeRO-{row['zero']} dp{row['dp']}")
    else:
        parts.append(f"p{row['stages']} m{row['micro_batches']} {row['partition'][:5]} Z{row['zero']}")
        if str(row["dp"]) != "1":
            parts.append(f"dp{row['dp']}")
    if str(row["checkpoint"]) not in ("0", ""):
        parts.append(f"ckpt{row['checkpoint']}")
    if row["precision"] != "fp32":
        parts.append(row["precision"])
    if "bucket=" in row["config"]:
        parts.append("5e8 bucket")
    return " ".join(parts)


def plot_sweep(rows: list[dict], path: Path) -> None:
    """Per configuration, one pair of bars per rank: predicted (hatched) beside measured (solid)."""
    plt = _pyplot()
    configs = by_config(unique_rows(rows))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * len(configs) + 3), 6.5))
    x, ticks, labels = 0.0, [], []
    width = 0.38
    for name, config_rows in configs.items():
        config_rows = sorted(config_rows, key=lambda r: int(r["rank"]))
        start = x
        for r in config_rows:
            color = f"C{int(r['stage'])}"
            pred, meas = number(r, "predicted_peak_bytes"), number(r, "measured_peak_bytes") if measured_ok(r) else None
            if pred is not None:
                ax.bar(x, pred / MIB, width, color=color, alpha=0.45, hatch="//", edgecolor=color)
            if meas is not None:
                ax.bar(x + width, meas / MIB, width, color=color)
            else:
                ax.text(x + width, 1, "failed", rotation=90, fontsize=6, ha="center", va="bottom")
            x += 2 * width + 0.08
        ticks.append((start + x - 0.08) / 2 - width / 2)
        labels.append(short_label(config_rows[0]))
        x += 0.6
    ax.set_xticks(ticks, labels, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("peak per rank, MiB (log scale)")
    ax.set_title("Per-stage peak of a training step: predicted (hatched) beside measured (solid); colour = stage",
                 fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{s}") for s in range(4)]
    ax.legend(handles, [f"stage {s}" for s in range(4)], fontsize=7, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def plot_partition(rows: list[dict], path: Path) -> None:
    """m = 1: measured peak of every stage, memory partition beside DeepSpeed's default, with the 1.2 x U / p line."""
    plt = _pyplot()
    entries = all_partition_balance(rows)
    cols = min(4, len(entries))
    nrows = -(-len(entries) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols + 1, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(entries):]:
        ax.set_visible(False)
    for ax, e in zip(axes.flat, entries):
        for i, method in enumerate(("memory", "parameters")):
            if method not in e:
                continue
            stages = e[method]["stages"]
            xs = [s + (i - 0.5) * 0.38 for s in range(len(stages))]
            ax.bar(xs, [v / MIB for v in stages], 0.36, color=f"C{i}", label=f"{method} {e[method]['boundaries']}")
            ax.plot(xs, [v / MIB for v in e[method]["predicted"]], "k_", markersize=12)
        ax.axhline(e["limit"] / MIB, color="k", ls="--", lw=1, label="1.2 x unsplit / p")
        ax.axhline(e["unsplit"] / MIB, color="grey", ls=":", lw=1, label="unsplit")
        ax.set_title(f"{e['network']}\np = {e['p']}, m = 1", fontsize=8)
        ax.set(xlabel="stage", ylabel="measured peak, MiB")
        ax.set_xticks(range(e["p"]))
        ax.legend(fontsize=6)
    fig.suptitle("Measured per-stage peaks (bars) and predictions (black ticks)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def plot_budget(rows: list[dict], budget: int, path: Path) -> None:
    """Largest patch Z on a budget per stage count: predicted and measured peak at Z and the next Z,
    one panel per network of the check."""
    plt = _pyplot()
    nets = budget_networks(rows)
    fig, axes = plt.subplots(1, len(nets), figsize=(6.2 * len(nets), 3.8), squeeze=False)
    for ax, params in zip(axes[0], nets):
        entries = largest_patch(rows, budget, params)
        for i, e in enumerate(entries):
            zs = [e["z"], e["z_next"]]
            ax.plot(zs, [v / MIB if v else float("nan") for v in (e["predicted"], e["predicted_next"])], "--",
                    color=f"C{i}", label=f"p = {e['p']} predicted")
            ax.plot(zs, [v / MIB if v else float("nan") for v in (e["measured"], e["measured_next"])], "o",
                    color=f"C{i}", label=f"p = {e['p']} measured (largest Z that fits: {e['z']})")
        ax.axhline(budget / MIB, color="k", lw=1, label=f"budget {budget / MIB:.0f} MiB")
        ax.set(xlabel="patch Z (X = Y = 128)", ylabel="largest rank peak, MiB")
        ax.set_title(f"{entries[0]['network']}: largest patch on {budget / MIB:.0f} MiB per rank\n"
                     "(m = 1, memory partition)", fontsize=8)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def plot_depth(curve: list[dict], measured: list[dict], path: Path, limit: float) -> None:
    """Largest stage / (unsplit / p) against network depth: the planner's curve per p and partition
    (lines), the sweep's measured points (markers) and the target (dashed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, p in enumerate(sorted({c["p"] for c in curve})):
        for method, style in (("memory", "-"), ("parameters", ":")):
            pts = sorted((c["depth"], c["ratio"]) for c in curve if c["p"] == p and c["partition"] == method)
            ax.plot([d for d, _ in pts], [r for _, r in pts], style, color=f"C{i}",
                    label=f"p = {p}, {method} partition (planner)")
        for m in measured:
            if m["p"] == p:
                marker = "o" if m["partition"] == "memory" else "x"
                ax.plot(m["depth"], m["ratio"], marker, color=f"C{i}", markersize=7)
    ax.axhline(limit, color="k", ls="--", lw=1, label=f"target {limit:g}")
    ax.plot([], [], "ko", label="measured, memory partition")
    ax.plot([], [], "kx", label="measured, parameters partition")
    ax.set(xlabel="deep CNN depth (conv layers, width 8, patch 128 x 128 x 16)",
           ylabel="largest stage / (unsplit / p)",
           title="How evenly a pipeline divides memory, m = 1")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
