"""Partitioning: profiles of real layers, exact optimality against brute force, U-Net behaviour."""
from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.utils import partition_uniform
from torch import nn

from ds_seg3d.models import build_layers
from ds_seg3d.models.unet3d import UNet3DConfig
from ds_seg3d.parallel.partition import (
    check_boundaries,
    compare_partitions,
    memory_partition,
    parameter_partition,
    partition_table,
    predicted_stage_bytes,
    profile_layers,
    profile_partition,
    scale_profile,
    uniform_partition,
)
from ds_seg3d.parallel.topology import in_flight

F32 = 4  # bytes per float32 element


def _def(cls, *args, name="", **kwargs):
    return SimpleNamespace(cls=cls, args=args, kwargs=kwargs, name=name)


class IntOutput(nn.Module):
    def forward(self, x):
        return x.argmax(dim=1)


# ---------------------------------------------------------------- profiling


def test_profile_of_conv_relu_conv():
    defs = [_def(nn.Conv3d, 1, 2, 3, padding=1, name="c1"), _def(nn.ReLU, name="relu"), _def(nn.Conv3d, 2, 3, 1, name="c2")]
    voxels = 4 * 4 * 4
    prof = profile_layers(defs, (1, 1, 4, 4, 4))
    assert [p.name for p in prof] == ["c1", "relu", "c2"]
    # c1 keeps its input for the weight gradient (its weight is model state, not counted);
    # relu keeps its output; c2 keeps its input, which is that same relu output: counted once.
    assert [p.saved_bytes for p in prof] == [1 * voxels * F32, 2 * voxels * F32, 0]
    assert [p.input_bytes for p in prof] == [1 * voxels * F32, 2 * voxels * F32, 2 * voxels * F32]
    assert [p.output_bytes for p in prof] == [2 * voxels * F32, 2 * voxels * F32, 3 * voxels * F32]
    assert [p.param_bytes for p in prof] == [(2 * 27 + 2) * F32, 0, (3 * 2 + 3) * F32]


def test_profile_leaves_rng_alone_and_rejects_integer_activations():
    state = torch.get_rng_state()
    profile_layers([_def(nn.Conv3d, 1, 2, 1)], (1, 1, 2, 2, 2))
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="layer 1 .* returns a torch.int64 tensor"):
        profile_layers([_def(nn.Conv3d, 1, 2, 1), _def(IntOutput)], (1, 1, 2, 2, 2))


def test_unet_skip_tuples_count_each_tensor_once():
    defs = build_layers("unet3d", UNet3DConfig(levels=3, base_width=4, convs_per_level=1))
    prof = profile_layers(defs, (1, 1, 8, 8, 8))
    # enc1 passes f0 (4 ch at 8^3) through and appends f1 (8 ch at 4^3): both are outputs.
    assert prof[1].output_bytes == (4 * 8**3 + 8 * 4**3) * F32
    assert prof[1].input_bytes == prof[0].output_bytes == 4 * 8**3 * F32
    assert all(p.saved_bytes >= 0 for p in prof) and prof[0].saved_bytes > 0


def test_scale_profile_by_element_count():
    defs = [_def(nn.Conv3d, 1, 2, 3, padding=1), _def(nn.ReLU)]
    small = profile_layers(defs, (1, 1, 4, 4, 4))
    scaled = scale_profile(small, (1, 1, 4, 4, 4), (2, 1, 8, 8, 8))
    measured = profile_layers(defs, (2, 1, 8, 8, 8))
    assert scaled == measured
    assert [p.saved_bytes for p in scaled] == [16 * p.saved_bytes for p in small]
    assert [p.param_bytes for p in scaled] == [p.param_bytes for p in small]
    with pytest.raises(ValueError, match="same rank"):
        scale_profile(small, (1, 4, 4, 4), (1, 1, 8, 8, 8))


# ---------------------------------------------------------------- exact DP vs brute force


def _objective(boundaries, layer_bytes, micro_batches, input_bytes=None):
    stages = len(boundaries) - 1
    worst = 0
    for s in range(stages):
        a, b = boundaries[s], boundaries[s + 1]
        cost = sum(layer_bytes[a:b]) + (input_bytes[a] if input_bytes else 0)
        worst = max(worst, cost * in_flight(s, stages, micro_batches))
    return worst


def _brute_force(layer_bytes, stages, micro_batches, input_bytes=None):
    n = len(layer_bytes)
    return min(
        _objective([0, *cuts, n], layer_bytes, micro_batches, input_bytes)
        for cuts in itertools.combinations(range(1, n), stages - 1)
    )


