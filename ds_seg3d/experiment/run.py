"""``ds-seg3d experiment NAME --out DIR``: a named comparison, run end to end.

A comparison is one entry of ``ds_seg3d.experiment.comparisons.COMPARISONS`` (its data, shard spacing,
experiment TOML and arms; ``ds_seg3d.experiment.spec`` says what an entry holds). Every arm trains on the same
shards with the same seeds, patch, steps and DeepSpeed config under the real launcher, differing only
in what its entry adds (arguments, or its own experiment TOML), and is scored on the test split's
original NIfTI files against their labels. Another comparison is one more entry.

DIR receives the data (phantoms/ or the scan's halves/), shards/, truth/, logs/, arms/<arm>/ (run, pred,
logs, evaluation.csv and its summary and Bland-Altman plot), results.csv, results.md, summary.json and
bland_altman.png (every arm); ``--write-md`` replaces the comparison's own section of a markdown file
and copies the plot to ``experiments/results/`` beside it. A failed arm is recorded and the other arms
still run. ``--report-only`` renders a finished comparison again from its summary and results.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ds_seg3d.checkpoint import RUN_INFO
from ds_seg3d.data.shard_format import MANIFEST_NAME, iter_cases, load_manifest
from ds_seg3d.evaluation.evaluate import FIELDS
from ds_seg3d.experiment import seeds
from ds_seg3d.experiment.comparisons import COMPARISONS
from ds_seg3d.experiment.markdown import markdown_table, publish, section, verdicts
from ds_seg3d.experiment.spec import PY, Arm, Comparison, Settings
from ds_seg3d.parallel.launch import deepspeed_launcher, free_port, launch_env
from ds_seg3d.paths import resolve, shipped
from ds_seg3d.results import machine, write_text_atomic
from ds_seg3d.training.run_log import METRICS


def train_cmd(c: Comparison, s: Settings, arm: Arm, shards: Path, run: Path, port: int) -> list[str]:
    where = ["--hostfile", s.hostfile] if s.hostfile else ["--num_gpus", str(s.ranks)]
    cmd = [deepspeed_launcher(), *where, "--master_port", str(port), "--module", "ds_seg3d.train",
           "--data", str(shards), "--out", str(run), "--config", str(shipped(c.arm_config(arm))),
           "--stages", str(s.stages), "--steps", str(s.steps), "--set", f"train.seed={s.seed}",
           "--deepspeed_config", str(shipped(s.deepspeed_config)),  # an absolute path stays as it is
           "--discriminator_config", str(shipped(s.discriminator_config))]
    for item in s.arm_sets(arm.name):
        cmd += ["--set", item]
    return cmd + arm.train_args(s)


def predict_cmd(run: Path, pred: Path, images: list[Path]) -> list[str]:
    return [*PY, "ds_seg3d", "predict", "--checkpoint", str(run), "--out", str(pred), *map(str, images)]


def evaluate_cmd(c: Comparison, pred: Path, truth: Path, out_csv: Path) -> list[str]:
    return [*PY, "ds_seg3d", "evaluate", "--pred", str(pred), "--truth", str(truth), "--labels", c.labels,
            "--out", str(out_csv)]


def run_logged(cmd: list[str], log: Path, desc: str = "", total: int | None = None,
               progress: Callable[[], int] | None = None, append: bool = False) -> int:
    """Run ``cmd`` with its output in ``log`` (after what it holds with ``append``) and a tqdm bar following
    ``progress()``; its exit code. Children get ``OMP_NUM_THREADS=1`` (ranks share the cores) and this
    ``ds_seg3d`` on ``PYTHONPATH``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = launch_env()
    line = "$ " + shlex.join(cmd)
    print(f"{desc}: {line}" if desc else line, flush=True)
    with open(log, "a" if append else "w") as fh:
        fh.write(line + "\n")
        fh.flush()
        # Its own process group: an interrupt takes the launcher's ranks down with it.
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        with tqdm(total=total, desc=desc, unit="step" if desc == "train" else "case",
                  disable=progress is None) as bar:
            try:
                while (rc := proc.poll()) is None:
                    time.sleep(1.0)
                    if progress is not None and (done := progress()) > bar.n:
                        bar.update(done - bar.n)
            except BaseException:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                raise
    return rc


