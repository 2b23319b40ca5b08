"""What ``bench_vs_nnunet.py`` gives nnU-Net v2's own tools: their environment, plans matched to a ds-seg3d run, a budget trainer.

The benchmark runs the real nnU-Net (``nnunetv2`` from PyPI, the ``bench`` extra) through its command-line
tools: fingerprint, planner, preprocessor, trainer, post-processing and predictor. This module holds:

- ``environment``: nnU-Net's folders (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``), its
  data-augmentation processes, torch.compile off and its threads, for one child process only;
- ``matched_plans``: nnU-Net's plans with one configuration edited to a ds-seg3d run's spacing, patch,
  widths, per-axis strides and kernels and samples per step, so that both systems spend the same compute
  per iteration (``nnUNetv2_preprocess -plans_name`` then resamples to that spacing);
- ``write_trainer``: a subclass of nnU-Net's ``nnUNetTrainer`` that changes nothing but the number of
  epochs, iterations per epoch and validation iterations per epoch (nnU-Net's 5:1 ratio), handed to
  ``nnUNetv2_train -tr`` and ``nnUNetv2_predict -tr`` by ``nnunet_cli.py``;
- ``training_times``: seconds per epoch from the trainer's own checkpoint log.

Axes: ds-seg3d keeps nibabel's (x, y, z) order; nnU-Net reads NIfTI through SimpleITK, (z, y, x), and
then applies the plans' ``transpose_forward``. ``to_nnunet_axes`` maps one to the other.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MATCHED_PLANS = "nnUNetPlans_dsmatch"
VAL_RATIO = 5  # nnU-Net's default: 250 training and 50 validation iterations per epoch


def environment(root: Path, threads: int, da_processes: int) -> dict[str, str]:
    """The process environment for one nnU-Net command: this benchmark's folders, never the user's.

    ``da_processes`` 0 makes ``nnUNetv2_train`` augment in the training process (batchgenerators'
    SingleThreadedAugmenter); the planner needs a positive value (it sets its torch threads from it).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update({
        "nnUNet_raw": str(root / "nnUNet_raw"),
        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
        "nnUNet_results": str(root / "nnUNet_results"),
        "nnUNet_n_proc_DA": str(da_processes),
        "nnUNet_compile": "f",
        "OMP_NUM_THREADS": str(threads),
    })
    return env


def to_nnunet_axes(values: Sequence, transpose_forward: Sequence[int]) -> list:
    """A per-axis triple in nibabel's (x, y, z) order -> nnU-Net's array order after ``transpose_forward``."""
    return [values[2 - int(t)] for t in transpose_forward]


def widths(levels: int, base: int, cap: int) -> list[int]:
    """ds-seg3d's (and nnU-Net's) widths: the base doubling per level, capped."""
    return [min(base * 2 ** i, cap) for i in range(levels)]


def _edit(config: dict, plans_name: str, name: str, spacing: list, patch: list, batch: int,
          params: dict, strides: list, kernels: list, median: list | None) -> dict:
    config = copy.deepcopy(config)
    levels = int(params["levels"])
    convs = int(params.get("convs_per_level", 2))
    config.update({"data_identifier": f"{plans_name}_{name}", "spacing": [float(s) for s in spacing],
                   "patch_size": [int(p) for p in patch], "batch_size": int(batch)})
    if median is not None:  # informative only (nnU-Net's training and prediction do not read it)
        config["median_image_size_in_voxels"] = [float(m) for m in median]
    config["architecture"]["arch_kwargs"].update({
        "n_stages": levels,
        "features_per_stage": widths(levels, int(params["base_width"]), int(params["max_width"])),
        "kernel_sizes": kernels, "strides": strides,
        "n_conv_per_stage": [convs] * levels, "n_conv_per_stage_decoder": [convs] * (levels - 1),
    })
    return config


