"""``ds-seg3d plan SHARDS``: a dataset's 3D and 2D networks, sized for the memory of the whole pipeline.

nnU-Net sizes its patch for one 8 GB GPU with a count of feature-map voxels. Here the same planning loop
(``ds_seg3d.planning.plans.plan_network``) asks this project's memory prediction instead, for the
layout the run will use (``--ranks`` ranks as ``--stages`` pipeline stages, the DeepSpeed config's
micro-batches, ZeRO-1, the memory partition), so that more stages buy a larger patch. The loop runs on a
fast estimate (the partition's per-layer profile plus model states, ``quick_peak``); the patch it
settles on is then predicted by the calibrated ``MemoryModel`` (within +-10 % of measured peaks, see
BENCHMARKS.md), and when that says it does not fit, the estimate is scaled by their ratio and the loop
runs again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ds_seg3d.data.shard_format import load_manifest
from ds_seg3d.memory.spec import RunSpec
from ds_seg3d.models import count_parameters
from ds_seg3d.parallel.layer_profile import stage_profile
from ds_seg3d.parallel.partition import predicted_stage_bytes, profile_partition
from ds_seg3d.planning.plans import NetworkPlan, Plans, median_training_shape, plan_network

GIB = 2**30
ROUNDS = 5
"""Estimate-then-verify rounds before giving up on the calibrated model agreeing."""


def quick_peak(spec: RunSpec) -> int:
    """The largest stage's held activations and fixed buffers (the partition's cost model) plus its model
    states and a ZeRO bucket: seconds to compute, and it ranks patches as the calibrated model does."""
    from ds_seg3d.memory.prediction import states_bytes

    defs = spec.layer_defs()
    profile = stage_profile(defs, spec.sample_shape, dtype=spec.dtype)
    bounds = [0, len(defs)] if spec.stages == 1 else profile_partition(profile, spec.stages, spec.micro_batches)
    counts = [count_parameters([d]) for d in defs]
    peaks = []
    for st in predicted_stage_bytes(profile, bounds, spec.micro_batches):
        states = states_bytes(sum(counts[st.start:st.stop]), spec)
        peaks.append(st.peak_activation_bytes + states.params + states.grads + states.optimizer
                     + states.buckets_backward)
    return max(peaks)


def plan_shards(folder: str | Path, budget_gb: float, ranks: int, *, stages: int | None = None,
                micro_batches: int = 2, precision: str = "fp32", base_width: int = 32, deep_supervision: bool = True,
                device: str = "cpu", verify: bool = True, configurations: tuple[str, ...] = ("3d", "2d")) -> Plans:
    """Plan the shards' networks for ``budget_gb`` GiB per rank over ``ranks`` ranks; nothing is written."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    stages = stages or ranks
    if budget_gb <= 0 or ranks < 1 or stages < 1 or ranks % stages:
        raise ValueError(f"need a positive budget and --stages dividing --ranks, got {budget_gb} GiB, "
                         f"{ranks} ranks, {stages} stages")
    budget = int(budget_gb * GIB)
    classes = len(manifest["labels"])
    spacing, median = tuple(manifest["target_spacing"]), median_training_shape(manifest)
    layout = (f"{budget_gb:g} GiB per rank, {ranks} ranks as {stages} pipeline stages x {ranks // stages} "
              f"data-parallel, {micro_batches} micro-batches, ZeRO-1, {precision}")

    def spec_of(model: str, params: dict[str, Any], patch: tuple[int, int, int]) -> RunSpec:
        n_stages = min(stages, 2 * int(params["levels"]))  # a U-Net of L levels has 2L layers
        return RunSpec(model=model, params=tuple(params.items()), patch=patch, stages=n_stages,
                       ranks=n_stages * (ranks // stages), micro_batches=micro_batches, precision=precision,
                       classes=classes)

    planned: dict[str, NetworkPlan] = {}
    for configuration in configurations:
        voxels = None
        if configuration == "2d" and "3d" in planned:
            p3 = planned["3d"].patch
            voxels = p3[0] * p3[1] * p3[2]
        factor = 1.0
        for _ in range(ROUNDS):
            def fits(model: str, params: dict[str, Any], patch: tuple[int, int, int]) -> tuple[bool, float]:
                estimate = quick_peak(spec_of(model, params, patch)) * factor
                return estimate <= budget, estimate

            plan = plan_network(configuration, spacing, median, fits, base_width=base_width,
                                deep_supervision=deep_supervision, voxels_per_sample=voxels, reason=layout)
            if not verify:
                plan.notes.append(f"sized by the partition's fast estimate for {layout} (not calibrated)")
                break
            from ds_seg3d.memory.prediction import MemoryModel

            spec = spec_of(plan.model, plan.params, plan.patch)
            peak = MemoryModel(spec, device).predict(spec).max_peak
            if peak <= budget:
                plan.predicted_peak_bytes = float(peak)
                plan.notes.append(f"calibrated prediction for {layout}: largest rank {peak / GIB:.2f} GiB "
                                  f"(fast estimate x {factor:.2f})")
                break
            factor *= 1.02 * peak / quick_peak(spec)
        else:
            raise ValueError(f"{folder}: the calibrated planner and the fast estimate did not agree on a patch for "
                             f"{configuration} within {ROUNDS} rounds")
        planned[configuration] = plan
    target = {"budget_gb": budget_gb, "ranks": ranks, "stages": stages, "micro_batches": micro_batches,
              "precision": precision, "base_width": base_width, "calibrated": verify}
    return Plans(manifest.get("name", folder.name), target, planned)