def last_step(run: Path) -> int:
    """Last training step logged so far (complete lines only: the file is being appended to)."""
    try:
        lines = (run / METRICS).read_text().splitlines(keepends=True)
    except OSError:
        return 0
    return max([json.loads(l)["step"] for l in lines if l.endswith("\n") and '"train"' in l] or [0])


def _count_labels(pred: Path) -> int:
    return len([p for p in pred.glob("*.nii*") if not p.name.startswith(".tmp-")]) if pred.is_dir() else 0


def _log_tail(log: Path) -> str:
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    return lines[-1][-300:] if lines else "(empty log)"


def test_cases(shards: Path) -> list[tuple[str, Path, Path]]:
    """(case id, original image, original label) of the manifest's test split."""
    manifest = load_manifest(shards)
    entries, ids = dict(iter_cases(manifest)), manifest.get("splits", {}).get("test") or []
    if not ids:
        raise ValueError(f"{shards / MANIFEST_NAME}: no test split to score the arms on; use more --cases")
    return [(c, Path(entries[c]["image"]), Path(entries[c]["label"])) for c in ids]


def training_summary(run: Path) -> dict:
    """End of the training curve: mean of the last 5 logged values, and the final validation Dice."""
    try:
        records = [json.loads(l) for l in (run / METRICS).read_text().splitlines() if l.strip()]
    except (OSError, ValueError):
        return {}
    train = [r for r in records if r["kind"] == "train"][-5:]
    out = {k: round(float(np.mean([r[k] for r in train])), 4) for k in ("loss", "adv_term", "d_acc_real",
                                                                          "d_acc_fake") if train and k in train[-1]}
    every = [r for r in records if r["kind"] == "train" and "time" in r]
    if len(every) >= 2 and every[-1]["step"] > every[0]["step"]:  # from the first logged step on: warm
        out["s_per_step"] = round((every[-1]["time"] - every[0]["time"]) / (every[-1]["step"] - every[0]["step"]), 4)
    val = [r for r in records if r["kind"] == "val"]
    return {**out, "val_dice": val[-1]["dice"]} if val else out


def trained_model(run: Path) -> dict | None:
    """The network an arm trained, as its run.json records it (a planned one made concrete)."""
    try:
        info = json.loads((run / RUN_INFO).read_text())
    except (OSError, ValueError):
        return None
    from ds_seg3d.inference.cases import model_from_run
    from ds_seg3d.models import count_parameters

    return {"name": info["model"]["name"], "params": info["experiment"]["model"]["params"],
            "patch": info["experiment"]["data"]["patch"], "weights": count_parameters(model_from_run(info)[1]),
            "planned": info.get("plan") is not None}


def regrid_cmd(src: Path, out: Path, *args: str) -> list[str]:
    return [*PY, "data_tools", "regrid", str(src), str(out), *args]


def reframed_steps(c: Comparison, run: Path, adir: Path, out: Path,
                   test: list[tuple[str, Path, Path]]) -> list[tuple[str, list[list[str]], int | None, Callable]]:
    """Predict the reframed test scans, put each prediction back on its scan's grid, score the agreement."""
    reframed, back = adir / "pred_reframed", adir / "pred_reframed_back"
    return [("predict-reframed", [predict_cmd(run, reframed, [out / "reframed" / t[1].name for t in test])],
             len(test), lambda: _count_labels(reframed)),
            ("regrid-back", [regrid_cmd(reframed / t[1].name, back / t[1].name, "--like", str(t[1])) for t in test],
             None, None),
            ("agreement", [evaluate_cmd(c, back, adir / "pred", adir / "reframe_agreement.csv")], None, None)]