def matched_plans(plans: dict, run_plan: dict, samples_per_step: int, plans_name: str = MATCHED_PLANS) -> dict:
    """nnU-Net's plans with the configuration of a ds-seg3d run (``run.json``'s ``plan``) put in its place.

    A 3D run edits ``3d_fullres``; a 2D run (slice-wise network, patch x, y, slices) edits ``2d``, whose
    batch is then ``samples_per_step`` x the slices per sample. Other configurations are dropped.
    """
    tf = list(plans["transpose_forward"])
    params = run_plan["params"]
    spacing = to_nnunet_axes(run_plan["spacing"], tf)
    patch = to_nnunet_axes(run_plan["patch"], tf)
    strides = [to_nnunet_axes(s, tf) for s in params["strides"]]
    kernels = [to_nnunet_axes(k, tf) for k in params["kernels"]]
    median = to_nnunet_axes(run_plan["median_shape"], tf) if "median_shape" in run_plan else None
    out = copy.deepcopy(plans)
    out["plans_name"] = plans_name
    if run_plan["configuration"] == "3d":
        name, config = "3d_fullres", _edit(plans["configurations"]["3d_fullres"], plans_name, "3d_fullres",
                                           spacing, patch, samples_per_step, params, strides, kernels, median)
    elif run_plan["configuration"] == "2d":
        if 2 - tf[0] != 2:
            raise ValueError(f"nnU-Net slices along nibabel axis {2 - tf[0]} (transpose_forward {tf}), "
                             "ds-seg3d's 2D network along z: the two 2D networks would see different planes")
        if any(s[0] != 1 for s in strides) or any(k[0] != 1 for k in kernels):
            raise ValueError("the 2D run pools or convolves across slices; nnU-Net's 2d cannot match it")
        name, config = "2d", _edit(plans["configurations"]["2d"], plans_name, "2d", spacing[1:], patch[1:],
                                   samples_per_step * patch[0], params,
                                   [s[1:] for s in strides], [k[1:] for k in kernels],
                                   median[1:] if median is not None else None)
    else:
        raise ValueError(f"run plan configuration {run_plan['configuration']!r}: expected '3d' or '2d'")
    out["configurations"] = {name: config}
    return out


TRAINER = '''"""nnU-Net's nnUNetTrainer with only its budget changed (written by benchmarks/bench_vs_nnunet.py)."""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class {name}(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = {epochs}
        self.num_iterations_per_epoch = {per_epoch}
        self.num_val_iterations_per_epoch = {val}
'''


def budget(iterations: int, per_epoch: int = 50) -> tuple[int, int, int]:
    """(epochs, iterations per epoch, validation iterations per epoch) for ``iterations`` in all.

    nnU-Net's learning rate falls per epoch (poly schedule), so epochs stay short enough that the
    schedule has many steps; the total is exact (``per_epoch`` is reduced until it divides it).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    per_epoch = max(1, min(per_epoch, iterations))
    while iterations % per_epoch:
        per_epoch -= 1
    return iterations // per_epoch, per_epoch, max(1, per_epoch // VAL_RATIO)


def write_trainer(folder: Path, iterations: int, per_epoch: int = 50) -> Path:
    """Write the budget trainer into ``folder``; returns its file, named after its class."""
    epochs, per_epoch, val = budget(iterations, per_epoch)
    name = f"nnUNetTrainer_{epochs}x{per_epoch}it"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(TRAINER.format(name=name, epochs=epochs, per_epoch=per_epoch, val=val))
    return path


def training_times(fold_folder: Path) -> dict[str, Any]:
    """Seconds per epoch (median, first epoch left out when there are more) from ``checkpoint_final.pth``."""
    import statistics

    import torch

    ckpt = torch.load(fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    log = ckpt["logging"]
    spans = [e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]
    body = spans[1:] if len(spans) > 1 else spans
    return {"epochs": len(spans), "s_per_epoch": statistics.median(body),
            "final_pseudo_dice": [float(v) for v in log["dice_per_class_or_region"][-1]]}


def read_plans(preprocessed: Path, dataset: str, plans_name: str = "nnUNetPlans") -> dict:
    return json.loads((preprocessed / dataset / f"{plans_name}.json").read_text())
