"""Pipelined training under the real deepspeed launcher: 2 stages x 2 data-parallel ranks, ZeRO-1.

One launch trains and checkpoints; a second resumes from the middle checkpoint of a copy of that
run and must reproduce the uninterrupted run's losses. Prediction from the checkpoint runs on one
process and pipelined over 2 ranks, and both must give the same labels.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ds_seg3d import checkpoint as ckpt
from ds_seg3d.paths import SAMPLE_CT
from ds_seg3d.training.run_log import read_metrics
from tests.launch import REPO_ROOT, run_deepspeed

pytestmark = pytest.mark.multirank

STEPS, MIDDLE = 8, 4
EXPERIMENT = """
[data]
patch = [32, 32, 16]
oversample_foreground = 0.5
[model]
name = "unet3d"
params = { levels = 3, base_width = 4, max_width = 16, convs_per_level = 1 }
[train]
stages = 2
val_every = 4
val_max_cases = 1
checkpoint_every = 4
log_every = 1
"""


def _ds_config(tmp: Path) -> Path:
    cfg = json.loads((REPO_ROOT / "ds_configs" / "pipeline_zero1_cpu_fp32.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 3e-3
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 3e-3, "warmup_max_lr": 3e-3,
                                                         "warmup_num_steps": 1}}
    path = tmp / "ds.json"
    path.write_text(json.dumps(cfg))
    return path


def _train_args(shards: Path, run: Path, tmp: Path) -> list[str]:
    (tmp / "exp.toml").write_text(EXPERIMENT)
    return ["--data", str(shards), "--out", str(run), "--config", str(tmp / "exp.toml"),
            "--deepspeed_config", str(_ds_config(tmp)), "--steps", str(STEPS)]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def trained(kidney_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("train")
    run = tmp / "run"
    args = _train_args(kidney_shards, run, tmp)
    run_deepspeed("train_check.py", [*args, "--check-out", str(tmp / "check")], num_ranks=4, timeout=900)
    ranks = [json.loads((tmp / "check" / f"rank{r}.json").read_text()) for r in range(4)]
    return {"run": run, "tmp": tmp, "args": args, "ranks": ranks}


def test_two_stages_two_replicas_train_and_checkpoint(trained: dict) -> None:
    run = trained["run"]
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (6, 7, 8)])
    assert last < first, f"loss did not fall: {losses}"
    assert ckpt.latest_tag(run) == ckpt.step_tag(STEPS)
    for tag in (ckpt.step_tag(MIDDLE), ckpt.step_tag(STEPS)):
        assert sorted(p.name for p in (ckpt.checkpoint_root(run) / tag).glob("layer_*-model_states.pt")) \
            == [f"layer_{i:02d}-model_states.pt" for i in range(6)]
    val = [r for r in read_metrics(run) if r["kind"] == "val"]
    assert [r["step"] for r in val] == [MIDDLE, STEPS] and 0.0 <= val[-1]["dice"]["kidney"] <= 1.0
    # the final validation decided the post-processing (as many components as the training labels have)
    post = json.loads((run / ckpt.RUN_INFO).read_text())["postprocessing"]
    kept = val[-1]["dice_largest_component"]["kidney"] > val[-1]["dice"]["kidney"]
    manifest = json.loads((Path(trained["args"][trained["args"].index("--data") + 1]) / "manifest.json").read_text())
    assert post["keep_largest"] == ({"kidney": 1} if kept else {})
    assert post["components"] == manifest["dataset_fingerprint"]["components"]
    assert post["validation_dice"]["kidney"] == pytest.approx(val[-1]["dice"]["kidney"], abs=1e-5)
    assert (run / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "monitor").rglob("*.csv")), "DeepSpeed's CSV monitor wrote nothing"


def test_replicas_of_a_stage_hold_identical_parameters(trained: dict) -> None:
    by_stage: dict[int, list[dict]] = {}
    for r in trained["ranks"]:
        by_stage.setdefault(r["stage"], []).append(r)
    assert sorted(by_stage) == [0, 1] and all(len(v) == 2 for v in by_stage.values())
    for stage, (a, b) in by_stage.items():
        assert {a["dp_rank"], b["dp_rank"]} == {0, 1}
        assert (a["num_params"], a["sum"], a["sum_sq"], a["first"]) == (b["num_params"], b["sum"], b["sum_sq"], b["first"])
    assert by_stage[0][0]["sum"] != by_stage[1][0]["sum"]


def test_resume_reproduces_the_uninterrupted_run(trained: dict) -> None:
    """``--resume-from`` the middle checkpoint (``latest`` names the last one) continues exactly."""
    tmp, run = trained["tmp"], trained["run"]
    resumed = tmp / "resumed"
    shutil.copytree(run, resumed)
    assert ckpt.latest_tag(resumed) == ckpt.step_tag(STEPS)
    (resumed / "metrics.jsonl").write_text("")
    args = [a if a != str(run) else str(resumed) for a in trained["args"]]
    run_deepspeed("ds_seg3d.train", [*args, "--resume-from", ckpt.step_tag(MIDDLE)], num_ranks=4, timeout=900,
                  module=True)
    want, got = _losses(run), _losses(resumed)
    assert sorted(got) == list(range(MIDDLE + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), (step, got, want)


def _predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ds_seg3d", "predict", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def test_predict_real_ct_on_its_own_grid_and_pipelined_agrees(trained: dict, kidney_shards: Path) -> None:
    tmp, run = trained["tmp"], trained["run"]
    real = SAMPLE_CT / "example_ct_sm.nii.gz"
    manifest = json.loads((kidney_shards / "manifest.json").read_text())
    phantom = Path(manifest["cases"][manifest["splits"]["test"][0]]["image"])
    single = _predict("--checkpoint", str(run), "--out", str(tmp / "single"), "--overlap", "0",
                      str(real), str(phantom))
    assert single.returncode == 0, single.stderr[-2000:]
    for src in (real, phantom):
        out = nib.load(tmp / "single" / src.name)
        ref = nib.load(src)
        assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
        assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    volumes = (tmp / "single" / "volumes.csv").read_text().splitlines()
    assert volumes[0] == "case,kidney_ml" and len(volumes) == 3

    run_deepspeed("ds_seg3d.inference.predict", ["--pipelined", "--checkpoint", str(run), "--out", str(tmp / "piped"),
                                       "--overlap", "0", str(phantom)], num_ranks=2, timeout=600, module=True)
    a = np.asarray(nib.load(tmp / "single" / phantom.name).dataobj)
    b = np.asarray(nib.load(tmp / "piped" / phantom.name).dataobj)
    assert np.array_equal(a, b)


def test_every_checkpoint_has_a_manifest_of_its_files(trained: dict) -> None:
    run = trained["run"]
    assert ckpt.tags(run) == [ckpt.step_tag(MIDDLE), ckpt.step_tag(STEPS)]
    for tag in ckpt.tags(run):
        records = json.loads((ckpt.checkpoint_root(run) / tag / ckpt.MANIFEST).read_text())
        assert sorted(records) == [p.relative_to(run).as_posix() for p in ckpt.tag_files(run, tag)]
        assert any("layer_" in name for name in records) and any("optim_states" in name for name in records)
        for name, rec in records.items():
            assert rec == ckpt.file_record(run, run / name)[1]
    check = subprocess.run([sys.executable, "-m", "ds_seg3d", "check-run", str(run)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert check.stdout.count("intact") == 2 and "latest" in check.stdout.splitlines()[-1]


def _one_error(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_a_damaged_or_truncated_checkpoint_is_named_and_refused(trained: dict) -> None:
    """256 bytes flipped in the middle of a layer file of the last tag, then an optimizer file cut short:
    ``check-run``, ``predict`` and ``--resume`` each refuse with one line naming the file and the newest
    intact tag; ``predict --tag`` of that tag still works."""
    tmp, run = trained["tmp"], trained["run"]
    damaged = tmp / "damaged"
    shutil.copytree(run, damaged)
    last = ckpt.checkpoint_root(damaged) / ckpt.step_tag(STEPS)
    layer = sorted(last.glob("layer_*-model_states.pt"))[1]
    data = bytearray(layer.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 256] = bytes(b ^ 0xFF for b in data[middle:middle + 256])
    layer.write_bytes(bytes(data))
    intact = f"newest intact checkpoint: {ckpt.step_tag(MIDDLE)}"

    check = subprocess.run([sys.executable, "-m", "ds_seg3d", "check-run", str(damaged)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and f"DAMAGED: {layer}" in check.stdout and intact in check.stderr
    real = str(SAMPLE_CT / "example_ct_sm.nii.gz")
    error = _one_error(_predict("--checkpoint", str(damaged), "--out", str(tmp / "dmg_pred"), real))
    assert str(layer) in error and "sha256" in error and intact in error
    assert not (tmp / "dmg_pred").exists() or not any((tmp / "dmg_pred").iterdir())
    ok = _predict("--checkpoint", str(damaged), "--tag", ckpt.step_tag(MIDDLE), "--out", str(tmp / "old_pred"), real)
    assert ok.returncode == 0, ok.stderr[-2000:]

    optim = sorted(last.glob("*optim_states.pt"))[0]
    optim.write_bytes(optim.read_bytes()[:-100])
    args = [a if a != str(run) else str(damaged) for a in trained["args"]]
    resume = subprocess.run([sys.executable, "-m", "ds_seg3d.train", *args, "--stages", "1", "--resume"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    error = _one_error(resume)
    assert intact in error and (str(layer) in error or (str(optim) in error and "truncated" in error))
    layer.write_bytes((ckpt.checkpoint_root(run) / ckpt.step_tag(STEPS) / layer.name).read_bytes())  # repaired
    check = subprocess.run([sys.executable, "-m", "ds_seg3d", "check-run", str(damaged)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and f"DAMAGED: {optim}: truncated" in check.stdout