def reframe_agreement(adir: Path) -> dict[str, float] | None:
    """Mean Dice per label between the predictions of the reframed and of the original scans."""
    try:
        with open(adir / "reframe_agreement.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        return None
    labels = dict.fromkeys(r["label"] for r in rows)
    return {label: round(float(np.mean([float(r["dice"]) for r in rows if r["label"] == label])), 4)
            for label in labels}


def postprocessing(run: Path) -> dict | None:
    """What the final validation decided about keeping each label's largest component (run.json)."""
    try:
        return json.loads((run / RUN_INFO).read_text()).get("postprocessing")
    except (OSError, ValueError):
        return None


def run_arm(c: Comparison, s: Settings, arm: Arm, out: Path, test: list[tuple[str, Path, Path]]) -> dict:
    """Train, predict and evaluate one arm; its record: status, seconds and command per step, training."""
    adir = out / "arms" / arm.name
    shutil.rmtree(adir, ignore_errors=True)  # a fresh run: no checkpoint or metrics of an earlier one
    run, pred = adir / "run", adir / "pred"
    rec: dict = {"arm": arm.name, "description": arm.description, "status": "ok", "seconds": {}, "commands": {}}
    print(f"== arm {arm.name}: {arm.description}", flush=True)
    steps = [("train", [train_cmd(c, s, arm, out / "shards", run, free_port())], s.steps, lambda: last_step(run)),
             ("predict", [predict_cmd(run, pred, [t[1] for t in test])], len(test), lambda: _count_labels(pred)),
             ("evaluate", [evaluate_cmd(c, pred, out / "truth", adir / "evaluation.csv")], None, None)]
    if c.reframe is not None:
        steps += reframed_steps(c, run, adir, out, test)
    for name, cmds, total, progress in steps:
        start = time.monotonic()
        for i, cmd in enumerate(cmds):
            if (rc := run_logged(cmd, adir / f"{name}.log", name, total, progress, append=i > 0)) != 0:
                break
        rec["seconds"][name], rec["commands"][name] = round(time.monotonic() - start, 1), shlex.join(cmds[0])
        if rc != 0:
            rec["status"] = f"{name} failed (exit {rc}): {_log_tail(adir / f'{name}.log')}"
            print(f"arm {arm.name}: {rec['status']} (log {adir / f'{name}.log'})", flush=True)
            break
    rec["training"] = training_summary(run)
    rec["model"] = trained_model(run)
    rec["postprocessing"] = postprocessing(run)
    if c.reframe is not None:
        rec["reframe_agreement"] = reframe_agreement(adir)
    rec["load_avg_15min"] = round(os.getloadavg()[2], 2)  # others' jobs on the same cores slow an arm down
    return rec


def run_comparison(c: Comparison, s: Settings, out: Path, command: str, write_md: Path | None = None) -> int:
    """The whole comparison; 0 when every arm finished, 1 when one failed (its record says why)."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    began, host = time.time(), machine()
    for name, cmd in c.data(c, s, out):
        print(f"== {name}", flush=True)
        if (rc := run_logged(cmd, out / "logs" / f"{name}.log")) != 0:
            raise ValueError(f"{out / 'logs' / f'{name}.log'}: {name} failed (exit {rc}): "
                             f"{_log_tail(out / 'logs' / f'{name}.log')}")
    test, truth = test_cases(out / "shards"), out / "truth"
    shutil.rmtree(truth, ignore_errors=True)
    truth.mkdir()
    for _, image, label in test:
        shutil.copyfile(label, truth / image.name)  # evaluate pairs prediction and truth by file name
    if c.reframe is not None:
        spacing, cut = c.reframe
        for i, (_, image, _) in enumerate(test):
            cmd = regrid_cmd(image, out / "reframed" / image.name, "--spacing", *[f"{spacing:g}"] * 3,
                             "--crop-anterior", f"{cut:g}")
            if (rc := run_logged(cmd, out / "logs" / "reframe.log", append=i > 0)) != 0:
                raise ValueError(f"{out / 'logs' / 'reframe.log'}: reframing failed (exit {rc}): "
                                 f"{_log_tail(out / 'logs' / 'reframe.log')}")
    records = [run_arm(c, s, arm, out, test) for arm in c.arms]
    rows = []
    for rec in (r for r in records if r["status"] == "ok"):
        with open(out / "arms" / rec["arm"] / "evaluation.csv", newline="") as fh:
            rows += [{"arm": rec["arm"], **row} for row in csv.DictReader(fh)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["arm", *FIELDS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", buf.getvalue())
    splits = load_manifest(out / "shards").get("splits", {})
    summary = {"comparison": c.name, "command": command, "settings": dataclasses.asdict(s),
               "splits": {k: len(splits[k]) for k in ("train", "val", "test") if isinstance(splits.get(k), list)},
               "started": time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(began)),
               "minutes": round((time.time() - began) / 60, 1), "machine": host, "arms": records}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    render(c, out, write_md)
    return 0 if all(r["status"] == "ok" for r in records) else 1


def run_seeds(c: Comparison, s: Settings, seed_list: list[int], out: Path, command: str,
              write_md: Path | None = None) -> int:
    """The comparison once per seed in ``out/seed<k>`` (phantoms, split and training all follow the seed),
    then the spread over seeds. A seed whose comparison finished with the same settings is kept, so an
    interrupted study resumes where it stopped."""
    out = out.resolve()
    status = 0
    for seed in seed_list:
        folder = out / f"seed{seed}"
        mine = dataclasses.replace(s, seed=seed)
        if seeds.finished(folder, c, mine):
            print(f"== seed {seed}: finished earlier ({folder}), kept", flush=True)
            continue
        print(f"== seed {seed}", flush=True)
        status = max(status, run_comparison(c, mine, folder, command))
    seeds.render(c, out, seed_list, write_md)
    return status


def render(c: Comparison, out: Path, write_md: Path | None = None) -> None:
    """Tables, verdict, plot and markdown from ``out/summary.json`` and ``out/results.csv`` (also on its own:
    ``--report-only`` renders a finished comparison again without training anything)."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        with open(out / "results.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, ValueError) as e:
        raise ValueError(f"{out}: no finished comparison to report ({e})") from None
    if summary.get("comparison") != c.name:
        raise ValueError(f"{out / 'summary.json'}: holds {summary.get('comparison')!r}, not {c.name!r}")
    publish(c, out, rows, section(c, summary, rows), write_md, "test cases")
    print(markdown_table(rows, [r["arm"] for r in summary["arms"] if r["status"] == "ok"]))
    print("\n\n".join(verdicts(rows, c.arms[0].name, other.name) for other in c.arms[1:]))
    if c.target is not None:
        print(c.target(rows))
    print(f"results: {out / 'results.csv'}, {out / 'results.md'} ({summary['minutes']} min)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=sorted(COMPARISONS), help="the comparison to run")
    p.add_argument("--out", required=True, help="folder for phantoms, shards, runs and results")
    for flag, what in (("cases", "phantom cases"), ("steps", "training steps per arm"),
                       ("ranks", "ranks per arm (deepspeed --num_gpus)"), ("stages", "pipeline stages"),
                       ("seed", "seed of phantoms, splits and training, shared by the arms")):
        p.add_argument(f"--{flag}", type=int, help=f"{what} (default: the comparison's)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="run the comparison once per seed (OUT/seed<k>, resumed where it stopped) and report the "
                        "spread; replaces --seed")
    p.add_argument("--phantom-shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="nominal phantom size")
    p.add_argument("--plan-budget-gb", type=float, help="memory per rank the shards' networks are planned for")
    p.add_argument("--plan-base-width", type=int, help="channels at full resolution of the planned networks")
    p.add_argument("--deepspeed-config", help="segmenter DeepSpeed JSON for every arm")
    p.add_argument("--discriminator-config", help="discriminator DeepSpeed JSON (adversarial arms)")
    p.add_argument("--hostfile", help="launch with this hostfile (its slots give the ranks) instead of --num_gpus")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="experiment override for every arm, e.g. --set data.patch=128,128,64")
    p.add_argument("--arm-set", action="append", default=[], metavar="ARM:SECTION.FIELD=VALUE",
                   help="override for one arm only, e.g. --arm-set 2d:model.params.base_width=28")
    p.add_argument("--write-md", metavar="EXPERIMENTS.md", help="replace the comparison's section in this file")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: render the finished comparison in --out again (tables, plot, --write-md)")


PATH_FLAGS = ("deepspeed_config", "discriminator_config", "hostfile")


def _arm_set(item: str, c: Comparison) -> tuple[str, str]:
    arm, sep, setting = item.partition(":")
    if not sep or "=" not in setting:
        raise ValueError(f"--arm-set {item!r} is not ARM:SECTION.FIELD=VALUE")
    if arm not in {a.name for a in c.arms}:
        raise ValueError(f"--arm-set {item!r}: {c.name} has no arm {arm!r} ({', '.join(a.name for a in c.arms)})")
    return arm, setting


def settings_from(args: argparse.Namespace, c: Comparison) -> Settings:
    given = {k: getattr(args, k) for k in ("cases", "steps", "ranks", "stages", "seed", "plan_budget_gb",
                                           "plan_base_width") if getattr(args, k) is not None}
    if args.seeds:
        given["seed"] = args.seeds[0]
    paths = {k: str(resolve(getattr(args, k)).resolve()) for k in PATH_FLAGS if getattr(args, k)}
    shape = tuple(args.phantom_shape) if args.phantom_shape else c.defaults.phantom_shape
    s = dataclasses.replace(c.defaults, **given, **paths, phantom_shape=shape,
                            overrides=c.defaults.overrides + tuple(args.set),
                            arm_overrides=c.defaults.arm_overrides + tuple(_arm_set(item, c) for item in args.arm_set))
    for k in ("cases", "steps", "ranks", "stages"):
        if getattr(s, k) < 1:
            raise ValueError(f"--{k} must be at least 1, got {getattr(s, k)}")
    if s.seed < 0 or any(k < 0 for k in args.seeds or ()):
        raise ValueError(f"--seed must be non-negative, got {s.seed}")
    if args.seeds and args.seed is not None:
        raise ValueError("--seed and --seeds: give one of them")
    if s.plan_budget_gb <= 0 or s.plan_base_width < 1:
        raise ValueError("--plan-budget-gb and --plan-base-width must be positive")
    if not s.hostfile and s.ranks % s.stages:
        raise ValueError(f"--ranks {s.ranks} is not a multiple of --stages {s.stages}")
    for k, v in paths.items():
        if not Path(v).is_file():
            raise ValueError(f"{v}: no such file (--{k.replace('_', '-')})")
    return s


def reproduce_command(args: argparse.Namespace, s: Settings) -> str:
    """The command line that reruns the experiment, with every budget setting spelled out."""
    phantoms = COMPARISONS[args.name].phantoms
    cmd = ["python", "-m", "ds_seg3d", "experiment", args.name, "--out", args.out,
           *(["--cases", str(s.cases)] if phantoms else []),
           "--steps", str(s.steps), "--ranks", str(s.ranks), "--stages", str(s.stages),
           *(["--seeds", *map(str, args.seeds)] if args.seeds else ["--seed", str(s.seed)]),
           "--plan-budget-gb", f"{s.plan_budget_gb:g}", "--plan-base-width", str(s.plan_base_width)]
    cmd += ["--phantom-shape", *map(str, args.phantom_shape)] if args.phantom_shape and phantoms else []
    for k in PATH_FLAGS:
        cmd += [f"--{k.replace('_', '-')}", getattr(args, k)] if getattr(args, k) else []
    for item in args.set:
        cmd += ["--set", item]
    for item in args.arm_set:
        cmd += ["--arm-set", item]
    return shlex.join(cmd + (["--write-md", args.write_md] if args.write_md else []))


def run(args: argparse.Namespace) -> int:
    c = COMPARISONS[args.name]
    try:
        write_md = Path(args.write_md) if args.write_md else None
        if args.report_only:
            if args.seeds:
                seeds.render(c, Path(args.out).resolve(), args.seeds, write_md)
            else:
                render(c, Path(args.out).resolve(), write_md)
            return 0
        s = settings_from(args, c)
        if args.seeds:
            return run_seeds(c, s, args.seeds, Path(args.out), reproduce_command(args, s), write_md)
        return run_comparison(c, s, Path(args.out), reproduce_command(args, s), write_md)
    except ValueError as e:
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
