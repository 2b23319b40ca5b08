"""The counting behind the divergence stop: fp16 steps skipped in a row, and the lines it prints."""
from __future__ import annotations

from ds_seg3d.parallel import divergence


def test_skipped_steps_count_in_a_row_and_reset_on_an_applied_step() -> None:
    count = divergence.SkippedSteps(limit=3, total=5)  # a resumed run: 5 skipped before, none in a row
    totals = [5, 6, 7, 7, 8, 9]  # skipped, skipped, applied, skipped, skipped
    seen = [count.update(t) for t in totals]
    assert seen == [False, False, False, False, False, False] and count.in_a_row == 2
    assert count.update(10) and count.in_a_row == 3  # the third in a row stops the run


def test_a_limit_of_zero_never_stops() -> None:
    count = divergence.SkippedSteps(limit=0)
    assert not any(count.update(t) for t in range(1, 200)) and count.in_a_row == 199


def test_the_lines_name_step_rank_stage_and_checkpoint() -> None:
    assert divergence.message(9, 1, "loss", 1, None) == \
        "error: step 9: non-finite loss on rank 1 (stage 1); last good checkpoint: none"
    assert divergence.skipped_message(40, 32, 1.0, "step0000030") == \
        "error: step 40: 32 fp16 overflow steps skipped in a row (loss scale 1); last good checkpoint: step0000030"
