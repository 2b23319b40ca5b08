"""The markdown an experiment writes: per-case table, a verdict sentence and its section."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ds_seg3d.config import load_config
from ds_seg3d.evaluation.bland_altman import bland_altman_writer
from ds_seg3d.experiment.spec import Comparison, Settings
from ds_seg3d.paths import shipped
from ds_seg3d.results import replace_section, write_files, write_text_atomic

FIGURES = "experiments/results"
"""Where ``--write-md`` puts the figures its section shows, relative to the markdown file."""
INTRO = "# Experiments\n\nComparisons run end to end by `ds-seg3d experiment NAME`; each section says how.\n"


def publish(c: Comparison, out: Path, rows: list[dict], body: str, write_md: Path | None, caption: str) -> None:
    """Write ``out/results.md`` and the Bland-Altman plot of ``rows`` (every arm); with ``write_md``, also the
    comparison's section of that markdown file, the plot copied beside it under ``FIGURES``."""
    if rows:
        write_files({out / "bland_altman.png": bland_altman_writer(
            [{**r, "label": f"{r['label']}, {r['arm']}"} for r in rows])})
    write_text_atomic(out / "results.md", f"{c.heading}\n\n{body}")
    if write_md is None:
        return
    if rows:  # the volume agreement of every arm, kept beside the markdown that shows it
        png = write_md.resolve().parent / FIGURES / f"{c.name}_bland_altman.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "bland_altman.png", png)
        rel = os.path.relpath(png, write_md.resolve().parent)
        body += f"\nVolume agreement per arm (Bland-Altman, {caption}):\n\n![{c.name} Bland-Altman]({rel})\n"
    replace_section(write_md, c.heading, body, intro=INTRO)
    print(f"wrote the section {c.heading[3:]!r} of {write_md}")


def _num(row: dict, field: str) -> float:
    """A CSV cell as a float; absent or empty cells are nan (HD95 of an empty mask reads "inf" or "nan")."""
    try:
        return float(row.get(field, "nan"))
    except ValueError:
        return float("nan")


def _median(values: np.ndarray) -> float:
    # inf (a structure missed entirely) counts as the worst value rather than being dropped
    finite = values[~np.isnan(values)]
    return float(np.median(finite)) if len(finite) else float("nan")


def markdown_table(rows: list[dict], arms: list[str]) -> str:
    """Per case (and label) Dice, HD95 and signed volume error per arm; then per label the mean and
    median (of absolute errors for volumes) and the cases under 5 % volume error."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    many = len(labels) > 1
    has_hd = any("hd95_mm" in r for r in rows)
    metrics = [("dice", "Dice", ".3f")] + ([("hd95_mm", "HD95 mm", ".1f")] if has_hd else []) + [
        ("volume_error_pct", "volume error %", "+.1f")]
    by = {(r["arm"], r["case"], r["label"]): r for r in rows}
    cases = list(dict.fromkeys(r["case"] for r in rows))
    lines = ["| case | " + " | ".join(f"{title} {a}" for _, title, _ in metrics for a in arms) + " |",
             "|---" * (1 + len(metrics) * len(arms)) + "|"]

    def cell(a: str, c: str, label: str, field: str, fmt: str) -> str:
        return format(_num(by[(a, c, label)], field), fmt) if (a, c, label) in by else "-"

    for label in labels:
        for c in cases:
            if any((a, c, label) in by for a in arms):
                name = f"{c} {label}" if many else c
                lines.append(f"| {name} | " + " | ".join(cell(a, c, label, f, fmt) for f, _, fmt in metrics
                                                          for a in arms) + " |")
    for label in labels:
        vals = {(a, f): np.array([_num(r, f) for r in rows if r["arm"] == a and r["label"] == label])
                for a in arms for f, _, _ in metrics}
        vals.update({(a, "volume_error_pct"): np.abs(vals[(a, "volume_error_pct")]) for a in arms})
        tag = f" {label}" if many else ""
        for name, f in (("mean", lambda v: float(np.nanmean(v)) if len(v) and not np.isnan(v).all() else float("nan")),
                        ("median", _median)):
            lines.append(f"| **{name}{tag}** (volume: of absolute errors) | " + " | ".join(
                format(f(vals[(a, m)]), fmt.lstrip("+")) for m, _, fmt in metrics for a in arms) + " |")
        lines.append(f"| **cases under 5 % volume error{tag}** | " + " | ".join(
            [""] * ((len(metrics) - 1) * len(arms))
            + [f"{int(np.sum(vals[(a, 'volume_error_pct')] < 5))}/{len(vals[(a, 'volume_error_pct')])}"
               for a in arms]) + " |")
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


def verdicts(rows: list[dict], reference: str, variant: str) -> str:
    """The verdict sentence, one per label when the rows hold several."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    if len(labels) <= 1:
        return verdict(rows, reference, variant)
    return "\n\n".join(f"{label}: " + verdict([r for r in rows if r["label"] == label], reference, variant)
                        for label in labels)


def _params(params: dict) -> str:
    """A network's parameters in a line: per-level strides and kernels as 1x1x1 2x2x1 ..."""
    shown = {k: (" ".join("x".join(map(str, t)) for t in v) if k in ("strides", "kernels") and v else v)
             for k, v in params.items()}
    return json.dumps(shown)


