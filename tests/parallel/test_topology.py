"""Topology: sizes, rank order identical to DeepSpeed's, in-flight counts of its 1F1B schedule, errors."""
from __future__ import annotations

import dataclasses

import pytest
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

from ds_seg3d.parallel.topology import Topology, in_flight

LAYOUTS = [(1, 1), (2, 1), (2, 2), (4, 2), (6, 3), (8, 2), (8, 4), (12, 3)]


@pytest.mark.parametrize(
    "world, stages, micro, accum, dp, train_batch",
    [
        (1, 1, 1, 1, 1, 1),
        (2, 2, 1, 2, 1, 2),
        (4, 2, 1, 2, 2, 4),
        (8, 2, 2, 4, 4, 32),
        (6, 3, 3, 1, 2, 6),
        (16, 4, 1, 8, 4, 32),
    ],
)
def test_sizes(world, stages, micro, accum, dp, train_batch):
    topo = Topology(world, stages, micro, accum)
    assert topo.dp == dp
    assert topo.train_batch == train_batch


@pytest.mark.parametrize("world, stages", LAYOUTS)
def test_rank_order_matches_deepspeed(world, stages):
    topo = Topology(world, stages)
    ds = PipeDataParallelTopology(num_pp=stages, num_dp=world // stages)
    for rank in range(world):
        coord = ds.get_coord(rank)
        assert topo.stage_of(rank) == coord.pipe
        assert topo.dp_rank_of(rank) == coord.data
        assert topo.rank_of(coord.pipe, coord.data) == rank
        assert topo.is_first_stage(rank) == (coord.pipe == 0)
        assert topo.is_last_stage(rank) == (coord.pipe == stages - 1)
    for stage in range(stages):
        assert topo.ranks_of_stage(stage) == ds.filter_match(pipe=stage)
    converted = topo.to_deepspeed()
    assert converted.get_dim("pipe") == stages and converted.get_dim("data") == world // stages
    assert converted.mapping == ds.mapping


def _schedule_peak_in_flight(stages: int, stage: int, micro_batches: int) -> int:
    """Run DeepSpeed's own TrainSchedule and count forwards not yet matched by a backward."""
    live = peak = 0
    for step in schedule.TrainSchedule(micro_batches=micro_batches, stages=stages, stage_id=stage):
        for cmd in step:
            if isinstance(cmd, schedule.ForwardPass):
                live += 1
                peak = max(peak, live)
            elif isinstance(cmd, schedule.BackwardPass):
                live -= 1
    assert live == 0
    return peak


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("micro_batches", [1, 2, 3, 4, 6])
def test_in_flight_matches_deepspeed_schedule(stages, micro_batches):
    topo = Topology(stages * 2, stages, grad_accum=micro_batches)
    for stage in range(stages):
        expected = _schedule_peak_in_flight(stages, stage, micro_batches)
        assert topo.in_flight(stage) == expected
        assert in_flight(stage, stages, micro_batches) == expected


def test_describe_lists_every_rank_and_role():
    topo = Topology(6, 3, micro_batch=1, grad_accum=4)
    lines = topo.describe().splitlines()
    assert "dp=2" in lines[0] and "train_batch=8" in lines[0]
    rows = lines[2:]
    assert len(rows) == 6
    for rank, row in enumerate(rows):
        fields = row.split()
        assert int(fields[0]) == rank
        assert int(fields[1]) == topo.stage_of(rank)
        assert int(fields[2]) == topo.dp_rank_of(rank)
        assert int(fields[3]) == topo.in_flight(topo.stage_of(rank))
        assert ("images" in row) == topo.is_first_stage(rank)
        assert ("labels+loss" in row) == topo.is_last_stage(rank)


def test_single_stage_ranks_do_everything():
    row = Topology(1, 1).describe().splitlines()[2]
    assert "images" in row and "labels+loss" in row


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world_size=4, stages=3), "stages=3 does not divide world_size=4; choose stages from {1, 2, 4}"),
        (dict(world_size=4, stages=0), "stages must be >= 1"),
        (dict(world_size=0, stages=1), "world_size must be >= 1"),
        (dict(world_size=2, stages=1, micro_batch=0), "micro_batch must be >= 1"),
        (dict(world_size=2, stages=1, grad_accum=0), "grad_accum must be >= 1"),
        (dict(world_size=2, stages=1, grad_accum=1.5), "grad_accum must be an integer"),
        (dict(world_size=2, stages=True), "stages must be an integer"),
    ],
)
def test_invalid_layouts_raise_one_line(kwargs, message):
    with pytest.raises(ValueError) as info:
        Topology(**kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_rank_and_stage_bounds():
    topo = Topology(4, 2)
    with pytest.raises(ValueError, match="rank 4 is outside 0..3"):
        topo.stage_of(4)
    with pytest.raises(ValueError, match="stage 2 is outside 0..1"):
        topo.in_flight(2)
    with pytest.raises(ValueError, match="dp_rank 2 is outside 0..1"):
        topo.rank_of(0, 2)


def test_frozen():
    topo = Topology(2, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        topo.stages = 1  # type: ignore[misc]
    assert topo.validate() is topo
