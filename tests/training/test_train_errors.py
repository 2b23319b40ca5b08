"""Bad training and prediction input: each a one-line error and a non-zero exit, before any work.

These run ``python -m ds_seg3d.train`` as a single process (a world of one rank), which is enough to
reach every check that happens before the model is built.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ds_seg3d.paths import SAMPLE_CT
from tests.launch import REPO_ROOT

CPU_CONFIG = REPO_ROOT / "ds_configs" / "pipeline_zero1_cpu_fp32.json"


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def _assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in errors[0], errors[0]


def _ds_config(tmp: Path, **changes) -> Path:
    cfg = json.loads(CPU_CONFIG.read_text())
    for key, value in changes.items():
        cfg[key] = value
    path = tmp / "ds.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("case, extra, words", [
    ("stages do not divide the world", ["--stages", "2"], ["2", "divide"]),
    ("ZeRO-2 with a pipeline", ["--stages", "1", "--zero", "2"], ["ZeRO", "pipeline"]),
    ("batch invariant broken", ["--stages", "1", "--train-batch", "5"], ["train_batch_size", "5"]),
    ("missing data", ["--stages", "1", "--data-missing"], ["manifest"]),
])
def test_bad_training_input(kidney_shards: Path, tmp_path: Path, case: str, extra: list[str], words: list[str]) -> None:
    args = ["--data", str(tmp_path / "nowhere" if "--data-missing" in extra else kidney_shards),
            "--out", str(tmp_path / "run"), "--steps", "1"]
    changes = {}
    if "--zero" in extra:
        changes["zero_optimization"] = {"stage": int(extra[extra.index("--zero") + 1])}
    if "--train-batch" in extra:
        changes["train_batch_size"] = int(extra[extra.index("--train-batch") + 1])
    args += ["--deepspeed_config", str(_ds_config(tmp_path, **changes)), "--stages", extra[1]]
    proc = _run("ds_seg3d.train", *args)
    _assert_one_line_error(proc, *words)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_without_checkpoint(kidney_shards: Path, tmp_path: Path) -> None:
    proc = _run("ds_seg3d.train", "--data", str(kidney_shards), "--out", str(tmp_path / "run"),
                "--stages", "1", "--steps", "1", "--resume")
    _assert_one_line_error(proc, "checkpoint")


def test_predict_without_checkpoint(tmp_path: Path) -> None:
    real = SAMPLE_CT / "example_ct_sm.nii.gz"
    proc = _run("ds_seg3d", "predict", "--checkpoint", str(tmp_path / "norun"), "--out", str(tmp_path / "o"), str(real))
    _assert_one_line_error(proc, "run.json")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def _run_folder(tmp_path: Path, trained_width: int, poison_layer: int | None = None) -> Path:
    """A run folder for a 4-wide U-Net whose layer files come from a ``trained_width``-wide one (with NaN in
    the first weight of ``poison_layer``)."""
    import torch

    from ds_seg3d.models import build_layers
    from ds_seg3d.models.layers import build_sequential
    from ds_seg3d.models.unet3d import UNet3DConfig

    run = tmp_path / "run"
    tag_dir = run / "checkpoints" / "step0000001"
    tag_dir.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step0000001")
    trained = build_sequential(build_layers("unet3d", UNet3DConfig(levels=3, base_width=trained_width,
                                                                    convs_per_level=1)))
    for i, layer in enumerate(trained):
        state = layer.state_dict()
        if i == poison_layer:
            first = next(k for k, v in state.items() if v.is_floating_point() and v.numel())
            state[first].view(-1)[0] = float("nan")
        torch.save(state, tag_dir / f"layer_{i:02d}-model_states.pt")
    info = {"model": {"name": "unet3d", "config": {"in_channels": 1, "num_classes": 2, "levels": 3,
                                                     "base_width": 4, "max_width": 256, "convs_per_level": 1}},
            "labels": {"background": 0, "kidney": 1},
            "preprocessing": {"modality": "CT", "target_spacing": [3, 3, 3], "normalisation": {}},
            "experiment": {"data": {"patch": [32, 32, 16]}, "train": {"seed": 0}}}
    (run / "run.json").write_text(json.dumps(info))
    return run


def test_predict_with_checkpoint_of_a_different_model(tmp_path: Path) -> None:
    """A run folder whose layer files come from another width: refused, naming the layer file."""
    run = _run_folder(tmp_path, trained_width=8)
    real = SAMPLE_CT / "example_ct_sm.nii.gz"
    proc = _run("ds_seg3d", "predict", "--checkpoint", str(run), "--out", str(tmp_path / "o"), str(real))
    _assert_one_line_error(proc, "layer_00-model_states.pt", "does not match")


def test_predict_refuses_non_finite_weights(tmp_path: Path) -> None:
    """A checkpoint of a diverged run (NaN in one layer): refused, naming that layer's file; no labels."""
    run = _run_folder(tmp_path, trained_width=4, poison_layer=1)
    real = SAMPLE_CT / "example_ct_sm.nii.gz"
    proc = _run("ds_seg3d", "predict", "--checkpoint", str(run), "--out", str(tmp_path / "o"), str(real))
    _assert_one_line_error(proc, "layer_01-model_states.pt", "non-finite")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