def postprocessing_text(decision: dict | None) -> str:
    """The final validation's verdict on keeping each label's largest components, as a clause."""
    if not decision:
        return ""
    counts = decision.get("components", {})
    kept = decision.get("keep_largest", {})
    both = ", ".join(f"{name} {decision['validation_dice'][name]:.3f} -> "
                     f"{decision['validation_dice_largest_component'][name]:.3f}"
                     for name in decision.get("validation_dice", {}))
    verdict = ("applied to " + ", ".join(kept)) if kept else "not applied"
    sizes = ", ".join(f"{name} {n}" for name, n in counts.items())
    return (f"; largest-components post-processing ({sizes or '1'} per label, as in the training labels) {verdict} "
            f"(validation Dice {both})")


def reframe_text(c: Comparison, arms: list[dict]) -> str:
    """The sentence on predictions of the same scans on another grid and field of view."""
    spacing, cut = c.reframe or (0.0, 0.0)
    parts = []
    for r in arms:
        agreement = r.get("reframe_agreement")
        if agreement:
            parts.append(f"`{r['arm']}` " + ", ".join(f"{label} {d:.3f}" for label, d in agreement.items()))
    return (f"Reframed input: each test scan was also resampled to {spacing:g} mm voxels with the anterior "
            f"{cut:.0%} of its field of view cut away (`data-tools regrid`), predicted, and put back on the "
            f"scan's grid; Dice between the two predictions of the same scan: " + ("; ".join(parts) or "-") + ".")


def section(c: Comparison, summary: dict, rows: list[dict]) -> str:
    """The markdown under the comparison's heading: question, command, set-up, machine, table, verdict."""
    s, m = summary["settings"], summary["machine"]
    settings = Settings(**{**s, "arm_overrides": tuple(tuple(x) for x in s.get("arm_overrides", ()))})
    splits = ", ".join(f"{v} {k}" for k, v in summary["splits"].items())
    arms_ok = [r["arm"] for r in summary["arms"] if r["status"] == "ok"]
    layout = (f"the hostfile's ranks as {s['stages']} pipeline stages x data parallel" if s["hostfile"] else
              f"{s['ranks']} ranks = {s['stages']} pipeline stages x {s['ranks'] // s['stages']} data-parallel")
    adversarial = any("--adversarial" in arm.train_args(settings) for arm in c.arms)
    models = []
    trained = {r["arm"]: r.get("model") for r in summary["arms"]}
    for arm in c.arms:
        net = trained.get(arm.name)
        if net is None:  # not trained: what its config says
            cfg = load_config(shipped(c.arm_config(arm)), settings.arm_sets(arm.name))
            net = {"name": cfg.model.name, "params": cfg.model.params, "patch": cfg.data.patch}
        patch = " x ".join(map(str, net["patch"])) if net.get("patch") else "the plan's"
        weights = f", {net['weights']:,} weights" if net.get("weights") else ""
        planned = " planned" if net.get("planned") else ""
        models.append(f"`{arm.name}`:{planned} `{net['name']}` {_params(net['params'])}, patch {patch}{weights} "
                      f"(`{c.arm_config(arm)}`)")
    out = [c.question, "", "```", summary["command"], "```", "",
           f"- Data: {c.data_text(c, settings, splits)}, shards at {' x '.join(map(str, c.spacing))} mm.",
           "- Models: " + "; ".join(models) + ".",
           f"- Training: {s['steps']} steps, {layout}; DeepSpeed `{Path(s['deepspeed_config']).name}`"
           + (f" (discriminator `{Path(s['discriminator_config']).name}`)" if adversarial else "")
           + f"; seed {s['seed']}.",
           f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, load average "
           f"{m['load_avg'][0]} at the start (shared machine); Python {m['python']}, torch {m['torch']}, "
           f"deepspeed {m['deepspeed']}. Date: {summary['started']}. Wall clock: {summary['minutes']} min in all."]
    described = {arm.name: arm.description for arm in c.arms}  # documentation: the current words
    for r in summary["arms"]:
        secs = ", ".join(f"{k} {v / 60:.1f} min" for k, v in r["seconds"].items())
        t = dict(r.get("training", {}))
        val = ", ".join(f"{k} {v:.3f}" for k, v in t.pop("val_dice", {}).items())
        ends = ", ".join(f"{k} {v:.3f}" for k, v in t.items())
        out.append(f"- Arm `{r['arm']}` ({described.get(r['arm'], r['description'])}): {r['status']}; {secs} (load average "
                   f"{r['load_avg_15min']} over the 15 min before it ended); end of training (mean of the last 5 "
                   f"logged steps; loss = the arm's whole objective): {ends or '-'}; validation Dice with the "
                   f"final weights {val or '-'}{postprocessing_text(r.get('postprocessing'))}.")
    out += ["", markdown_table(rows, arms_ok), ""]
    out += ["\n\n".join(verdicts(rows, c.arms[0].name, other.name) for other in c.arms[1:])]
    if c.reframe is not None:
        out += ["", reframe_text(c, summary["arms"])]
    if c.target is not None:
        out += ["", c.target(rows)]
    out += ["", c.caveat, "", "### At a larger scale (GPU cluster): settings, not results", "", c.scale_up]
    return "\n".join(out) + "\n"
