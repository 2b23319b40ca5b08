"""The markdown section of ``bench_vs_nnunet.py``: the arms' table, per-case scores and how each number was taken."""
from __future__ import annotations

import nnunet_runs

SECTION = "## Phantom polycystic kidneys: ds-seg3d vs nnU-Net v2, same cases and budget"


def _f(value, fmt: str = ".3f") -> str:
    return "" if value in (None, "") else format(float(value), fmt)


def report(args, done: dict[str, dict], info: dict, arms: dict[str, tuple[str, str]]) -> str:
    """The markdown section: how the arms were run, one row per arm, one per test case."""
    m = info["machine"]
    lines = [SECTION, "",
             "Is ds-seg3d as good as nnU-Net? The same phantom cases and split, the same number of iterations, "
             "nnU-Net v2 run by its own tools (fingerprint, planner, preprocessor, `nnUNetTrainer` with only the "
             "epoch count and length changed, predictor with its test-time mirroring); every arm scored by "
             "`ds-seg3d evaluate` against the same labels. "
             + ("nnU-Net's plans are edited to the ds-seg3d plan's spacing, patch, widths, per-axis strides and "
                "kernels and samples per iteration (`--plans matched`), so both do the same compute per iteration."
                if args.plans == "matched" else "nnU-Net keeps its own plans (`--plans default`)."),
             "", "```", info["command"], "```", "",
             f"- Data: {info['cases']}; {len(info['test'])} test cases.",
             f"- Budget: {args.iterations} iterations per arm (ds-seg3d: optimizer steps of {args.ranks} rank(s) as "
             f"{args.stages} pipeline stage(s); nnU-Net: its iterations, one process, {args.threads} thread(s), "
             "augmentation in the training process).",
             f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, device {args.device}; Python "
             f"{m['python']}, torch {m['torch']}, deepspeed {m['deepspeed']}, nnunetv2 {info['nnunetv2']}. "
             f"Date: {info['date']}. Load average {m['load_avg'][0]} when the report was written. Wall clock of the arms "
             f"(each with its planning, training, prediction and scoring) {sum(r['elapsed_s'] for r in done.values()) / 60:.1f} min.",
             "", "| arm | system | configuration | patch (ds-seg3d: x y z; nnU-Net: its axis order) | batch (2D: slices) | widths | "
             "train min | s / iteration | peak memory GiB | predict min | post-processing (decided on the val cases) | mean Dice | "
             "mean HD95 mm | mean abs. volume error % | cases under 5 % |", "|" + "---|" * 15]
    label = next(iter(info["labels"]))
    for arm, rec in done.items():
        system, cfg = arms[arm]
        s = next(r for r in rec["score"]["summary"] if r["label"] == label)
        n_under = round(float(s["share_under_5pct_volume_error"]) * int(s["n_cases"]))
        lines.append(f"| {arm} | {system} | {cfg} | {' x '.join(map(str, rec['patch']))} | {rec['batch']} | "
                     f"{'-'.join(map(str, rec['widths']))} | {rec['train']['wall_s'] / 60:.1f} | {rec['s_per_iteration']:.2f} | "
                     f"{rec['train']['peak_bytes'] / 2**30:.2f} | {rec['predict']['wall_s'] / 60:.1f} | "
                     f"{'; '.join(rec.get('postprocessing') or []) or 'none'} | {_f(s['dice_mean'])} | "
                     f"{_f(s['hd95_mm_mean'], '.1f')} | {_f(s['abs_volume_error_pct_mean'], '.1f')} | {n_under}/{s['n_cases']} |")
    lines += ["", "Per test case (Dice / volume error %):", "",
              "| case | " + " | ".join(done) + " |", "|---|" + "---|" * len(done)]
    by_case: dict[str, dict[str, dict]] = {}
    for arm, rec in done.items():
        for row in rec["score"]["cases"]:
            if row["label"] == label:
                by_case.setdefault(row["case"], {})[arm] = row
    for case in sorted(by_case):
        cells = [f"{_f(by_case[case][a]['dice'])} / {float(by_case[case][a]['volume_error_pct']):+.1f}"
                 if a in by_case[case] else "" for a in done]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += ["", "s / iteration: ds-seg3d, the median between consecutive logged steps (validations left out); "
              "nnU-Net, the median epoch time (the first left out) over the epoch's iterations, which includes its "
              f"validation iterations (1 per {nnunet_runs.VAL_RATIO}) and the epoch's checkpoint. Train min includes "
              "start-up and each system's validations. Peak memory: the training process tree's summed PSS.", ""]
    return "\n".join(lines)
