"""The early-send order: every output sent once, right after its forward pass, and no stage waits for ever.

The pipeline is simulated instruction by instruction (sends posted, receives waiting for a matching
send) for 2-4 stages and 1-8 micro-batches. The same simulation with blocking sends (a send completes
only together with its receive) deadlocks on the moved order: the reason the sends had to stop blocking.
"""
from __future__ import annotations

import pytest
from deepspeed.runtime.pipe.schedule import (
    ForwardPass,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
    TrainSchedule,
)

from ds_seg3d.parallel import early_sends

CASES = [(stages, m) for stages in (2, 3, 4) for m in range(1, 9)]


def _stock(stages: int, m: int, stage: int) -> list:
    return [cmd for step in TrainSchedule(micro_batches=m, stages=stages, stage_id=stage).steps() for cmd in step]


def _early(stages: int, m: int, stage: int) -> list:
    schedule = early_sends._EarlySends(TrainSchedule(micro_batches=m, stages=stages, stage_id=stage))
    return [cmd for step in schedule for cmd in step]


def _runs_to_the_end(programs: list[list], blocking_sends: bool) -> bool:
    """Step every stage's instructions; a receive waits for its sender, a blocking send for its receiver."""
    at = [0] * len(programs)
    sent: dict[tuple[str, int], int] = {}  # (channel, receiving stage) -> messages posted
    taken: dict[tuple[str, int], int] = {}
    channel = {SendActivation: ("act", 1), RecvActivation: ("act", 0), SendGrad: ("grad", -1), RecvGrad: ("grad", 0)}

    def waiting_at(stage: int, kind: type) -> bool:
        return at[stage] < len(programs[stage]) and isinstance(programs[stage][at[stage]], kind)

    progress = True
    while progress:
        progress = False
        for s, program in enumerate(programs):
            if at[s] == len(program):
                continue
            cmd = program[at[s]]
            if isinstance(cmd, (SendActivation, SendGrad)):
                name, step = channel[type(cmd)]
                key = (name, s + step)
                if blocking_sends:  # a rendezvous: both sides move on together
                    peer = RecvActivation if name == "act" else RecvGrad
                    if not waiting_at(s + step, peer):
                        continue
                    at[s + step] += 1
                    taken[key] = taken.get(key, 0) + 1
                sent[key] = sent.get(key, 0) + 1
            elif isinstance(cmd, (RecvActivation, RecvGrad)):
                key = (channel[type(cmd)][0], s)
                if sent.get(key, 0) <= taken.get(key, 0):
                    continue
                taken[key] = taken.get(key, 0) + 1
            at[s] += 1
            progress = True
    return all(a == len(p) for a, p in zip(at, programs))


@pytest.mark.parametrize("stages,m", CASES)
def test_every_output_is_sent_once_right_after_its_forward_pass(stages, m):
    for stage in range(stages):
        stock, early = _stock(stages, m, stage), _early(stages, m, stage)
        assert sorted(map(repr, stock)) == sorted(map(repr, early))  # the same work
        sends = [i for i, cmd in enumerate(early) if isinstance(cmd, SendActivation)]
        if stage == stages - 1:
            assert not sends and list(map(repr, early)) == list(map(repr, stock))
            continue
        assert len(sends) == m
        for i in sends:
            assert isinstance(early[i - 1], ForwardPass) and early[i - 1].buffer_id == early[i].buffer_id


@pytest.mark.parametrize("stages,m", CASES)
def test_posted_sends_never_deadlock_and_blocking_ones_would(stages, m):
    early = [_early(stages, m, s) for s in range(stages)]
    assert _runs_to_the_end(early, blocking_sends=False)
    assert _runs_to_the_end([_stock(stages, m, s) for s in range(stages)], blocking_sends=True)
    if m >= 2:  # a stage sending activations while the next one sends a gradient
        assert not _runs_to_the_end(early, blocking_sends=True)


def test_first_activations_leave_before_the_first_gradient_is_awaited():
    early = _early(2, 8, 0)
    first_recv = next(i for i, cmd in enumerate(early) if isinstance(cmd, RecvGrad))
    assert sum(isinstance(cmd, SendActivation) for cmd in early[:first_recv]) == 2
    stock = _stock(2, 8, 0)
    first_recv = next(i for i, cmd in enumerate(stock) if isinstance(cmd, RecvGrad))
    assert sum(isinstance(cmd, SendActivation) for cmd in stock[:first_recv]) == 1
