"""The rank side of ``benchmarks/bench_training.py``: what its timers wrap and what its torch stages build."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import torch_pipelining_ranks
import training_ranks

from ds_seg3d.models import as_tuple, build_layers, build_sequential


def test_instrument_times_the_engines_own_instructions() -> None:
    """The timers wrap the instance's instruction map, where ds-seg3d's engine puts its joint backward; wrapping
    the class's map would time (and run) stock DeepSpeed's per-output backward instead."""
    calls: list[str] = []

    class Engine:
        _INSTRUCTION_MAP = {int: lambda self, **kw: calls.append("stock")}

    engine = Engine()
    engine._INSTRUCTION_MAP = {int: lambda self, **kw: calls.append("joint")}
    acc = training_ranks.instrument(engine)
    engine._INSTRUCTION_MAP[int](engine, buffer_id=0)
    assert calls == ["joint"]
    assert set(acc) == {"int"} and acc["int"][0] >= 0.0


def test_torch_stage_has_the_seeded_weights_of_the_whole_model() -> None:
    """Layers a:b of a torch stage start from the weights the same layers have in the one-device model."""
    defs = build_layers("unet3d", training_ranks.MODELS["unet3d"])
    whole = build_sequential(defs, seed=training_ranks.SEED)
    stage = torch_pipelining_ranks.StageModule(defs, 3, 6, copy_views=False)
    mine, ref = list(stage.layers.state_dict().values()), list(whole[3:6].state_dict().values())
    assert len(mine) == len(ref) > 0
    assert all(torch.equal(a, b) for a, b in zip(mine, ref))


def test_torch_stage_takes_a_tuple_as_arguments_and_copies_views_only_when_asked() -> None:
    """torch.distributed.pipelining passes a tuple as positional arguments; the V schedule needs outputs that are
    not views, so those are copied (and only then)."""
    defs = build_layers("unet3d", training_ranks.MODELS["unet3d"])
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        mid = as_tuple(build_sequential(defs, seed=training_ranks.SEED)[:2](x))
        plain = torch_pipelining_ranks.StageModule(defs, 2, 6, copy_views=False)(*mid)
        copied = torch_pipelining_ranks.StageModule(defs, 2, 6, copy_views=True)(*mid)
    assert isinstance(plain, tuple) and any(t._is_view() for t in plain)  # else the copying is never exercised
    assert not any(t._is_view() for t in copied)
    assert all(torch.equal(a, b) for a, b in zip(plain, copied))
