"""A non-editable install into a fresh venv, used from an empty folder, as a user of the wheel would.

The wheel is built from this checkout, installed with its declared dependencies into a new venv (torch
pinned as the Makefile pins it), and every step of the workflow then runs from a folder that holds
nothing of the checkout, with the shipped DeepSpeed and experiment configs as the only defaults:
``ds-seg3d plan``, ``data-tools phantoms``, ``data-tools build-shards``, a 2-step training on 2 ranks
under the ``deepspeed`` launcher and ``ds-seg3d predict``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import REPO_ROOT, free_port, tail

pytestmark = [pytest.mark.install, pytest.mark.multirank]

TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail(out)}"
    return out


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    wheels, venv, work = tmp_path / "wheels", tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    host = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO_ROOT)],
         cwd=tmp_path, env=host)
    wheel, = wheels.glob("ds_seg3d-*.whl")
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=host)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    _run([*pip, TORCH_SPEC], cwd=tmp_path, env=host)
    _run([*pip, str(wheel)], cwd=tmp_path, env=host)

    env = {**host, "PATH": f"{venv / 'bin'}{os.pathsep}{host.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    where = _run(["python", "-c", "import ds_seg3d, data_tools; print(ds_seg3d.__file__, data_tools.__file__)"],
                 cwd=work, env=env)
    assert all(Path(p).is_relative_to(venv) for p in where.split()), where  # the installed copy, not the checkout

    plan = _run(["ds-seg3d", "plan", "--budget-gb", "1", "--ranks", "2", "--patch", "32", "32", "16",
                 "--set", "model.params.levels=3", "--set", "model.params.base_width=4"], cwd=work, env=env)
    assert " layouts fit, best first" in plan
    _run(["data-tools", "phantoms", "phantoms", "--task", "kidney", "--cases", "4", "--seed", "0",
          "--shape", "64", "64", "32"], cwd=work, env=env)
    _run(["data-tools", "build-shards", "phantoms", "shards", "--spacing", "1.5", "1.5", "3.0", "--seed", "0",
          "--val-fraction", "0.25", "--test-fraction", "0.25"], cwd=work, env=env)
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    test_image = manifest["cases"][manifest["splits"]["test"][0]]["image"]

    _run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ds_seg3d.train",
          "--data", "shards", "--out", "run", "--steps", "2", "--set", "data.patch=32,32,16",
          "--set", "model.params.levels=3", "--set", "model.params.base_width=4",
          "--set", "train.val_every=0", "--set", "train.val_max_cases=1"], cwd=work, env=env)
    info = json.loads((work / "run" / "run.json").read_text())
    assert info["deepspeed_config"]["zero_optimization"]["stage"] == 1  # the shipped default config
    assert (work / "run" / "checkpoints" / "latest").read_text().strip() == "step0000002"

    _run(["ds-seg3d", "predict", "--checkpoint", "run", "--out", "pred", test_image], cwd=work, env=env)
    assert (work / "pred" / Path(test_image).name).is_file() and (work / "pred" / "volumes.csv").is_file()
