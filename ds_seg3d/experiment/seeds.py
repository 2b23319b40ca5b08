"""A comparison repeated over seeds: which seeds are done, and the spread over them in one section.

``ds-seg3d experiment NAME --seeds 0 1 2`` runs the comparison once per seed in ``OUT/seed<k>`` (each seed
draws its own phantoms, split and training; see ``run.run_seeds``) and renders here: per seed the mean
Dice, mean |volume error| and the share of cases under 5 % of every arm, their mean and standard
deviation over seeds, on how many seeds the last arm beat the first, and the comparison's target on
the test cases of all seeds together.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from ds_seg3d.experiment.markdown import publish, reframe_text, section
from ds_seg3d.experiment.spec import Comparison, Settings


def finished(folder: Path, c: Comparison, s: Settings) -> bool:
    """Whether ``folder`` holds this comparison, finished with every arm ok, under exactly these settings."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    saved = summary.get("settings", {})
    wanted = json.loads(json.dumps(dataclasses.asdict(s)))
    return (summary.get("comparison") == c.name and saved == wanted
            and all(a.get("status") == "ok" for a in summary.get("arms", [])) and (folder / "results.csv").is_file())


def _load(folder: Path) -> tuple[dict, list[dict]]:
    try:
        summary = json.loads((folder / "summary.json").read_text())
        with open(folder / "results.csv", newline="") as fh:
            return summary, list(csv.DictReader(fh))
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: no finished comparison to report ({e})") from None


def _stats(rows: list[dict], arm: str, label: str) -> dict[str, float]:
    mine = [r for r in rows if r["arm"] == arm and r["label"] == label]
    dice = np.array([float(r["dice"]) for r in mine])
    err = np.array([float(r["volume_error_pct"]) for r in mine])
    finite = err[np.isfinite(err)]
    return {"n": len(mine), "dice": float(dice.mean()) if len(dice) else float("nan"),
            "abs_err": float(np.abs(finite).mean()) if len(finite) else float("nan"),
            "signed_err": float(finite.mean()) if len(finite) else float("nan"),
            "under5": float(np.mean(np.abs(err) < 5)) if len(err) else float("nan")}


def spread_table(c: Comparison, runs: dict[int, tuple[dict, list[dict]]]) -> list[str]:
    """Per label: a row per seed and the mean +- standard deviation over seeds of each arm's numbers."""
    arms = [a.name for a in c.arms]
    labels = list(dict.fromkeys(r["label"] for _, rows in runs.values() for r in rows))
    lines = []
    for label in labels:
        head = [f"Dice {a}" for a in arms] + [f"|volume error| % {a}" for a in arms] + \
               [f"signed volume error % {a}" for a in arms] + [f"cases < 5 % {a}" for a in arms]
        if len(labels) > 1:
            lines.append(f"{label}:")
            lines.append("")
        lines += ["| seed | test cases | " + " | ".join(head) + " |", "|---" * (2 + len(head)) + "|"]
        per_seed: dict[str, list[dict]] = {a: [] for a in arms}
        for seed, (_, rows) in runs.items():
            stats = {a: _stats(rows, a, label) for a in arms}
            for a in arms:
                per_seed[a].append(stats[a])
            cells = ([f"{stats[a]['dice']:.3f}" for a in arms] + [f"{stats[a]['abs_err']:.1f}" for a in arms]
                     + [f"{stats[a]['signed_err']:+.1f}" for a in arms] + [f"{stats[a]['under5']:.0%}" for a in arms])
            lines.append(f"| {seed} | {max(stats[a]['n'] for a in arms)} | " + " | ".join(cells) + " |")

        def ms(a: str, key: str, fmt: str) -> str:
            v = np.array([st[key] for st in per_seed[a]])
            return f"{v.mean():{fmt}} ± {v.std(ddof=1) if len(v) > 1 else 0.0:{fmt.lstrip('+')}}"

        lines.append("| **mean ± sd over seeds** | | " + " | ".join(
            [ms(a, "dice", ".3f") for a in arms] + [ms(a, "abs_err", ".1f") for a in arms]
            + [ms(a, "signed_err", "+.1f") for a in arms] + [ms(a, "under5", ".2f") for a in arms]) + " |")
        lines.append("")
    return lines


def verdict(c: Comparison, runs: dict[int, tuple[dict, list[dict]]]) -> list[str]:
    """Per label and arm after the first: on how many seeds its mean Dice beat the first arm's, and by how much
    on average."""
    first = c.arms[0].name
    labels = list(dict.fromkeys(r["label"] for _, rows in runs.values() for r in rows))
    out = []
    for label in labels:
        for other in (a.name for a in c.arms[1:]):
            diffs = [(_stats(rows, other, label)["dice"] - _stats(rows, first, label)["dice"])
                     for _, rows in runs.values()]
            wins = sum(d >= 0 for d in diffs)
            sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0
            out.append(f"{label}: {other} - {first} mean Dice {np.mean(diffs):+.3f} (sd {sd:.3f} over {len(diffs)} "
                       f"seeds); {other} >= {first} on {wins} of {len(diffs)} seeds.")
    return out


def render(c: Comparison, out: Path, seed_list: list[int], write_md: Path | None = None) -> None:
    """The section of a finished multi-seed comparison (also alone: ``--report-only --seeds ...``)."""
    runs = {seed: _load(out / f"seed{seed}") for seed in seed_list}
    pooled = [{**r, "case": f"s{seed}/{r['case']}"} for seed, (_, rows) in runs.items() for r in rows]
    first_summary = runs[seed_list[0]][0]
    minutes = sum(summary["minutes"] for summary, _ in runs.values())
    # The first seed's set-up lines describe every seed (only the seed differs); its tables are replaced.
    setup = section(c, first_summary, runs[seed_list[0]][1]).split("\n\n| case |")[0]
    setup = setup.replace(f"; seed {first_summary['settings']['seed']}.", f"; seeds {', '.join(map(str, seed_list))}.")
    drawn = "its own phantoms, split and training" if c.phantoms else "its own split and training on the same data"
    body = [setup, f"- Seeds: {', '.join(map(str, seed_list))} (each {drawn}); wall clock {minutes:.1f} min in all.", "", "Per seed (means over that seed's test cases):", "",
            *spread_table(c, runs), *verdict(c, runs)]
    decisions = [f"seed {seed} `{r['arm']}` " + (("applied to " + ", ".join(r["postprocessing"]["keep_largest"]))
                                                  if r["postprocessing"]["keep_largest"] else "not applied")
                 for seed, (summary, _) in runs.items() for r in summary["arms"] if r.get("postprocessing")]
    if decisions:
        body += ["", "Largest-components post-processing, as each run's final validation decided: "
                 + "; ".join(decisions) + "."]
    if c.reframe is not None:
        body += [""] + [f"Seed {seed}: " + reframe_text(c, summary["arms"]) for seed, (summary, _) in runs.items()]
    if c.target is not None:
        body += ["", "All seeds' test cases together: " + c.target(pooled)]
        body += [f"Seed {seed}: " + c.target(rows) for seed, (_, rows) in runs.items()]
    body += ["", c.caveat, "", "### At a larger scale (GPU cluster): settings, not results", "", c.scale_up]
    text = "\n".join(body) + "\n"
    publish(c, out, pooled, text, write_md, "test cases of all seeds")
    print("\n".join(spread_table(c, runs) + verdict(c, runs)))
    print(f"results: {out / 'results.md'} ({minutes:.1f} min over {len(runs)} seeds)")
