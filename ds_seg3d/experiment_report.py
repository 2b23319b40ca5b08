"""The markdown an experiment writes: per-case table, a verdict sentence and its section."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ds_seg3d.config import load_config

if TYPE_CHECKING:
    from ds_seg3d.experiment import Comparison

REPO_ROOT = Path(__file__).resolve().parent.parent


def markdown_table(rows: list[dict], arms: list[str]) -> str:
    """Per case Dice and signed volume error per arm; mean, median (of absolute errors for volumes) and
    the cases under 5 % volume error."""
    one_label = len({r["label"] for r in rows}) <= 1
    by = {(r["arm"], r["case"] if one_label else f"{r['case']} {r['label']}"): r for r in rows}
    keys = list(dict.fromkeys(k for _, k in by))
    lines = ["| case | " + " | ".join([f"Dice {a}" for a in arms] + [f"volume error % {a}" for a in arms]) + " |",
             "|---" * (1 + 2 * len(arms)) + "|"]
    cell = lambda a, k, f, fmt: format(float(by[(a, k)][f]), fmt) if (a, k) in by else "-"
    for k in keys:
        lines.append(f"| {k} | " + " | ".join([cell(a, k, "dice", ".3f") for a in arms]
                                             + [cell(a, k, "volume_error_pct", "+.1f") for a in arms]) + " |")
    dice = {a: np.array([float(r["dice"]) for r in rows if r["arm"] == a]) for a in arms}
    err = {a: np.abs([float(r["volume_error_pct"]) for r in rows if r["arm"] == a]) for a in arms}
    for name, f in (("mean", np.nanmean), ("median", np.nanmedian)):
        lines.append(f"| **{name}** (volume: of absolute errors) | " + " | ".join(
            [f"{f(dice[a]):.3f}" for a in arms] + [f"{f(err[a]):.1f}" for a in arms]) + " |")
    lines.append("| **cases under 5 % volume error** | " + " | ".join(
        [""] * len(arms) + [f"{int(np.sum(err[a] < 5))}/{len(err[a])}" for a in arms]) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict], reference: str, variant: str) -> str:
    """One honest sentence: the paired Dice difference against its own case-to-case spread."""
    by = {(r["arm"], r["case"], r["label"]): (float(r["dice"]), float(r["volume_error_pct"])) for r in rows}
    pairs = [(*by[(reference, c, l)], *v) for (a, c, l), v in by.items() if a == variant and (reference, c, l) in by]
    if not pairs:
        return f"No comparison: {reference} or {variant} produced no scores (see the arms' status above)."
    ref, ref_err, var, var_err = np.array(pairs).T
    d, n = var - ref, len(pairs)
    text = (f"On {n} test case(s), {variant} vs {reference}: mean Dice {var.mean():.3f} vs {ref.mean():.3f} "
            f"(difference {d.mean():+.3f}, {variant} higher on {int((d > 0).sum())} of {n}), mean volume error "
            f"{np.nanmean(var_err):+.1f} % vs {np.nanmean(ref_err):+.1f} % (signed; absolute "
            f"{np.nanmean(np.abs(var_err)):.1f} % vs {np.nanmean(np.abs(ref_err)):.1f} %); ")
    if n < 3:
        return text + "too few cases to tell an effect from case-to-case variation."
    se = float(d.std(ddof=1) / np.sqrt(n))
    if abs(d.mean()) <= 2 * se:
        return text + (f"that is within twice the standard error of the paired differences ({2 * se:.3f}), "
                       "so this run shows no measurable effect.")
    better = "raised" if d.mean() > 0 else "lowered"
    return text + (f"beyond twice the standard error of the paired differences ({2 * se:.3f}): here {variant} "
                   f"{better} Dice, a single-seed result to be repeated before it is trusted.")


def section(c: Comparison, summary: dict, rows: list[dict]) -> str:
    """The markdown under the comparison's heading: question, command, set-up, machine, table, verdict."""
    s, m = summary["settings"], summary["machine"]
    cfg = load_config(REPO_ROOT / c.config, list(s["overrides"]))
    splits = ", ".join(f"{v} {k}" for k, v in summary["splits"].items())
    arms_ok = [r["arm"] for r in summary["arms"] if r["status"] == "ok"]
    layout = (f"the hostfile's ranks as {s['stages']} pipeline stages x data parallel" if s["hostfile"] else
              f"{s['ranks']} ranks = {s['stages']} pipeline stages x {s['ranks'] // s['stages']} data-parallel")
    out = [c.question, "", "```", summary["command"], "```", "",
           f"- Data: {s['cases']} `{c.task}` phantoms (seed {s['seed']}; {splits}), shards at "
           f"{' x '.join(map(str, c.spacing))} mm; patch {' x '.join(map(str, cfg.data.patch))}; model "
           f"`{cfg.model.name}` {json.dumps(cfg.model.params)}.",
           f"- Training: {s['steps']} steps, {layout}; DeepSpeed `{Path(s['deepspeed_config']).name}` "
           f"(discriminator `{Path(s['discriminator_config']).name}`); seed {s['seed']}.",
           f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, load average "
           f"{m['load_avg'][0]} at the start (shared machine); Python {m['python']}, torch {m['torch']}, "
           f"deepspeed {m['deepspeed']}. Date: {summary['started']}. Wall clock: {summary['minutes']} min in all."]
    for r in summary["arms"]:
        secs = ", ".join(f"{k} {v / 60:.1f} min" for k, v in r["seconds"].items())
        t = dict(r.get("training", {}))
        val = ", ".join(f"{k} {v:.3f}" for k, v in t.pop("val_dice", {}).items())
        ends = ", ".join(f"{k} {v:.3f}" for k, v in t.items())
        out.append(f"- Arm `{r['arm']}` ({r['description']}): {r['status']}; {secs} (load average "
                   f"{r['load_avg_15min']} over the 15 min before it ended); end of training (mean of the last 5 "
                   f"logged steps; loss = the arm's whole objective): {ends or '-'}; validation Dice with the "
                   f"final weights {val or '-'}.")
    out += ["", markdown_table(rows, arms_ok), "", verdict(rows, c.arms[0].name, c.arms[-1].name), "", c.caveat,
            "", "### At a larger scale (GPU cluster): settings, not results", "", c.scale_up]
    return "\n".join(out) + "\n"
