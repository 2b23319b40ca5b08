"""Planning a dataset's networks: nnU-Net's loop, plans.json, and how an experiment config uses a plan."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from ds_seg3d.config import ExperimentConfig, ModelConfig, apply_plan, load_config
from ds_seg3d.models import build_layers, check_patch
from ds_seg3d.planning.plans import PLANS_NAME, NetworkPlan, Plans, plan_network


def voxel_cap(limit: int):
    """A stand-in for the memory prediction: fits while the patch has at most ``limit`` voxels."""
    def fits(model, params, patch):
        n = math.prod(patch)
        return n <= limit, float(n)
    return fits


def test_3d_plan_follows_nnunet_and_shrinks_until_it_fits():
    spacing, median = (1.2, 1.2, 3.0), (160.0, 130.0, 60.0)
    roomy = plan_network("3d", spacing, median, voxel_cap(10**9), base_width=8)
    assert roomy.patch == (160, 160, 64)  # the median shape, padded to the strides' product (32, 32, 16)
    assert roomy.params["strides"][:2] == [[1, 1, 1], [2, 2, 1]] and roomy.params["kernels"][0] == [3, 3, 1]
    tight = plan_network("3d", spacing, median, voxel_cap(300_000), base_width=8)
    assert math.prod(tight.patch) <= 300_000 < math.prod(roomy.patch)
    assert tight.params["max_width"] == 80 and tight.params["deep_supervision"] is True  # cap 320 x 8 / 32
    cfg = ModelConfig(name="unet3d", params=tight.params).build_config(in_channels=1, num_classes=2)
    check_patch(cfg, tight.patch)
    assert any("reduction" in n for n in tight.notes) and any("nnU-Net: 32" in n for n in tight.notes)


def test_2d_plan_pools_in_plane_only_and_matches_the_3d_voxels_per_sample():
    plan = plan_network("2d", (1.2, 1.2, 3.0), (160.0, 130.0, 60.0), voxel_cap(10**9), base_width=8,
                        voxels_per_sample=96 * 96 * 32)
    assert plan.model == "cnn2d" and all(s[2] == 1 for s in plan.params["strides"])
    assert plan.patch[:2] == (160, 160) and plan.patch[2] == round(96 * 96 * 32 / (160 * 160))
    cfg = ModelConfig(name="cnn2d", params=plan.params).build_config(in_channels=1, num_classes=2)
    check_patch(cfg, plan.patch)
    assert build_layers("cnn2d", cfg)


def test_no_patch_fits_is_one_clear_error():
    with pytest.raises(ValueError, match="no patch fits"):
        plan_network("3d", (1.0, 1.0, 1.0), (64.0, 64.0, 64.0), voxel_cap(0), reason="no memory at all")


def test_plans_round_trip_through_plans_json(tmp_path: Path):
    plan = plan_network("3d", (1.0, 1.0, 2.0), (96.0, 96.0, 48.0), voxel_cap(10**9))
    plans = Plans("toy", {"budget_gb": 1.0}, {"3d": plan})
    path = plans.save(tmp_path)
    assert path.name == PLANS_NAME and "[2, 2, 2]" in path.read_text()  # strides on one line each
    assert Plans.load(tmp_path).to_json() == plans.to_json()
    with pytest.raises(ValueError, match="ds-seg3d plan"):
        Plans.load(tmp_path / "elsewhere")


def _plan() -> NetworkPlan:
    return plan_network("3d", (1.2, 1.2, 3.0), (96.0, 80.0, 40.0), voxel_cap(10**9), base_width=8)


def test_a_planned_config_takes_the_plans_network_and_patch():
    plan = _plan()
    cfg = apply_plan(ExperimentConfig(), plan)
    assert cfg.model.name == "unet3d" and cfg.model.params == plan.params and cfg.data.patch == plan.patch


def test_config_params_and_patch_override_the_plan():
    plan = _plan()
    cfg = apply_plan(load_config(None, ["model.params.base_width=4", "model.params.levels=3",
                                        "data.patch=32,32,16"]), plan)
    assert cfg.model.params["base_width"] == 4 and cfg.data.patch == (32, 32, 16)
    assert cfg.model.params["strides"] == plan.params["strides"][:3]  # the plan's first levels
    check_patch(cfg.model.build_config(in_channels=1, num_classes=2), cfg.data.patch)
    with pytest.raises(ValueError, match="the plan has"):
        apply_plan(load_config(None, ["model.params.levels=9"]), plan)


def test_a_named_network_ignores_the_plan():
    cfg = load_config(None, ["model.name=unet3d", "data.patch=32,32,16"])
    assert apply_plan(cfg, _plan()) is cfg


def test_the_2d_plan_is_chosen_by_model_plan():
    cfg = load_config(None, ["model.plan=2d"])
    plan = plan_network("2d", (1.2, 1.2, 3.0), (96.0, 80.0, 40.0), voxel_cap(10**9), base_width=8)
    assert apply_plan(cfg, plan).model.name == "cnn2d"
    with pytest.raises(ValueError, match="model.plan"):
        load_config(None, ["model.plan=4d"])
