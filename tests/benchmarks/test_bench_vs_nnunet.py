"""``benchmarks/bench_vs_nnunet.py`` end to end at a tiny budget: real ds-seg3d ranks, real nnU-Net tools."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import psutil
import pytest
import torch

pytest.importorskip("nnunetv2")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_vs_nnunet  # noqa: E402
import vs_nnunet_report  # noqa: E402

from ds_seg3d.__main__ import main as ds_main  # noqa: E402


@pytest.mark.multirank
def test_both_systems_train_predict_and_are_scored_on_the_same_cases(kidney_shards: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(kidney_shards, shards)
    assert ds_main(["plan", str(shards), "--budget-gb", "0.1", "--ranks", "2", "--stages", "2", "--base-width", "4"]) == 0
    out = tmp_path / "bench"
    md = tmp_path / "EXPERIMENTS.md"
    md.write_text("# Experiments\n\n## Another section\n\nkept\n")
    arms = ["ds3d", "nnunet3d", "nnunet2d"]
    argv = ["--shards", str(shards), "--out", str(out), "--iterations", "4", "--arms", ",".join(arms), "--write-md", str(md)]
    assert bench_vs_nnunet.main(argv) == 0

    manifest = json.loads((shards / "manifest.json").read_text())
    test = sorted(manifest["splits"]["test"])
    records = {a: json.loads((out / "arms" / a / "arm.json").read_text()) for a in arms}
    for arm, rec in records.items():
        assert sorted(p.name for p in (out / "arms" / arm / "pred").glob("*.nii.gz")) == [f"{c}.nii.gz" for c in test]
        summary = rec["score"]["summary"][0]
        assert summary["label"] == "kidney" and int(summary["n_cases"]) == len(test)
        assert 0.0 <= float(summary["dice_mean"]) <= 1.0
        assert rec["train"]["wall_s"] > 0 and rec["train"]["peak_bytes"] > 100 * 2**20 and rec["s_per_iteration"] > 0
        assert isinstance(rec["postprocessing"], list)
        if arm.startswith("nnunet"):  # nnU-Net's raw predictions, then its post-processing step's output (scored)
            assert sorted(p.name for p in (out / "arms" / arm / "pred_raw").glob("*.nii.gz")) == [f"{c}.nii.gz" for c in test]

    # nnU-Net's 3d_fullres was planned to the ds-seg3d run's spacing, patch and widths (nibabel x, y, z -> z, y, x).
    ds_plan = records["ds3d"]["plan"]
    pre = next((out / "nnunet" / "nnUNet_preprocessed").glob("Dataset990_*"))
    matched = json.loads((pre / "nnUNetPlans_dsmatch.json").read_text())["configurations"]
    assert matched["3d_fullres"]["patch_size"] == ds_plan["patch"][::-1]
    assert matched["3d_fullres"]["spacing"] == [float(s) for s in ds_plan["spacing"][::-1]]
    assert matched["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] == records["ds3d"]["widths"]
    assert matched["3d_fullres"]["batch_size"] == records["ds3d"]["samples_per_step"] == 2
    # The 2d arm had no ds-seg3d run here: it matched the shards' planned 2D network, slices as batch.
    plan_2d = json.loads((shards / "plans.json").read_text())["configurations"]["2d"]
    assert matched["2d"]["patch_size"] == plan_2d["patch"][1::-1] and matched["2d"]["batch_size"] == 2 * plan_2d["patch"][2]

    # nnU-Net's trainer ran the budget: 1 epoch of 4 iterations, with the shards' split as fold 0.
    results = out / "nnunet" / "nnUNet_results" / pre.name / "nnUNetTrainer_1x4it__nnUNetPlans_dsmatch__3d_fullres" / "fold_0"
    ckpt = torch.load(results / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainer_1x4it" and len(ckpt["logging"]["epoch_end_timestamps"]) == 1
    assert sorted(json.loads((pre / "splits_final.json").read_text())[0]["val"]) == sorted(manifest["splits"]["val"])

    # Cleaned up: preprocessed arrays gone, no process left, nnU-Net's variables never set here.
    assert not [p for p in pre.iterdir() if p.is_dir()]
    assert not psutil.Process().children(recursive=True)
    assert not [k for k in os.environ if k.startswith("nnUNet_")]

    text = md.read_text()
    assert "## Another section\n\nkept" in text and vs_nnunet_report.SECTION in text
    for arm in arms:
        assert f"| {arm} |" in text

    # A rerun skips finished arms.
    before = {a: (out / "arms" / a / "arm.json").stat().st_mtime_ns for a in arms}
    assert bench_vs_nnunet.main(argv) == 0
    assert {a: (out / "arms" / a / "arm.json").stat().st_mtime_ns for a in arms} == before


def test_without_a_val_case_nnunet_trains_fold_all_and_decides_no_post_processing(tmp_path: Path) -> None:
    """Shards whose split has no validation case (one real scan, say): nnU-Net trains its fold ``all`` (every
    training case), as it must with too few cases for folds, and no post-processing is chosen."""
    from data_tools.build_shards import build_shards
    from data_tools.phantoms import write_msd_dataset

    src = write_msd_dataset(tmp_path / "phantoms", "kidney", 4, seed=5, shape=(48, 48, 24))
    shards = tmp_path / "shards"
    build_shards(src, shards, spacing=(1.5, 1.5, 3.0), workers=1, seed=0, val_fraction=0.0, test_fraction=0.25)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert not manifest["splits"]["val"] and len(manifest["splits"]["test"]) == 1
    assert ds_main(["plan", str(shards), "--budget-gb", "0.1", "--ranks", "2", "--stages", "2",
                    "--base-width", "4"]) == 0
    out = tmp_path / "bench"
    argv = ["--shards", str(shards), "--out", str(out), "--iterations", "2", "--arms", "nnunet3d"]
    assert bench_vs_nnunet.main(argv) == 0

    rec = json.loads((out / "arms" / "nnunet3d" / "arm.json").read_text())
    assert rec["postprocessing"] == [] and rec["epochs"] == 1
    pre = next((out / "nnunet" / "nnUNet_preprocessed").glob("Dataset990_*"))
    results = out / "nnunet" / "nnUNet_results" / pre.name / "nnUNetTrainer_1x2it__nnUNetPlans_dsmatch__3d_fullres"
    assert (results / "fold_all" / "checkpoint_final.pth").is_file() and not (results / "fold_0").exists()
    expected = [f"{c}.nii.gz" for c in manifest["splits"]["test"]]
    arm = out / "arms" / "nnunet3d"
    assert sorted(p.name for p in (arm / "pred_raw").glob("*.nii.gz")) == expected
    assert sorted(p.name for p in (arm / "pred").iterdir()) == expected  # the images only, scored as they are
    assert int(rec["score"]["summary"][0]["n_cases"]) == 1
