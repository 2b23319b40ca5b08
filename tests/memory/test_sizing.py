"""``ds-seg3d plan SHARDS``: the dataset's networks sized by the memory prediction of the whole pipeline."""
from __future__ import annotations

import math
from pathlib import Path

from ds_seg3d.__main__ import main
from ds_seg3d.memory.sizing import plan_shards, quick_peak
from ds_seg3d.memory.spec import RunSpec
from ds_seg3d.planning.plans import Plans

GIB = 2**30


def test_build_shards_leaves_a_default_plan(kidney_shards: Path) -> None:
    plans = Plans.load(kidney_shards)
    assert set(plans.configurations) == {"3d", "2d"}
    assert plans.target["budget_gb"] == 8.0 and plans.target["calibrated"] is False
    assert plans.configurations["3d"].params["base_width"] == 32  # nnU-Net's default target and widths


def test_a_smaller_budget_gets_a_smaller_patch_and_more_stages_a_larger_one(kidney_shards: Path) -> None:
    def patch(budget_gb: float, ranks: int) -> tuple[int, ...]:
        return plan_shards(kidney_shards, budget_gb, ranks, base_width=4, verify=False,
                           configurations=("3d",)).configurations["3d"].patch

    roomy, tight = patch(1.0, 1), patch(0.02, 1)
    assert math.prod(tight) < math.prod(roomy)
    assert math.prod(patch(0.02, 2)) > math.prod(tight)  # two stages share the activations


def test_the_fast_estimate_is_what_the_loop_compares_with_the_budget(kidney_shards: Path) -> None:
    plan = plan_shards(kidney_shards, 0.05, 2, base_width=4, verify=False, configurations=("3d",)).configurations["3d"]
    spec = RunSpec(model="unet3d", params=tuple(plan.params.items()), patch=plan.patch, stages=2, ranks=2,
                   micro_batches=2, classes=2)
    assert quick_peak(spec) == plan.predicted_peak_bytes <= 0.05 * GIB


def test_plan_command_checks_with_the_calibrated_model_and_writes_plans_json(kidney_shards: Path, tmp_path: Path,
                                                                             capsys) -> None:
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(kidney_shards, shards)
    (shards / "plans.json").unlink()
    rc = main(["plan", str(shards), "--budget-gb", "0.05", "--ranks", "2", "--base-width", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    plans = Plans.load(shards)
    for plan in plans.configurations.values():
        assert plan.predicted_peak_bytes <= 0.05 * GIB
        assert any("calibrated prediction" in n for n in plan.notes)
    assert out.count("calibrated prediction") == 2 and f"wrote {shards / 'plans.json'}" in out
    assert plans.target == {"budget_gb": 0.05, "ranks": 2, "stages": 2, "micro_batches": 2, "precision": "fp32",
                            "base_width": 4, "calibrated": True}
