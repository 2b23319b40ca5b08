"""Partitioning: profiles of real layers, exact optimality against brute force, U-Net behaviour."""
from __future__ import annotations

import itertools
import random
import weakref
from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.utils import partition_uniform
from torch import nn

from ds_seg3d.models import build_layers
from ds_seg3d.models.unet3d import UNet3DConfig
from ds_seg3d.parallel.layer_profile import LayerProfile, profile_layers, scale_profile
from ds_seg3d.parallel.partition import (
    check_boundaries,
    compare_partitions,
    memory_partition,
    parameter_partition,
    partition_table,
    predicted_stage_bytes,
    profile_partition,
    stage_fixed_bytes,
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
    # the largest storage each layer saves, counted before or not: c2's is relu's output
    assert [p.largest_bytes for p in prof] == [1 * voxels * F32, 2 * voxels * F32, 2 * voxels * F32]


class SavesItsOutput(nn.Module):
    """sigmoid saves its own result: output -> grad_fn -> saved output, a cycle through autograd."""

    seen: list[weakref.ref] = []

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        inner = torch.exp(x * self.scale)  # exp saves its result too: an intermediate, not an output
        out = torch.sigmoid(inner)
        SavesItsOutput.seen += [weakref.ref(inner), weakref.ref(out)]
        return out


def test_profile_releases_every_tensor_it_saw():
    SavesItsOutput.seen = []
    defs = [_def(nn.Conv3d, 1, 2, 3, padding=1), _def(SavesItsOutput), _def(SavesItsOutput)]
    prof = profile_layers(defs, (1, 1, 8, 8, 8))
    assert len(SavesItsOutput.seen) == 4 and prof[1].saved_bytes > 0
    # nothing needs the collector: reference counting alone frees every saved tensor and output
    assert all(ref() is None for ref in SavesItsOutput.seen)


def test_profile_leaves_no_live_tensor_bytes():
    from ds_seg3d.memory.measurement import PeakTracker

    defs = build_layers("unet3d", UNet3DConfig(levels=3, base_width=4, convs_per_level=1))
    tracker = PeakTracker().start()
    with tracker.window("profile"):
        profile_layers(defs, (1, 1, 16, 16, 16))
    tracker.stop()
    window = tracker.result("profile")
    assert window.peak > window.start  # the profile did allocate
    assert window.end == window.start


def test_profile_counts_shared_storages_once_and_distinct_ones_apart():
    # two identical layers: their intermediates may reuse freed addresses, but each layer's own
    # saved tensors are distinct and must be counted for each
    defs = [_def(SavesItsOutput), _def(SavesItsOutput)]
    voxels = 4 * 4 * 4
    prof = profile_layers(defs, (1, 1, 4, 4, 4))
    # each layer saves x (for the mul's scale gradient), exp's result and its sigmoid output; layer 2's
    # x is layer 1's output, already counted
    assert prof[0].saved_bytes == 3 * voxels * F32
    assert prof[1].saved_bytes == 2 * voxels * F32


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


# ---------------------------------------------------------------- what a stage holds once


def _layer(saved, inp, out, largest=0):
    return LayerProfile(name="l", saved_bytes=saved, input_bytes=inp, output_bytes=out, param_bytes=0,
                        largest_bytes=largest)


@pytest.mark.parametrize("one_copy", [True, False])
def test_stage_fixed_bytes_terms(monkeypatch, one_copy):
    monkeypatch.setenv("DS_SEG3D_ONE_COPY", "1" if one_copy else "0")
    copies = 0 if one_copy else 2  # DeepSpeed's own receive path: receive buffer and forward clone
    prof = [_layer(30, 1, 2, 5), _layer(20, 2, 3, 7), _layer(10, 3, 4, 1)]
    # first stage: nothing received; sends, so the next stage's gradient arrives in output[1]
    assert stage_fixed_bytes(prof, 0, 2) == 3 + max(1 + 2 + 5, 2 + 3 + 7)
    # middle: (receive buffer and forward clone), gradient buffer, working set
    middle = [_layer(1, 1, 1), *prof]
    assert stage_fixed_bytes(middle, 1, 3) == copies * 1 + 3 + max(1 + 2 + 5, 2 + 3 + 7)
    # last: the loss's logits-sized tensors instead of a gradient buffer
    assert stage_fixed_bytes(prof, 2, 3, loss_tensors=5) == copies * 3 + (3 + 4 + 1) + 5 * 4
    assert stage_fixed_bytes(prof, 0, 3, loss_tensors=0) == max(1 + 2 + 5, 2 + 3 + 7, 3 + 4 + 1)


def _peak(prof, parts, micro):
    return max(r.peak_activation_bytes for r in predicted_stage_bytes(prof, parts, micro))


def test_profile_partition_is_optimal_for_its_cost_on_random_profiles():
    rng = random.Random(3)
    for _ in range(120):
        n = rng.randint(1, 7)
        stages = rng.randint(1, min(n, 4))
        micro = rng.randint(1, 4)
        prof = [_layer(rng.randint(0, 100), rng.randint(1, 40), rng.randint(1, 40), rng.randint(0, 60))
                for _ in range(n)]
        parts = profile_partition(prof, stages, micro)
        check_boundaries(parts, n, stages)
        best = min(_peak(prof, [0, *cuts, n], micro) for cuts in itertools.combinations(range(1, n), stages - 1))
        assert _peak(prof, parts, micro) == best


def test_the_loss_and_full_resolution_tail_push_layers_off_the_last_stage():
    # a deep-CNN-like profile: 20 equal low-resolution layers, then a full-resolution upsampling
    # layer and a head whose logits feed the loss
    body = [_layer(2, 1, 1, 1) for _ in range(20)]
    prof = [*body, _layer(16, 1, 8, 8), _layer(0, 8, 3, 8)]
    held_only = memory_partition([p.saved_bytes for p in prof], 2, 1, [p.input_bytes for p in prof])
    full = profile_partition(prof, 2, 1)
    assert full[1] > held_only[1], "the last stage should get fewer layers once its loss is counted"
    assert _peak(prof, full, 1) < _peak(prof, held_only, 1)
    rows = predicted_stage_bytes(prof, full, 1)
    assert rows[-1].fixed_bytes > rows[0].fixed_bytes
