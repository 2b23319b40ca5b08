"""ds-seg3d beside nnU-Net v2 on the same cases and the same budget, nnU-Net run by its own tools.

One shard folder (planned with ``ds-seg3d plan``) gives both systems their cases and split:

1. ``data-tools export-nnunet`` writes the shards' source cases in nnU-Net's raw layout, same split;
2. ds-seg3d arms (``ds3d``, ``ds2d``): the shards' planned 3D / slice-wise U-Net trained for
   ``--iterations`` optimizer steps under the ``deepspeed`` launcher, then ``ds-seg3d predict`` on the
   test images;
3. nnU-Net arms (``nnunet3d``, ``nnunet2d``): ``nnUNetv2_extract_fingerprint --verify_dataset_integrity``,
   ``nnUNetv2_plan_experiment``, ``nnUNetv2_preprocess``, ``nnUNetv2_train`` fold 0 of the shards' split
   (fold ``all`` when the split has no val case: then no post-processing is decided, as in ds-seg3d) with
   nnU-Net's own trainer for ``--iterations`` iterations (a subclass that changes only the epoch
   count and length), ``nnUNetv2_predict`` on the test images. ``--plans matched`` (the default) edits
   nnU-Net's plans to the ds-seg3d plan's spacing, patch, widths, strides, kernels and samples per
   step, so that both spend the same compute per iteration; ``--plans default`` keeps nnU-Net's own;
4. ``ds-seg3d evaluate`` scores every arm's predictions against the same reference labels.

Every arm records its training and prediction wall clock, its seconds per iteration and the peak
memory of its process tree (the sum of the processes' proportional set sizes, sampled each second),
in ``OUT/arms/<arm>/arm.json``; a rerun skips arms that finished. ``OUT/results.md`` holds the table,
``--write-md EXPERIMENTS.md`` replaces its section there. nnU-Net's environment variables are set for
its child processes only; its preprocessed data is removed at the end (``--keep-preprocessed`` keeps it)
and an interrupted command's whole process group is stopped.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_vs_nnunet.py --shards SHARDS --out OUT --iterations 500
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, Path(__file__).resolve().parent):
    if str(p) not in sys.path:  # run as a plain script from a checkout
        sys.path.insert(0, str(p))

import nnunet_runs
from process_runs import run, tool
from vs_nnunet_report import report

from ds_seg3d.paths import shipped
from ds_seg3d.results import machine, write_section, write_text_atomic

ARMS = {  # arm -> (system, configuration)
    "ds3d": ("ds-seg3d", "3d"), "ds2d": ("ds-seg3d", "2d"),
    "nnunet3d": ("nnU-Net", "3d_fullres"), "nnunet2d": ("nnU-Net", "2d"),
}
DS_TOML = {"3d": "experiments/kidney_demo.toml", "2d": "experiments/kidney_2d.toml"}


# ------------------------------------------------------------------------------------------------ ds-seg3d


def ds_samples_per_step(ds_config: Path, ranks: int, stages: int) -> int:
    cfg = json.loads(ds_config.read_text())
    return int(cfg["train_micro_batch_size_per_gpu"]) * int(cfg["gradient_accumulation_steps"]) * (ranks // stages)


def ds_seconds_per_step(metrics: Path) -> float:
    """Median seconds per step between consecutive training logs, leaving out spans with a validation."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    spans, prev = [], None
    for row in rows:
        if row["kind"] != "train":
            prev = None
            continue
        if prev is not None and row["step"] > prev["step"]:
            spans.append((row["time"] - prev["time"]) / (row["step"] - prev["step"]))
        prev = row
    return statistics.median(spans)


def ds_postprocessing(run_dir: Path) -> list[str]:
    """The largest-component step the run decided on its validation cases (run.json), as ``predict`` applies it."""
    decision = json.loads((run_dir / "run.json").read_text()).get("postprocessing") or {}
    counts = decision.get("components", {})
    return [f"keep the {counts.get(name, 1)} largest {name} components" for name in decision.get("keep_largest", {})]


