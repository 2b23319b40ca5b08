"""The time partition: per-layer forward + backward seconds and the split that minimises the slowest stage."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from ds_seg3d.models import build_layers
from ds_seg3d.models.unet3d import UNet3DConfig
from ds_seg3d.parallel.layer_profile import LayerProfile
from ds_seg3d.parallel.partition import activation_cost, check_boundaries, profile_partition
from ds_seg3d.parallel.timing import (
    AUTO_SLACK,
    MODEL_STATE_COPIES,
    balanced_partition,
    layer_seconds,
    stage_seconds,
    time_partition,
)


def test_time_partition_is_minimax_on_random_cases():
    rng = random.Random(3)
    for _ in range(150):
        n = rng.randint(1, 8)
        stages = rng.randint(1, min(n, 4))
        seconds = [rng.uniform(0.0, 1.0) for _ in range(n)]
        parts = time_partition(seconds, stages)
        check_boundaries(parts, n, stages)
        best = min(max(stage_seconds(seconds, [0, *cuts, n])) for cuts in itertools.combinations(range(1, n), stages - 1))
        assert math.isclose(max(stage_seconds(seconds, parts)), best)


def test_a_slow_layer_gets_a_stage_of_its_own():
    assert time_partition([0.1, 0.1, 2.0, 0.1, 0.1], 3) == [0, 2, 3, 5]


def test_unet_layers_are_timed_through_skip_tuples_and_leave_the_rng_alone():
    defs = build_layers("unet3d", UNet3DConfig(levels=3, base_width=4, max_width=16, convs_per_level=1))
    state = torch.get_rng_state()
    seconds = layer_seconds(defs, (1, 1, 32, 32, 16), repeats=2)
    assert torch.equal(state, torch.get_rng_state())
    assert len(seconds) == len(defs) and all(s > 0 and math.isfinite(s) for s in seconds)
    check_boundaries(time_partition(seconds, 3), len(defs), 3)


def _profile(rng: random.Random, n: int) -> list[LayerProfile]:
    return [LayerProfile(name=f"l{i}", saved_bytes=rng.randint(0, 100), input_bytes=rng.randint(1, 50),
                         output_bytes=rng.randint(1, 50), param_bytes=rng.randint(0, 20),
                         largest_bytes=rng.randint(0, 30)) for i in range(n)]


def _stage_bytes(profile, stages, micro, parts):
    cost = activation_cost(profile, stages, micro)
    return [cost(s, a, b) + MODEL_STATE_COPIES * sum(p.param_bytes for p in profile[a:b])
            for s, (a, b) in enumerate(zip(parts, parts[1:]))]


def test_balanced_partition_is_the_fastest_split_that_fits_on_random_cases():
    rng = random.Random(5)
    constrained = 0
    for _ in range(150):
        n = rng.randint(2, 8)
        stages, micro = rng.randint(2, min(n, 4)), rng.randint(1, 8)
        seconds, profile = [rng.uniform(0.0, 1.0) for _ in range(n)], _profile(rng, n)
        splits = [[0, *cuts, n] for cuts in itertools.combinations(range(1, n), stages - 1)]
        need = sorted(max(_stage_bytes(profile, stages, micro, parts)) for parts in splits)
        budget = need[rng.randrange(len(need))]  # some splits fit, maybe not the fastest
        parts = balanced_partition(seconds, profile, stages, micro, budget)
        check_boundaries(parts, n, stages)
        assert max(_stage_bytes(profile, stages, micro, parts)) <= budget
        fits = [p for p in splits if max(_stage_bytes(profile, stages, micro, p)) <= budget]
        best = min(max(stage_seconds(seconds, p)) for p in fits)
        assert math.isclose(max(stage_seconds(seconds, parts)), best)
        constrained += best > max(stage_seconds(seconds, time_partition(seconds, stages))) + 1e-12
    assert constrained > 10  # the budget did bind often enough for the test to mean something


def test_balanced_partition_between_time_and_memory():
    rng = random.Random(11)
    seconds, profile = [rng.uniform(0.1, 1.0) for _ in range(7)], _profile(rng, 7)
    assert balanced_partition(seconds, profile, 3, 4, float("inf")) == time_partition(seconds, 3)
    memory = profile_partition(profile, 3, 4)
    tight = max(_stage_bytes(profile, 3, 4, memory))
    assert max(_stage_bytes(profile, 3, 4, balanced_partition(seconds, profile, 3, 4, tight))) <= tight
    with pytest.raises(ValueError, match="no split into 3 stages fits"):
        balanced_partition(seconds, profile, 3, 4, tight * 0.5)


def test_auto_without_budget_is_the_fastest_split_near_the_least_memory_and_never_fails():
    rng = random.Random(13)
    for _ in range(100):
        n = rng.randint(2, 8)
        stages, micro = rng.randint(2, min(n, 4)), rng.randint(1, 8)
        seconds, profile = [rng.uniform(0.0, 1.0) for _ in range(n)], _profile(rng, n)
        splits = [[0, *cuts, n] for cuts in itertools.combinations(range(1, n), stages - 1)]
        least = min(max(_stage_bytes(profile, stages, micro, p)) for p in splits)
        parts = balanced_partition(seconds, profile, stages, micro, None, strict=False)
        assert max(_stage_bytes(profile, stages, micro, parts)) <= AUTO_SLACK * least
        near = [p for p in splits if max(_stage_bytes(profile, stages, micro, p)) <= AUTO_SLACK * least]
        assert math.isclose(max(stage_seconds(seconds, parts)), min(max(stage_seconds(seconds, p)) for p in near))
        # a budget nothing fits: the least-memory split instead of an error
        fallback = balanced_partition(seconds, profile, stages, micro, least * 0.5, strict=False)
        assert math.isclose(max(_stage_bytes(profile, stages, micro, fallback)), least)
