"""The time partition: per-layer forward + backward seconds and the split that minimises the slowest stage."""
from __future__ import annotations

import itertools
import math
import random

import torch

from ds_seg3d.models import build_layers
from ds_seg3d.models.unet3d import UNet3DConfig
from ds_seg3d.parallel.partition import check_boundaries
from ds_seg3d.parallel.timing import layer_seconds, stage_seconds, time_partition


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