def ds_arm(args, arm: str, cfg: str, folder: Path, test_images: list[str]) -> dict:
    run_dir, pred = folder / "run", folder / "pred"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(pred, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    train = run([tool("deepspeed"), "--num_gpus", str(args.ranks), "--module", "ds_seg3d.train",
                 "--data", str(args.shards), "--out", str(run_dir), "--config", str(ROOT / DS_TOML[cfg]),
                 "--stages", str(args.stages), "--steps", str(args.iterations), "--set", f"train.seed={args.seed}",
                 "--deepspeed_config", str(args.deepspeed_config)], folder / "train.log", env)
    predict = run([sys.executable, "-m", "ds_seg3d", "predict", "--checkpoint", str(run_dir), "--out", str(pred),
                   "--device", args.device, *test_images], folder / "predict.log", env)
    plan = json.loads((run_dir / "run.json").read_text())["plan"]
    samples = ds_samples_per_step(args.deepspeed_config, args.ranks, args.stages)
    return {"train": train, "predict": predict, "s_per_iteration": ds_seconds_per_step(run_dir / "metrics.jsonl"),
            "plan": plan, "patch": plan["patch"], "widths": nnunet_runs.widths(
                plan["params"]["levels"], plan["params"]["base_width"], plan["params"]["max_width"]),
            "samples_per_step": samples, "batch": samples * (plan["patch"][2] if cfg == "2d" else 1),
            "postprocessing": ds_postprocessing(run_dir)}


# ------------------------------------------------------------------------------------------------- nnU-Net


class NnUNet:
    """nnU-Net's folders and commands for this benchmark's dataset."""

    def __init__(self, args, dataset: str):
        self.args, self.dataset = args, dataset
        self.root = args.out / "nnunet"
        self.trainers = self.root / "trainers"
        self.env = nnunet_runs.environment(self.root, args.threads, da_processes=args.threads)
        # Training augments in its own process (0 workers), so that its threads own the cores as ds-seg3d's ranks
        # do; planning sets its torch threads from the same variable, so it keeps a positive value.
        self.train_env = nnunet_runs.environment(self.root, args.threads, da_processes=0)
        self.preprocessed = self.root / "nnUNet_preprocessed" / dataset

    def cmd(self, name: str, *rest: str, log: Path, env: dict[str, str] | None = None) -> dict:
        return run([tool(name), *rest], log, env or self.env)

    def with_trainer(self, trainer: Path, name: str, *rest: str, log: Path, env: dict[str, str] | None = None) -> dict:
        """``nnUNetv2_train`` / ``nnUNetv2_predict`` with the budget trainer (see ``nnunet_cli.py``)."""
        return run([sys.executable, str(Path(__file__).with_name("nnunet_cli.py")), str(trainer), name, *rest],
                   log, env or self.env)

    def plan(self, log: Path) -> None:
        """Fingerprint (with nnU-Net's dataset check) and nnU-Net's own plans, once."""
        if (self.preprocessed / "nnUNetPlans.json").exists():
            return
        did = str(self.args.dataset_id)
        self.cmd("nnUNetv2_extract_fingerprint", "-d", did, "--verify_dataset_integrity", "-np", "1", log=log)
        self.cmd("nnUNetv2_plan_experiment", "-d", did, log=log)
        shutil.copyfile(self.root / "nnUNet_raw" / self.dataset / "splits_final.json", self.preprocessed / "splits_final.json")

    def preprocess(self, plans_name: str, configuration: str, log: Path) -> None:
        """nnU-Net's preprocessing for one configuration, again only when its plan changed since the last one."""
        config = json.loads((self.preprocessed / f"{plans_name}.json").read_text())["configurations"][configuration]
        marker = self.preprocessed / f".preprocessed-{plans_name}-{configuration}"
        if marker.exists() and json.loads(marker.read_text()) == config:
            return
        self.cmd("nnUNetv2_preprocess", "-d", str(self.args.dataset_id), "-plans_name", plans_name,
                 "-c", configuration, "-np", "1", log=log)
        write_text_atomic(marker, json.dumps(config))

    def matched(self, configuration: str, run_plan: dict, samples_per_step: int) -> str:
        """Add ``configuration`` matched to ``run_plan`` to the matched plans file; returns the plans name."""
        name = nnunet_runs.MATCHED_PLANS
        path = self.preprocessed / f"{name}.json"
        base = nnunet_runs.read_plans(self.preprocessed.parent, self.dataset)
        plans = nnunet_runs.matched_plans(base, run_plan, samples_per_step, name)
        if path.exists():
            merged = json.loads(path.read_text())
            merged["configurations"].update(plans["configurations"])
            plans = merged
        write_text_atomic(path, json.dumps(plans, indent=1))
        return name


def nnunet_arm(args, nn: NnUNet, cfg: str, folder: Path, ds_plan: dict | None, samples: int, fold: str) -> dict:
    """Train nnU-Net's ``fold`` (``0``: the shards' train/val split; ``all``: no val case, nnU-Net's own way to
    train on every training case) and predict the test images with it."""
    log = folder / "nnunet.log"
    log.unlink(missing_ok=True)
    nn.plan(log)
    if args.plans == "matched":
        if ds_plan is None:
            raise SystemExit(f"error: {args.shards / 'plans.json'}: no ds-seg3d plan to match; run `ds-seg3d plan` "
                             "on the shards or use --plans default")
        plans_name = nn.matched(cfg, ds_plan, samples)
    else:
        plans_name = "nnUNetPlans"
    nn.preprocess(plans_name, cfg, log)
    trainer_file = nnunet_runs.write_trainer(nn.trainers, args.iterations)
    trainer = trainer_file.stem
    results = nn.root / "nnUNet_results" / nn.dataset / f"{trainer}__{plans_name}__{cfg}"
    shutil.rmtree(results, ignore_errors=True)
    did = str(args.dataset_id)
    train = nn.with_trainer(trainer_file, "nnUNetv2_train", did, cfg, fold, "-tr", trainer, "-p", plans_name,
                            "-device", args.device, log=log, env=nn.train_env)
    raw_pred, pred = folder / "pred_raw", folder / "pred"
    for path in (raw_pred, pred):
        shutil.rmtree(path, ignore_errors=True)
    predict = nn.with_trainer(trainer_file, "nnUNetv2_predict", "-i", str(nn.root / "nnUNet_raw" / nn.dataset / "imagesTs"),
                              "-o", str(raw_pred), "-d", did, "-c", cfg, "-f", fold, "-tr", trainer, "-p", plans_name,
                              "-device", args.device, "-npp", "1", "-nps", "1", "--disable_progress_bar", log=log)
    if fold == "all":  # no validation case to decide post-processing on: none, as ds-seg3d does then
        shutil.copytree(raw_pred, pred, ignore=shutil.ignore_patterns("*.json", "*.pkl"))
        post: list[str] = []
    else:
        post = nnunet_postprocessing(nn, results, raw_pred, pred, log)
    config = json.loads((nn.preprocessed / f"{plans_name}.json").read_text())["configurations"][cfg]
    times = nnunet_runs.training_times(results / f"fold_{fold}")
    _, per_epoch, val = nnunet_runs.budget(args.iterations)
    return {"train": train, "predict": predict, "s_per_iteration": times["s_per_epoch"] / per_epoch,
            "epochs": times["epochs"], "iterations_per_epoch": per_epoch, "val_iterations_per_epoch": val,
            "plans": plans_name, "trainer": trainer, "patch": config["patch_size"], "spacing": config["spacing"],
            "widths": config["architecture"]["arch_kwargs"]["features_per_stage"],
            "samples_per_step": samples, "batch": config["batch_size"], "postprocessing": post}


def nnunet_postprocessing(nn: NnUNet, results: Path, raw_pred: Path, pred: Path, log: Path) -> list[str]:
    """nnU-Net's own post-processing step: decided on fold 0's validation cases, applied to the test predictions.

    (``nnUNetv2_find_best_configuration`` does the same on the cross-validation; here fold 0 is the shards'
    train/val split, as ds-seg3d decides its largest-component step on its validation cases.)
    """
    validation = results / "fold_0" / "validation"
    jsons = ["-plans_json", str(results / "plans.json"), "-dataset_json", str(results / "dataset.json")]
    nn.cmd("nnUNetv2_determine_postprocessing", "-i", str(validation), "-ref", str(nn.preprocessed / "gt_segmentations"),
           *jsons, "-np", "1", "--remove_postprocessed", log=log)
    nn.cmd("nnUNetv2_apply_postprocessing", "-i", str(raw_pred), "-o", str(pred), "-pp_pkl_file",
           str(validation / "postprocessing.pkl"), "-np", "1", *jsons, log=log)
    return json.loads((validation / "postprocessing.json").read_text())["postprocessing_fns"]


# ----------------------------------------------------------------------------------------------- scoring


def evaluate(folder: Path, truth: Path, labels: dict[str, int]) -> dict:
    """``ds-seg3d evaluate`` of the arm's predictions; per-case rows and the per-label summary."""
    import csv

    pairs = ",".join(f"{k}={v}" for k, v in labels.items())
    run([sys.executable, "-m", "ds_seg3d", "evaluate", "--pred", str(folder / "pred"), "--truth", str(truth),
         "--labels", pairs, "--out", str(folder / "evaluation.csv")], folder / "evaluate.log")
    with open(folder / "evaluation.csv") as fh:
        cases = list(csv.DictReader(fh))
    with open(folder / "evaluation.summary.csv") as fh:
        summary = list(csv.DictReader(fh))
    return {"cases": cases, "summary": summary}


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, required=True, help="shard folder, planned with `ds-seg3d plan`")
    p.add_argument("--out", type=Path, required=True, help="benchmark folder (a rerun skips finished arms)")
    p.add_argument("--iterations", type=int, default=500, help="optimizer steps / nnU-Net iterations per arm")
    p.add_argument("--arms", default="ds3d,nnunet3d,ds2d,nnunet2d", help="comma-separated, of " + ", ".join(ARMS))
    p.add_argument("--plans", choices=("matched", "default"), default="matched")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads of nnU-Net's training process (default: all cores, as ds-seg3d's ranks use)")
    p.add_argument("--deepspeed-config", type=Path, help="ds-seg3d's DeepSpeed JSON (default: the shipped CPU or GPU one)")
    p.add_argument("--dataset-id", type=int, default=990, help="nnU-Net dataset number inside OUT")
    p.add_argument("--keep-preprocessed", action="store_true", help="keep nnU-Net's preprocessed arrays")
    p.add_argument("--force", action="store_true", help="rerun finished arms")
    p.add_argument("--write-md", type=Path, help="replace this benchmark's section of this markdown file")
    args = p.parse_args(argv)
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown {', '.join(unknown)} (known: {', '.join(ARMS)})")
    args.arm_list = args.arms.split(",")
    if args.deepspeed_config is None:
        gpu = args.device.startswith("cuda")
        args.deepspeed_config = shipped(f"ds_configs/pipeline_zero1_{'gpu_bf16' if gpu else 'cpu_fp32'}.json")
    args.shards, args.out = args.shards.resolve(), args.out.resolve()
    return args


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through ``run``, which stops the command's process group


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    from importlib import metadata

    from ds_seg3d.data.shard_format import load_manifest

    try:
        manifest = load_manifest(args.shards)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plans_file = args.shards / "plans.json"
    shard_plans = json.loads(plans_file.read_text())["configurations"] if plans_file.exists() else {}
    test = list(manifest["splits"]["test"])
    labels = {k: int(v) for k, v in manifest["labels"].items() if int(v) != 0}
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "nnunet" / "nnUNet_raw"
    found = sorted(raw.glob(f"Dataset{args.dataset_id:03d}_*"))
    if not found:
        run([sys.executable, "-m", "data_tools", "export-nnunet", str(args.shards), str(raw),
             "--dataset-id", str(args.dataset_id)], args.out / "export.log")
        found = sorted(raw.glob(f"Dataset{args.dataset_id:03d}_*"))
    dataset = found[0].name
    truth = found[0] / "labelsTs"
    nn = NnUNet(args, dataset)
    test_images = [manifest["cases"][c]["image"] for c in test]
    done: dict[str, dict] = {}
    bar = tqdm(args.arm_list, desc="arms", unit="arm")
    try:
        for arm in bar:
            system, cfg = ARMS[arm]
            folder = args.out / "arms" / arm
            record = folder / "arm.json"
            if record.exists() and not args.force:
                done[arm] = json.loads(record.read_text())
                continue
            bar.set_postfix_str(f"{arm}: training and prediction (logs in {folder})")
            ds_cfg = "3d" if cfg.startswith("3d") else "2d"
            arm_start = time.time()
            if system == "ds-seg3d":
                rec = ds_arm(args, arm, ds_cfg, folder, test_images)
            else:
                ds_rec = done.get(f"ds{ds_cfg}")
                ds_plan = ds_rec["plan"] if ds_rec else shard_plans.get(ds_cfg)
                samples = ds_rec["samples_per_step"] if ds_rec else ds_samples_per_step(args.deepspeed_config, args.ranks, args.stages)
                fold = "0" if manifest["splits"].get("val") else "all"
                rec = nnunet_arm(args, nn, cfg, folder, ds_plan, samples, fold)
            rec["score"] = evaluate(folder, truth, labels)
            rec["elapsed_s"] = time.time() - arm_start
            write_text_atomic(record, json.dumps(rec, indent=1))
            done[arm] = rec
    finally:
        bar.close()
        if not args.keep_preprocessed and all(a in done for a in args.arm_list):
            for sub in nn.preprocessed.glob("*") if nn.preprocessed.exists() else []:
                if sub.is_dir():
                    shutil.rmtree(sub)  # the preprocessed arrays; plans, fingerprint and split stay
            for marker in nn.preprocessed.glob(".preprocessed-*") if nn.preprocessed.exists() else []:
                marker.unlink()
    info = {"machine": machine(), "nnunetv2": metadata.version("nnunetv2"), "test": test, "labels": labels,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cases": f"{len(manifest['cases'])} cases of `{manifest['name']}` ({len(manifest['splits']['train'])} train, "
                     f"{len(manifest['splits'].get('val') or [])} val, {len(test)} test), shards at "
                     f"{' x '.join(map(str, manifest['target_spacing']))} mm",
            "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_vs_nnunet.py " + shlex.join(
                sys.argv[1:] if argv is None else argv)}
    text = report(args, {a: done[a] for a in args.arm_list if a in done}, info, ARMS)
    write_text_atomic(args.out / "results.md", text + "\n")
    if args.write_md:
        write_section(args.write_md, text, intro="# Experiments\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
