"""The discriminator's DeepSpeed engine: its configs and batch fields, its device, and one real launch.

The launch (4 CPU ranks: 2 stages x 2 replicas, tests/ranks/discriminator_engine_check.py) checks
that only last-stage ranks get an engine, that replicas trained on different data stay identical
(their gradients are all-reduced over the last stage alone), and that the segmenter's engine keeps
training after the discriminator's ``deepspeed.initialize`` replaced DeepSpeed's process-wide mpu.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.lr_schedules import WarmupLR

from ds_seg3d.parallel.discriminator_engine import discriminator_config, discriminator_topology, resolve_device
from ds_seg3d.parallel.ds_config import load_ds_config
from ds_seg3d.parallel.topology import Topology
from tests.launch import run_deepspeed

CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
CONFIGS = {"discriminator_cpu_fp32.json": False, "discriminator_gpu_bf16.json": True}  # name -> bf16


@pytest.mark.parametrize("name, bf16", CONFIGS.items())
def test_shipped_config(name, bf16):
    raw = load_ds_config(CONFIG_DIR / name)
    parsed = DeepSpeedConfig(copy.deepcopy(raw))
    assert parsed.zero_optimization_stage == 0, "replicas must hold the whole optimizer state"
    assert parsed.bfloat16_config.enabled is bf16
    assert not parsed.float16_config.enabled
    assert parsed.optimizer_name == "adam"
    params = parsed.optimizer_params
    assert params["torch_adam"] is True
    assert params["lr"] == pytest.approx(2e-4)
    assert tuple(params["betas"]) == (0.5, 0.999)
    assert parsed.train_micro_batch_size_per_gpu == 1
    # The scheduler keeps the rate constant: step DeepSpeed's own WarmupLR on a real optimizer.
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([weight], lr=params["lr"], betas=tuple(params["betas"]))
    scheduler = WarmupLR(optimizer, **parsed.scheduler_params) if parsed.scheduler_name == "WarmupLR" else None
    assert scheduler is not None, f"unexpected scheduler {parsed.scheduler_name}"
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)


@pytest.mark.parametrize(
    "world, stages, micro, accum",
    [(4, 2, 1, 2), (8, 4, 1, 3), (6, 3, 2, 2), (1, 1, 1, 4), (3, 3, 1, 1)],
)
def test_batch_fields_follow_the_last_stage(world, stages, micro, accum):
    topology = Topology(world, stages, micro_batch=micro, grad_accum=accum)
    raw = load_ds_config(CONFIG_DIR / "discriminator_cpu_fp32.json")
    before = copy.deepcopy(raw)
    cfg = discriminator_config(raw, topology)
    assert raw == before, "the caller's dict must not be modified"
    assert cfg is not raw
    dp_last = len(topology.ranks_of_stage(stages - 1))
    assert dp_last == world // stages
    assert cfg["train_micro_batch_size_per_gpu"] == micro
    assert cfg["gradient_accumulation_steps"] == accum
    assert cfg["train_batch_size"] == micro * accum * dp_last
    d_topology = discriminator_topology(topology)
    assert (d_topology.world_size, d_topology.stages, d_topology.train_batch) == (dp_last, 1, cfg["train_batch_size"])


def test_bad_discriminator_config_is_refused_before_any_collective():
    topology = Topology(4, 2, micro_batch=1, grad_accum=2)
    raw = load_ds_config(CONFIG_DIR / "discriminator_cpu_fp32.json")
    both = dict(raw, fp16={"enabled": True}, bf16={"enabled": True})
    with pytest.raises(ValueError, match="fp16 and bf16 are both enabled"):
        discriminator_config(both, topology)
    no_type = dict(raw, optimizer={"params": {"lr": 1e-3}})
    with pytest.raises(ValueError, match="optimizer must be an object"):
        discriminator_config(no_type, topology)


def test_device_follows_the_accelerator():
    accelerator = get_accelerator()
    own = torch.device(accelerator.device_name(0))
    assert resolve_device(None).type == own.type
    assert resolve_device(own.type).type == own.type
    other = "cuda:0" if own.type == "cpu" else "cpu"
    with pytest.raises(ValueError, match=f"is not a {own.type} device"):
        resolve_device(other)
    with pytest.raises(ValueError, match="is not a device"):
        resolve_device("no-such-device")


@pytest.mark.multirank
def test_discriminator_engine_on_last_stage(tmp_path):
    out = tmp_path / "result"
    run_deepspeed("discriminator_engine_check.py", ["--out", str(out), "--d-steps", "3"], num_ranks=4, timeout=600)
    results = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)]
    assert [r["stage"] for r in results] == [0, 0, 1, 1]
    for r in results:
        assert r["has_engine"] is (r["stage"] == 1), f"rank {r['rank']}"
        assert r["mpu_restored_after_build"], f"rank {r['rank']}: the segmenter's mpu was not restored"
        assert r["config_untouched"]
        # The segmenter trained a batch after the discriminator existed (and stepped).
        assert r["seg_global_steps"] == 2
        assert np.isfinite(r["seg_loss_after"]) and r["seg_loss_after"] > 0

    last = results[2:]
    for r in last:
        assert r["d_dp_world_size"] == 2
        assert r["d_group_ranks"] == [2, 3]
        assert r["d_uses_its_group"]
        assert r["d_train_batch"] == 1 * 2 * 2
        assert r["d_global_steps"] == 3
        assert r["mpu_restored_after_steps"]
        assert r["save_checkpoint_refused"]
        assert all(np.isfinite(r["d_losses"]))
        moved = np.abs(np.subtract(r["d_final"], r["d_initial"])).max()
        assert moved > 1e-6, "the discriminator did not train"

    a, b = last
    assert a["d_seeded"] != b["d_seeded"], "replicas should start from different seeds"
    assert a["d_initial"] == b["d_initial"], "DeepSpeed's broadcast should align the replicas"
    assert a["d_losses"] != b["d_losses"], "replicas should see different data"
    assert a["d_final"] == b["d_final"], "replicas diverged: gradients were not all-reduced over the last stage"

    # The segmenter's own replicas (ZeRO-1 over each stage) are still in step with each other.
    assert results[0]["seg_stage_params"] == results[1]["seg_stage_params"]
    assert results[2]["seg_stage_params"] == results[3]["seg_stage_params"]
