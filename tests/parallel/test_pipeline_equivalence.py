"""A 2-stage DeepSpeed pipeline trains exactly like the same network on one device.

Each test is one launch of 2 real CPU ranks (tests/ranks/pipeline_equivalence.py). The U-Net's
skip tensors cross the stage boundary, so matching weight updates on the first stage prove the
gradients of every skip travelled back through the pipe.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from deepspeed.runtime.utils import partition_balanced

from ds_seg3d.models import build_layers
from ds_seg3d.models.layers import build_sequential
from ds_seg3d.parallel.layer_profile import stage_profile
from ds_seg3d.parallel.partition import profile_partition
from tests.launch import run_deepspeed
from tests.ranks import pipeline_equivalence as script

pytestmark = pytest.mark.multirank

CFG = script.MODEL


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[dict]:
    out = tmp_path / "result"
    run_deepspeed("pipeline_equivalence.py", ["--out", str(out), *args], num_ranks=2, timeout=900, env=env)
    results = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["stage"] for r in results] == [0, 1]
    return results


def _assert_equivalent(results: list[dict], boundaries: list[int], cfg=CFG) -> None:
    owned = []
    for r in results:
        assert r["boundaries"] == boundaries
        assert r["crossing_tensors"] >= 2, "the split should send U-Net skips across the boundary"
        assert r["loss"] > 0
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5
        start, stop = boundaries[r["stage"]], boundaries[r["stage"] + 1]
        layers = sorted(int(i) for i in r["layers"])
        assert layers == list(range(start, stop))
        owned += layers
        for index, params in r["layers"].items():
            assert params, f"layer {index} has no parameters to compare"
            assert max(p["update_max"] for p in params.values()) > 1e-6, f"layer {index} did not train"
            for name, p in params.items():
                assert p["init_diff"] == 0.0, f"layer {index} {name}: seeded init differs"
                assert p["update_diff"] <= 1e-3 * p["update_max"] + 1e-9, f"layer {index} {name}: {p}"
    assert owned == list(range(len(build_layers("unet3d", cfg))))


def test_memory_partition_matches_single_device(tmp_path):
    results = _run(tmp_path, "--partition", "memory", "--grad-accum", "2")
    defs = build_layers("unet3d", CFG)
    expected = profile_partition(stage_profile(defs, (1, 1, *script.PATCH)), 2, 2)
    _assert_equivalent(results, expected)


def test_parameter_partition_with_activation_checkpointing_matches(tmp_path):
    results = _run(tmp_path, "--partition", "parameters", "--ckpt-interval", "1", "--grad-accum", "3")
    ref = build_sequential(build_layers("unet3d", CFG))
    counts = [sum(p.numel() for p in layer.parameters()) for layer in ref]
    _assert_equivalent(results, [int(b) for b in partition_balanced(counts, 2)])


def test_deep_supervision_logits_cross_the_pipe_and_train_as_on_one_device(tmp_path):
    """dec1's auxiliary logits ride from stage 0 to the loss on stage 1 with the skip and the current map."""
    results = _run(tmp_path, "--deep-supervision", "--boundary", "6", "--grad-accum", "2", "--partition", "uniform")
    assert all(r["crossing_tensors"] == 3 for r in results)  # skip_0, the current map and level 1's logits
    _assert_equivalent(results, [0, 6, 8], cfg=script.SUPERVISED)


def test_one_backward_walk_and_one_received_copy_with_deepspeeds_own_gradients(tmp_path):
    """DeepSpeed 0.19.8 walks a stage's graph once per tensor it sent (the shared encoder once per skip), and
    keeps a receive buffer, a stored clone and a forward clone of what a stage receives; ds_seg3d's engine
    walks it once and runs the forward pass on the one stored copy, and every weight update is DeepSpeed's."""
    args = ("--partition", "uniform", "--grad-accum", "2")
    stock = _run(tmp_path / "stock", *args, env={"DS_SEG3D_JOINT_BACKWARD": "0", "DS_SEG3D_ONE_COPY": "0"})
    joint = _run(tmp_path / "joint", *args)
    first_stock, first_joint = stock[0], joint[0]
    assert first_stock["crossing_tensors"] >= 2
    assert first_stock["first_layer_backward_walks"] == first_stock["crossing_tensors"] * 2  # per sent tensor
    assert first_joint["first_layer_backward_walks"] == 2  # once per micro-batch
    # the receiving stage: DeepSpeed's forward runs on clones and its receive buffers stay allocated
    assert stock[1]["forward_on_stored_inputs"] == [False, False] and stock[1]["receive_pool_bytes"] > 0
    assert joint[1]["forward_on_stored_inputs"] == [True, True] and joint[1]["receive_pool_bytes"] == 0
    for a, b in zip(stock, joint):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-7)
        for index, params in a["updates"].items():
            for name, values in params.items():
                assert b["updates"][index][name] == pytest.approx(values, abs=1e-7), (index, name)


@pytest.mark.parametrize("method", ["time", "balanced"])
def test_time_partition_is_rank_0s_on_both_ranks_and_matches(tmp_path, method):
    """Timings differ between ranks: both stages must still be cut where rank 0's measurement says (for the
    balanced split too, here under a budget of 1 GiB per rank)."""
    results = _run(tmp_path, "--partition", method, "--grad-accum", "2", "--memory-budget", str(2**30))
    boundaries = results[0]["boundaries"]
    assert boundaries == results[1]["boundaries"]
    assert len(boundaries) == 3 and 0 < boundaries[1] < boundaries[2] == len(build_layers("unet3d", CFG))
    _assert_equivalent(results, boundaries)


def test_balanced_partition_that_fits_nowhere_stops_every_rank_with_the_reason(tmp_path):
    """Rank 0 decides; the others must not wait for boundaries that never come."""
    proc = run_deepspeed("pipeline_equivalence.py", ["--out", str(tmp_path / "result"), "--partition", "balanced",
                                                     "--memory-budget", "1"], num_ranks=2, timeout=300, check=False)
    assert proc.returncode != 0
    assert proc.stdout.count("no split into 2 stages fits") >= 2  # raised on both ranks
    assert not (tmp_path / "result").exists()
