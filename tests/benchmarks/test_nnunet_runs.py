"""The nnU-Net side of ``benchmarks/bench_vs_nnunet.py``: plans matched to a ds-seg3d plan, the budget trainer."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import nnunet_runs

RUN_3D = {"configuration": "3d", "patch": [56, 48, 40], "spacing": [1.2, 1.1, 3.0], "median_shape": [80, 70, 30],
          "params": {"levels": 4, "base_width": 8, "max_width": 40, "convs_per_level": 2,
                     "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2], [1, 2, 2]],
                     "kernels": [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]]}}
RUN_2D = {"configuration": "2d", "patch": [96, 80, 17], "spacing": [1.2, 1.1, 3.0],
          "params": {"levels": 3, "base_width": 8, "max_width": 128, "convs_per_level": 2,
                     "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 1]], "kernels": [[3, 3, 1], [3, 3, 1], [3, 3, 1]]}}


def _config(dims: int) -> dict:
    return {"data_identifier": f"nnUNetPlans_{dims}d", "batch_size": 9, "patch_size": [1] * dims, "spacing": [1.0] * dims,
            "architecture": {"network_class_name": "PlainConvUNet",
                             "arch_kwargs": {"n_stages": 6, "features_per_stage": [32] * 6, "conv_bias": True},
                             "_kw_requires_import": ["conv_op"]}}


def _plans(transpose_forward: list[int]) -> dict:
    return {"plans_name": "nnUNetPlans", "transpose_forward": transpose_forward,
            "configurations": {"2d": _config(2), "3d_fullres": _config(3), "3d_lowres": _config(3)}}


def test_3d_plan_in_nnunet_axis_order() -> None:
    plans = _plans([0, 1, 2])  # SimpleITK order (z, y, x), no further transpose
    out = nnunet_runs.matched_plans(plans, RUN_3D, samples_per_step=2, plans_name="P")
    assert list(out["configurations"]) == ["3d_fullres"] and out["plans_name"] == "P"
    c = out["configurations"]["3d_fullres"]
    assert c["patch_size"] == [40, 48, 56] and c["spacing"] == [3.0, 1.1, 1.2] and c["batch_size"] == 2
    assert c["data_identifier"] == "P_3d_fullres" and c["median_image_size_in_voxels"] == [30, 70, 80]
    kw = c["architecture"]["arch_kwargs"]
    assert kw["n_stages"] == 4 and kw["features_per_stage"] == [8, 16, 32, 40]
    assert kw["strides"] == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert kw["kernel_sizes"] == [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert kw["n_conv_per_stage"] == [2] * 4 and kw["n_conv_per_stage_decoder"] == [2] * 3
    assert kw["conv_bias"] is True  # nnU-Net's other settings stay
    assert plans["configurations"]["3d_fullres"]["batch_size"] == 9  # the input is not changed


def test_transpose_forward_is_applied() -> None:
    out = nnunet_runs.matched_plans(_plans([2, 0, 1]), RUN_3D, samples_per_step=1)
    # nnU-Net axis i is SimpleITK axis tf[i], i.e. nibabel axis 2 - tf[i]: x, z, y
    assert out["configurations"]["3d_fullres"]["patch_size"] == [56, 40, 48]


def test_2d_plan_takes_the_slices_as_batch() -> None:
    out = nnunet_runs.matched_plans(_plans([0, 1, 2]), RUN_2D, samples_per_step=2)
    c = out["configurations"]["2d"]
    assert c["patch_size"] == [80, 96] and c["spacing"] == [1.1, 1.2] and c["batch_size"] == 34
    assert c["architecture"]["arch_kwargs"]["strides"] == [[1, 1], [2, 2], [2, 2]]
    assert c["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32]
    with pytest.raises(ValueError, match="different planes"):
        nnunet_runs.matched_plans(_plans([1, 0, 2]), RUN_2D, samples_per_step=2)


def test_budget_is_exact_and_keeps_nnunets_validation_ratio() -> None:
    assert nnunet_runs.budget(500) == (10, 50, 10)
    assert nnunet_runs.budget(4) == (1, 4, 1)
    epochs, per_epoch, _ = nnunet_runs.budget(101)
    assert epochs * per_epoch == 101
    with pytest.raises(ValueError):
        nnunet_runs.budget(0)


def test_trainer_changes_only_the_budget(tmp_path: Path) -> None:
    pytest.importorskip("nnunetv2")
    name = nnunet_runs.write_trainer(tmp_path, 120).stem
    spec = importlib.util.spec_from_file_location(name, tmp_path / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    cls = getattr(module, name)
    assert cls.__bases__ == (nnUNetTrainer,)
    assert set(vars(cls)) - {"__module__", "__doc__", "__qualname__", "__dict__", "__weakref__", "__firstlineno__",
                             "__static_attributes__"} == {"__init__"}
    src = (tmp_path / f"{name}.py").read_text()
    assert "self.num_epochs = 3" in src and "self.num_iterations_per_epoch = 40" in src
    assert "self.num_val_iterations_per_epoch = 8" in src