@pytest.mark.parametrize("with_inputs", [False, True])
def test_memory_partition_is_optimal_on_random_cases(with_inputs):
    rng = random.Random(1 if with_inputs else 0)
    for _ in range(150):
        n = rng.randint(1, 8)
        stages = rng.randint(1, min(n, 4))
        micro = rng.randint(1, 5)
        layer_bytes = [rng.randint(0, 100) for _ in range(n)]
        inputs = [rng.randint(0, 40) for _ in range(n)] if with_inputs else None
        parts = memory_partition(layer_bytes, stages, micro, inputs)
        check_boundaries(parts, n, stages)
        assert _objective(parts, layer_bytes, micro, inputs) == _brute_force(layer_bytes, stages, micro, inputs)


def test_parameter_partition_is_minimax_on_random_cases():
    rng = random.Random(2)
    for _ in range(100):
        n = rng.randint(1, 8)
        stages = rng.randint(1, min(n, 4))
        counts = [rng.randint(0, 1000) for _ in range(n)]
        parts = parameter_partition(counts, stages)
        check_boundaries(parts, n, stages)
        best = min(
            max(sum(counts[a:b]) for a, b in zip([0, *cuts], [*cuts, n]))
            for cuts in itertools.combinations(range(1, n), stages - 1)
        )
        assert max(sum(counts[a:b]) for a, b in zip(parts, parts[1:])) == best


@pytest.mark.parametrize("n, stages", [(4, 4), (5, 2), (7, 3), (25, 4), (8, 8), (10, 3)])
def test_uniform_matches_deepspeed(n, stages):
    assert uniform_partition(n, stages) == partition_uniform(n, stages)


def test_too_few_layers_and_bad_boundaries():
    with pytest.raises(ValueError, match="cannot split 2 layers into 3 non-empty stages"):
        memory_partition([1, 2], 3, 1)
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        memory_partition([1, 2], 1, 0)
    with pytest.raises(ValueError, match="strictly increasing"):
        check_boundaries([0, 2, 2, 4], 4, 3)
    with pytest.raises(ValueError, match="start at 0 and end at the layer count 4"):
        check_boundaries([0, 2, 3], 4, 2)


# ---------------------------------------------------------------- U-Net-like profiles

# enc0..enc3, dec2..dec0, head: activations shrink 4x per level, parameters grow 8x.
UNET_BYTES = [100, 25, 6, 2, 6, 25, 100, 10]
UNET_PARAMS = [1, 8, 64, 512, 64, 8, 1, 1]


def test_memory_partition_isolates_high_resolution_ends():
    stages, micro = 3, 1
    mem = memory_partition(UNET_BYTES, stages, micro)
    par = parameter_partition(UNET_PARAMS, stages)
    # Balancing parameters gives the bottleneck a stage and lumps each high-res end with others;
    # balancing memory gives the full-resolution encoder and decoder layers stages of their own.
    assert par[1:3] == [3, 4]
    assert mem[1] == 1, "stage 0 should hold only the full-resolution encoder layer"
    assert mem[-2] == 6, "the last stage should start at the full-resolution decoder layer"
    assert _objective(mem, UNET_BYTES, micro) < _objective(par, UNET_BYTES, micro)


def test_in_flight_pushes_layers_off_the_first_stage():
    layer_bytes = [10] * 8
    one = memory_partition(layer_bytes, 2, 1)
    many = memory_partition(layer_bytes, 2, 4)
    assert one == [0, 4, 8]
    # stage 0 holds 2 micro-batches, stage 1 one: stage 0 should get about a third of the layers
    assert many[1] < one[1]
    assert _objective(many, layer_bytes, 4) <= _objective(one, layer_bytes, 4)


def test_real_unet_profile_and_table():
    defs = build_layers("unet3d", UNet3DConfig(levels=3, base_width=4, convs_per_level=1))
    prof = scale_profile(profile_layers(defs, (1, 1, 8, 8, 8)), (1, 1, 8, 8, 8), (1, 1, 32, 32, 32))
    splits = compare_partitions(prof, 2, 2)
    assert set(splits) == {"uniform", "parameters", "memory"}
    assert splits["memory"] == profile_partition(prof, 2, 2)
    peaks = {
        name: max(s.peak_activation_bytes for s in predicted_stage_bytes(prof, parts, 2))
        for name, parts in splits.items()
    }
    assert peaks["memory"] <= min(peaks.values())
    rows = predicted_stage_bytes(prof, splits["memory"], 2)
    assert [r.in_flight for r in rows] == [2, 1]
    for r in rows:
        assert r.activation_bytes == prof[r.start].input_bytes + sum(p.saved_bytes for p in prof[r.start:r.stop])
        assert r.param_bytes == sum(p.param_bytes for p in prof[r.start:r.stop])
    table = partition_table(prof, splits["memory"], 2)
    assert len(table.splitlines()) == 2 + len(rows)
    assert f"boundaries={splits['memory']}" in table
    assert prof[0].name in table
