"""``ds-seg3d experiment``: the arms and command lines it builds, its report and seeds,
and one short end-to-end run on real phantoms, shards and launches in which one arm fails."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools.__main__ import make_parser as data_tools_parser
from ds_seg3d import results
from ds_seg3d.evaluation import evaluate
from ds_seg3d.experiment import markdown
from ds_seg3d.experiment import run as experiment
from ds_seg3d.experiment.comparisons import COMPARISONS
from ds_seg3d.experiment.spec import Arm, Settings, data_cmds
from ds_seg3d.inference import predict

PSOAS = COMPARISONS["psoas-adversarial"]


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    experiment.add_arguments(parser)
    return parser.parse_args(argv)


def _train_args(cmd: list[str]) -> list[str]:
    """The arguments after ``--module ds_seg3d.train`` (what the training module parses)."""
    i = cmd.index("--module")
    assert cmd[i + 1] == "ds_seg3d.train"
    return cmd[i + 2:]


def _train_config(cmd: list[str]):
    from ds_seg3d.train import parse_args
    from ds_seg3d.training.loop import experiment_config

    return experiment_config(parse_args(_train_args(cmd)))


def test_psoas_arms_differ_only_in_the_adversarial_term(tmp_path: Path) -> None:
    s = Settings(steps=90, seed=7)
    shards, run = tmp_path / "shards", tmp_path / "run"
    base, adv = (experiment.train_cmd(PSOAS, s, arm, shards, run, 29999) for arm in PSOAS.arms)
    assert [a.name for a in PSOAS.arms] == ["baseline", "adversarial"]
    assert adv[:len(base)] == base, "the adversarial arm must extend the shared command, not change it"
    extra = adv[len(base):]
    assert extra[:2] == ["--adversarial", "--adversarial_weight"] and float(extra[2]) > 0
    cfg_base, cfg_adv = _train_config(base), _train_config(adv)
    assert not cfg_base.adversarial.enabled and cfg_adv.adversarial.enabled
    assert cfg_adv.adversarial.warmup_steps == s.steps // 3
    assert cfg_adv.adversarial.weight == float(extra[2])
    a, b = cfg_base.to_dict(), cfg_adv.to_dict()
    assert {k for k in a if a[k] != b[k]} == {"adversarial"}
    assert a["train"]["seed"] == 7 and a["train"]["steps"] == 90 and a["data"]["shards"] == str(shards)


def test_train_command_runs_the_venv_launcher_with_the_settings(tmp_path: Path) -> None:
    s = Settings(ranks=4, stages=2, steps=12, overrides=("data.patch=32,32,16",))
    cmd = experiment.train_cmd(PSOAS, s, PSOAS.arms[0], tmp_path / "shards", tmp_path / "run", 31000)
    assert cmd[0] == str(Path(sys.executable).with_name("deepspeed"))
    assert cmd[cmd.index("--num_gpus") + 1] == "4" and cmd[cmd.index("--master_port") + 1] == "31000"
    for flag in ("--deepspeed_config", "--discriminator_config", "--config"):
        assert Path(cmd[cmd.index(flag) + 1]).is_file(), flag
    cfg = _train_config(cmd)
    assert cfg.data.patch == (32, 32, 16) and cfg.train.stages == 2 and cfg.train.steps == 12
    hosted = experiment.train_cmd(PSOAS, Settings(hostfile="/etc/hostfile"), PSOAS.arms[0], tmp_path, tmp_path, 1)
    assert hosted[1:3] == ["--hostfile", "/etc/hostfile"] and "--num_gpus" not in hosted


def test_data_commands_parse_and_share_the_seed(tmp_path: Path) -> None:
    s = Settings(cases=6, seed=3, phantom_shape=(64, 64, 32), ranks=4, stages=2, plan_budget_gb=0.5)
    (name1, phantoms), (name2, shards), (name3, plan) = data_cmds(PSOAS, s, tmp_path)
    assert (name1, name2, name3) == ("phantoms", "build-shards", "plan")
    p = data_tools_parser().parse_args(phantoms[3:])
    assert (p.task, p.cases, p.seed, list(p.shape)) == ("psoas", 6, 3, [64, 64, 32])
    b = data_tools_parser().parse_args(shards[3:])
    assert b.src == p.out and tuple(b.spacing) == PSOAS.spacing and b.seed == 3
    assert b.val_fraction + b.test_fraction < 1 and b.test_fraction > 0
    assert plan[:4] == [sys.executable, "-m", "ds_seg3d", "plan"]
    parser = argparse.ArgumentParser()
    from ds_seg3d.memory import planner

    planner.add_arguments(parser)
    a = parser.parse_args(plan[4:])
    assert (a.shards, a.budget_gb, a.ranks, a.stages, a.base_width) == (b.out, 0.5, 4, [2], 8)


def test_predict_and_evaluate_commands_parse(tmp_path: Path) -> None:
    images = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    cmd = experiment.predict_cmd(tmp_path / "run", tmp_path / "pred", images)
    assert cmd[:4] == [sys.executable, "-m", "ds_seg3d", "predict"]
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    args = parser.parse_args(cmd[4:])
    assert args.inputs == [str(p) for p in images] and args.checkpoint == str(tmp_path / "run")
    cmd = experiment.evaluate_cmd(PSOAS, tmp_path / "pred", tmp_path / "truth", tmp_path / "e.csv")
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(cmd[4:])
    assert evaluate.parse_labels(args.labels, {0, 1}) == {"psoas": 1}


def test_settings_from_the_command_line_and_the_reproducing_command() -> None:
    args = _cli(["psoas-adversarial", "--out", "runs/x", "--steps", "40", "--set", "data.patch=32,32,16"])
    s = experiment.settings_from(args, PSOAS)
    assert s.steps == 40 and s.cases == PSOAS.defaults.cases and s.overrides == ("data.patch=32,32,16",)
    again = shlex.split(experiment.reproduce_command(args, s))
    assert again[:4] == ["python", "-m", "ds_seg3d", "experiment"]
    assert experiment.settings_from(_cli(again[4:]), PSOAS) == s


def test_documented_gpu_command_configures_a_valid_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ds_seg3d.models import check_patch

    monkeypatch.chdir(tmp_path)  # its config paths name shipped files, found from any folder
    (tmp_path / "hostfile").write_text("gpu01 slots=8\ngpu02 slots=8\n")  # the user's own
    block = PSOAS.scale_up.split("```")[1].replace("\\\n", " ")
    argv = shlex.split(block)
    assert argv[:2] == ["ds-seg3d", "experiment"]
    s = experiment.settings_from(_cli(argv[2:]), PSOAS)
    assert s.hostfile and "gpu_bf16" in s.deepspeed_config and "gpu_bf16" in s.discriminator_config
    assert (s.plan_budget_gb, s.plan_base_width, s.ranks, s.stages) == (40, 32, 8, 4)
    cmd = experiment.train_cmd(PSOAS, s, PSOAS.arms[-1], tmp_path, tmp_path, 1)
    cfg = _train_config(cmd)
    assert cfg.model.name == "planned" and cfg.data.patch is None  # the network the shards' plan holds
    # the plan it trains: nnU-Net's widths for a 40 GB GPU (the rules themselves: tests/planning)
    from ds_seg3d.config import apply_plan
    from ds_seg3d.planning.plans import plan_network

    plan = plan_network("3d", (1.2, 1.2, 3.0), (160.0, 160.0, 64.0), lambda *a: (True, 0.0),
                        base_width=s.plan_base_width)
    concrete = apply_plan(cfg, plan)
    check_patch(concrete.model.build_config(in_channels=1, num_classes=2), concrete.data.patch)
    assert concrete.model.params["max_width"] == 320
    assert cfg.adversarial.enabled and cfg.adversarial.warmup_steps == s.steps // 3


@pytest.mark.parametrize("argv, problem", [
    (["--ranks", "3", "--stages", "2"], "not a multiple"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--deepspeed-config", "no/such.json"], "no such file"),
])
def test_bad_settings_end_with_one_line(argv: list[str], problem: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    code = experiment.run(_cli(["psoas-adversarial", "--out", str(tmp_path / "x"), *argv]))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and problem in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_progress_reads_complete_metric_lines_only(tmp_path: Path) -> None:
    assert experiment.last_step(tmp_path) == 0
    lines = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (1, 10, 20)] + [{"kind": "val", "step": 30}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "train", "st')
    assert experiment.last_step(tmp_path) == 20


def test_run_logged_captures_output_and_exit_code(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "child.log"
    code = [sys.executable, "-c", "import os, sys; print('threads', os.environ['OMP_NUM_THREADS']); sys.exit(3)"]
    assert experiment.run_logged(code, log) == 3
    text = log.read_text()
    assert text.startswith("$ ") and "threads 1" in text


def test_test_cases_come_from_the_manifest(kidney_shards: Path, tmp_path: Path) -> None:
    manifest = json.loads((kidney_shards / "manifest.json").read_text())
    cases = experiment.test_cases(kidney_shards)
    assert [c for c, _, _ in cases] == manifest["splits"]["test"]
    assert all(image.is_file() and label.is_file() and image.name == label.name for _, image, label in cases)
    manifest["splits"]["test"] = []
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="no test split"):
        experiment.test_cases(tmp_path)


@pytest.mark.multirank
def test_end_to_end_one_failing_arm_does_not_stop_the_other(tmp_path: Path) -> None:
    """Real phantoms, shards and launches at a tiny size; the first arm's launch fails on a bad flag. The
    other also predicts its test scans reframed (a finer grid, a cut field of view) and scores the agreement."""
    comparison = dataclasses.replace(PSOAS, arms=(
        Arm("broken", "a flag the trainer refuses", lambda s: ["--no-such-flag"]), Arm("plain", "the baseline")),
        reframe=(2.0, 0.3))
    s = Settings(cases=4, steps=2, seed=1, phantom_shape=(64, 64, 32),
                 overrides=("data.patch=32,32,16", "model.params.base_width=4"))
    md, out = tmp_path / "EXPERIMENTS.md", tmp_path / "out"
    code = experiment.run_comparison(comparison, s, out, "python -m ds_seg3d experiment ...", md)
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    status = {a["arm"]: a["status"] for a in summary["arms"]}
    assert status["broken"].startswith("train failed") and status["plain"] == "ok"
    assert summary["splits"]["test"] >= 1 and summary["machine"]["nproc"] >= 1
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["arm"] for r in rows} == {"plain"} and all(0 <= float(r["dice"]) <= 1 for r in rows)
    assert len(rows) == summary["splits"]["test"]
    text = md.read_text()
    assert PSOAS.heading in text and "| Dice plain |" in text and "train failed" in text
    assert (out / "arms" / "plain" / "run" / "training_curve.png").is_file()
    plain = next(a for a in summary["arms"] if a["arm"] == "plain")
    assert set(plain["reframe_agreement"]) == {"psoas"} and 0 <= plain["reframe_agreement"]["psoas"] <= 1
    back = list((out / "arms" / "plain" / "pred_reframed_back").glob("*.nii.gz"))
    assert len(back) == len(rows) and "Reframed input: each test scan was also resampled to 2 mm" in text
    assert set(plain["postprocessing"]["keep_largest"]) <= {"psoas"} and "largest-components post-processing" in text


def test_arm_set_reaches_one_arm_only_and_round_trips(tmp_path: Path) -> None:
    kidney = COMPARISONS["kidney-3d-vs-2d"]
    argv = ["kidney-3d-vs-2d", "--out", str(tmp_path), "--set", "train.log_every=5",
            "--arm-set", "3d:model.params.base_width=12"]
    s = experiment.settings_from(_cli(argv), kidney)
    assert s.arm_sets("3d") == ["train.log_every=5", "model.params.base_width=12"]
    assert s.arm_sets("2d") == ["train.log_every=5"]
    cmds = {a.name: experiment.train_cmd(kidney, s, a, tmp_path, tmp_path, 1) for a in kidney.arms}
    cfgs = {name: _train_config(cmd) for name, cmd in cmds.items()}
    assert cfgs["3d"].model.params["base_width"] == 12 and "base_width" not in cfgs["2d"].model.params
    assert cfgs["3d"].train.log_every == cfgs["2d"].train.log_every == 5
    again = shlex.split(experiment.reproduce_command(_cli(argv), s))
    assert experiment.settings_from(_cli(again[4:]), kidney) == s
    for bad, why in (("4d:model.params.base_width=3", "no arm '4d'"), ("3d-model.params.base_width", "ARM:")):
        with pytest.raises(ValueError, match=why):
            experiment.settings_from(_cli(["kidney-3d-vs-2d", "--out", "x", "--arm-set", bad]), kidney)


def test_kidney_arms_differ_only_in_the_planned_network(tmp_path: Path) -> None:
    kidney = COMPARISONS["kidney-3d-vs-2d"]
    s = Settings(steps=50, seed=3)
    cmds = {a.name: experiment.train_cmd(kidney, s, a, tmp_path, tmp_path, 1) for a in kidney.arms}
    a, b = (_train_config(cmds[n]).to_dict() for n in ("2d", "3d"))
    assert {k for k in a if a[k] != b[k]} == {"model"}
    assert (a["model"]["name"], b["model"]["name"]) == ("planned", "planned")
    assert (a["model"]["plan"], b["model"]["plan"]) == ("2d", "3d")  # each its own nnU-Net plan


def test_real_ct_data_commands_build_one_training_and_one_test_half(tmp_path: Path) -> None:
    real = COMPARISONS["real-ct"]
    s = Settings()
    for name, cmd in real.data(real, s, tmp_path):
        assert cmd[:2] == [sys.executable, "-m"]
        if cmd[2] == "data_tools":
            assert data_tools_parser().parse_args(cmd[3:]).func(data_tools_parser().parse_args(cmd[3:])) == 0, name
        else:  # planning the shards' networks: checked with the planner's own tests
            assert cmd[2:5] == ["ds_seg3d", "plan", str(tmp_path / "shards")], name
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]) == len(manifest["splits"]["test"]) == 1
    (case, image, label), = experiment.test_cases(tmp_path / "shards")
    assert case in ("ct_left", "ct_right") and image.is_file() and label.is_file()
    argv = ["real-ct", "--out", str(tmp_path), "--steps", "12"]
    again = shlex.split(experiment.reproduce_command(_cli(argv), experiment.settings_from(_cli(argv), real)))
    assert "--cases" not in again and experiment.settings_from(_cli(again[4:]), real).steps == 12
    text = real.data_text(real, s, "1 train, 1 test")
    assert "TotalSegmentator" not in text and "mirrored left half" in text


def test_report_only_renders_a_finished_comparison_with_its_plot(tmp_path: Path) -> None:
    kidney = COMPARISONS["kidney-3d-vs-2d"]
    out = tmp_path / "out"
    out.mkdir()
    rng = np.random.default_rng(4)
    rows = [{"arm": arm, "case": f"kidney_{i:03d}", "label": "kidney", "dice": f"{0.8 + 0.1 * (arm == '3d'):.3f}",
             "hd95_mm": "4.0", "volume_pred_ml": f"{100 + rng.normal(0, 5):.2f}", "volume_true_ml": "100",
             "volume_error_pct": "1.0"} for arm in ("2d", "3d") for i in range(4)]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    arms = [{"arm": a, "description": a, "status": "ok", "seconds": {"train": 60.0}, "training": {"s_per_step": 1.5},
             "load_avg_15min": 1.0, "model": {"name": net, "params": {"levels": 3, "strides": [[1, 1, 1], [2, 2, 1]]},
                                             "patch": [32, 32, 16], "weights": 1234, "planned": True},
             "postprocessing": {"keep_largest": {"kidney": 1} if net == "unet3d" else {}, "components": {"kidney": 2},
                                "validation_dice": {"kidney": 0.9}, "validation_dice_largest_component": {
                                    "kidney": 0.92 if net == "unet3d" else 0.85}}}
            for a, net in (("2d", "cnn2d"), ("3d", "unet3d"))]
    summary = {"comparison": kidney.name, "command": "python -m ds_seg3d experiment kidney-3d-vs-2d --out x",
               "settings": dataclasses.asdict(Settings()), "splits": {"train": 13, "val": 1, "test": 4},
               "started": "today", "minutes": 1.0, "machine": results.machine(), "arms": arms}
    (out / "summary.json").write_text(json.dumps(summary))
    md = tmp_path / "docs" / "EXPERIMENTS.md"
    md.parent.mkdir()
    code = experiment.run(_cli(["kidney-3d-vs-2d", "--out", str(out), "--report-only", "--write-md", str(md)]))
    assert code == 0
    png = md.parent / "experiments" / "results" / "kidney-3d-vs-2d_bland_altman.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "bland_altman.png").is_file()
    text = md.read_text()
    assert "](experiments/results/kidney-3d-vs-2d_bland_altman.png)" in text
    assert "s_per_step 1.500" in text and "NOT MET" in text and "`cnn2d`" in text and "`unet3d`" in text
    assert ("post-processing (kidney 2 per label, as in the training labels) applied to kidney (validation Dice "
            "kidney 0.900 -> 0.920)") in text
    assert "training labels) not applied (validation Dice kidney 0.900 -> 0.850)" in text
    # another comparison's folder is refused, in one line
    assert experiment.run(_cli(["real-ct", "--out", str(out), "--report-only"])) == 2


def _fake_finished(folder: Path, c, s: Settings, dice: dict[str, float]) -> None:
    """A finished comparison in ``folder``, as run_comparison leaves it."""
    folder.mkdir(parents=True)
    rows = [{"arm": arm, "case": f"case_{i}", "label": "kidney", "dice": f"{d + 0.01 * i:.3f}", "hd95_mm": "3.0",
             "volume_pred_ml": "100", "volume_true_ml": "100", "volume_error_pct": f"{(-1) ** i * 2.0 * (i + 1):.1f}"}
            for arm, d in dice.items() for i in range(3)]
    with open(folder / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    arms = [{"arm": a, "description": a, "status": "ok", "seconds": {"train": 6.0}, "training": {},
             "load_avg_15min": 1.0} for a in dice]
    summary = {"comparison": c.name, "command": "ds-seg3d experiment ...", "settings": dataclasses.asdict(s),
               "splits": {"train": 10, "test": 3}, "started": "today", "minutes": 2.0, "machine": results.machine(),
               "arms": arms}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_seeds_resume_finished_ones_and_report_the_spread(tmp_path: Path, monkeypatch) -> None:
    from ds_seg3d.experiment import seeds

    kidney = COMPARISONS["kidney-3d-vs-2d"]
    s = Settings(steps=10)
    _fake_finished(tmp_path / "seed0", kidney, dataclasses.replace(s, seed=0), {"2d": 0.80, "3d": 0.90})
    _fake_finished(tmp_path / "seed1", kidney, dataclasses.replace(s, seed=1), {"2d": 0.85, "3d": 0.84})
    assert seeds.finished(tmp_path / "seed0", kidney, dataclasses.replace(s, seed=0))
    assert not seeds.finished(tmp_path / "seed0", kidney, dataclasses.replace(s, seed=0, steps=11))
    ran = []
    monkeypatch.setattr(experiment, "run_comparison", lambda c, mine, folder, command: ran.append(mine.seed) or
                        _fake_finished(folder, c, mine, {"2d": 0.82, "3d": 0.88}) or 0)
    md = tmp_path / "EXPERIMENTS.md"
    assert experiment.run_seeds(kidney, s, [0, 1, 2], tmp_path, "ds-seg3d experiment kidney-3d-vs-2d ...", md) == 0
    assert ran == [2]  # seeds 0 and 1 were finished with the same settings: kept
    text = md.read_text()
    assert "| **mean ± sd over seeds** |" in text and "seeds 0, 1, 2" in text
    assert "3d >= 2d on 2 of 3 seeds" in text  # 0.91 vs 0.81, 0.85 vs 0.86, 0.89 vs 0.83
    assert "All seeds' test cases together:" in text and "Seed 1:" in text


def test_adversarial_variants_change_one_remedy_each(tmp_path: Path) -> None:
    variants = COMPARISONS["psoas-adversarial-variants"]
    s = Settings(steps=90)
    cfgs = {arm.name: _train_config(experiment.train_cmd(variants, s, arm, tmp_path / "shards", tmp_path / "run", 1))
            for arm in variants.arms}
    assert not cfgs["baseline"].adversarial.enabled
    reference = cfgs["adversarial"].to_dict()["adversarial"]
    assert reference["enabled"] and reference["warmup_steps"] == 30
    changed = {name: {k for k, v in cfg.to_dict()["adversarial"].items() if reference[k] != v}
               for name, cfg in cfgs.items() if name not in ("baseline", "adversarial")}
    assert changed == {"steadied": {"label_smoothing", "ramp_steps"}, "r1": {"gradient_penalty"},
                       "slow-d": {"discriminator_lr"}}
    assert cfgs["steadied"].adversarial.ramp_steps == 30
    text = markdown.verdicts([{"arm": a, "case": "c", "label": "psoas", "dice": "0.8", "volume_error_pct": "1"}
                              for a in ("baseline", "r1")], "baseline", "r1")
    assert text.startswith("On 1 test case(s), r1 vs baseline")
