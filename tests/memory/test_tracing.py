"""Counting live bytes on the meta device: the tracker, the kernel workspaces, the shared replays."""
from __future__ import annotations

import itertools

import pytest
import torch

from ds_seg3d.memory.live_bytes import LiveBytes, signature
from ds_seg3d.memory.replay import StageKey, canonical_key, effective_micro_batches
from ds_seg3d.memory.spec import RunSpec
from ds_seg3d.memory.workspace import KernelWorkspace, measure

F32 = torch.float32
MIB = 2**20


def test_live_bytes_counts_allocations_not_views_and_gives_back_what_dies():
    with LiveBytes() as mode:
        a = torch.empty(MIB // 4, device="meta")  # 1 MiB
        view = a.view(-1, 2)
        a.add_(1)
        assert mode.live == MIB and view is not None
        b = a * 2
        assert mode.live == 2 * MIB
        del a, view
        assert mode.live == MIB
        del b
    assert mode.live == 0 and mode.peak == 2 * MIB


def test_live_bytes_ignores_storages_made_outside_and_adds_workspace_while_the_op_runs():
    weight = torch.empty(MIB // 4, device="meta")
    x = torch.empty(MIB // 4, device="meta")
    sig = signature(torch.ops.aten.mul.Tensor, (x, weight), {})
    with LiveBytes({sig: 3 * MIB}) as mode:
        detached = weight.detach()  # a view of a storage the mode did not see made: no allocation
        assert mode.live == 0 and detached is not None
        y = x * weight
    assert mode.live == MIB and mode.peak == 4 * MIB and y is not None


def _instructions(key: StageKey) -> list[tuple[str, int]]:
    """The instructions that allocate or free (sends of activations only read; a gradient's receive fills
    a buffer allocated once)."""
    from deepspeed.runtime.pipe import schedule as sched

    kinds = (sched.LoadMicroBatch, sched.ForwardPass, sched.BackwardPass, sched.RecvActivation, sched.SendGrad)
    steps = sched.TrainSchedule(micro_batches=key.micro_batches, stages=key.stages, stage_id=key.stage).steps()
    return [(type(c).__name__, c.buffer_id) for cmds in steps for c in cmds if isinstance(c, kinds)]


def test_canonical_key_runs_the_same_instructions_as_the_stage_it_stands_for():
    for p, m in itertools.product(range(1, 9), (1, 2, 3, 4, 8)):
        for s in range(p):
            key = StageKey(3, 5, p, s, m, 0)
            small = canonical_key(key)
            assert small.stages <= max(p, 1) + 1 and small.micro_batches <= m
            steady = StageKey(3, 5, p, s, effective_micro_batches(key), 0)
            assert _instructions(small) == _instructions(steady), (p, s, m)
            assert (small.stage == 0, small.stage == small.stages - 1) == (s == 0, s == p - 1)


def test_kernel_workspace_is_measured_per_op_and_scales_with_the_patch():
    spec = RunSpec(model="unet3d", params={"levels": 2, "base_width": 4, "max_width": 8}, patch=(32, 32, 8))
    defs, shape = spec.layer_defs(), spec.sample_shape
    ops = measure(defs, shape, F32, "cpu")
    forward = [ws for name, ws in ops if name == "aten.convolution.default"]
    backward = [ws for name, ws in ops if name == "aten.convolution_backward.default"]
    assert len(backward) == len(forward) > 0
    assert max(backward) > 0  # a 3x3x3 convolution's backward needs buffers of its own
    ws = KernelWorkspace(defs, shape, 4, F32, slab_steps=(1, 2))
    small, large = ws.table(8), ws.table(16)
    assert {sig[0] for sig in small} == {sig[0] for sig in large}
    assert sum(large.values()) == pytest.approx(2 * sum(small.values()), rel=0.1)
