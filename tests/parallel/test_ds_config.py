"""Every shipped DeepSpeed config passes our checks and DeepSpeed's own parser; bad ones are refused."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

from ds_seg3d.parallel.ds_config import check_ds_config, fill_batch_fields, load_ds_config, topology_for, zero_stage
from ds_seg3d.parallel.topology import Topology

CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.json"))
SHIPPED = {"pipeline_zero1_cpu_fp32.json", "pipeline_zero1_gpu_bf16.json", "plain_zero3.json"}


def _is_pipeline(path: Path) -> bool:
    return not path.name.startswith("plain")


def test_shipped_set_is_present():
    assert SHIPPED <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid_for_ours_and_deepspeed(path):
    cfg = load_ds_config(path)
    pipeline = _is_pipeline(path)
    for world, stages in ([(4, 2), (2, 2), (6, 3), (1, 1)] if pipeline else [(1, 1), (4, 1)]):
        topo = topology_for(cfg, world, stages)
        check_ds_config(cfg, topo, pipeline=pipeline)
        check_ds_config(fill_batch_fields(cfg, topo), topo, pipeline=pipeline)

    # DeepSpeed's parser sees a world of one without a process group: dp = 1.
    parsed = DeepSpeedConfig(copy.deepcopy(cfg))
    topo = topology_for(cfg, 1, 1)
    assert parsed.train_batch_size == topo.train_batch
    assert parsed.train_micro_batch_size_per_gpu == topo.micro_batch
    assert parsed.gradient_accumulation_steps == topo.grad_accum
    if pipeline:
        assert parsed.zero_optimization_stage <= 1
    if parsed.optimizer_name == "adam":  # no JIT build of DeepSpeed's fused Adam
        assert parsed.optimizer_params.get("torch_adam") is True
    else:  # nnU-Net's SGD with Nesterov momentum, which ZeRO wraps like any torch optimizer
        assert parsed.optimizer_name == "SGD" and parsed.optimizer_params["nesterov"] is True
        assert cfg["zero_allow_untested_optimizer"] is True
    import torch

    assert parsed.scheduler_name in VALID_LR_SCHEDULES or hasattr(torch.optim.lr_scheduler, parsed.scheduler_name)
    assert parsed.gradient_clipping > 0
    assert parsed.monitor_config.csv_monitor.enabled
    assert parsed.wall_clock_breakdown is False
    assert parsed.steps_per_print >= 10**6


def test_precision_and_zero_of_each_file():
    cpu = DeepSpeedConfig(load_ds_config(CONFIG_DIR / "pipeline_zero1_cpu_fp32.json"))
    gpu = DeepSpeedConfig(load_ds_config(CONFIG_DIR / "pipeline_zero1_gpu_bf16.json"))
    plain = DeepSpeedConfig(load_ds_config(CONFIG_DIR / "plain_zero3.json"))
    assert not cpu.bfloat16_config.enabled and not cpu.float16_config.enabled
    assert gpu.bfloat16_config.enabled and not gpu.float16_config.enabled
    assert (cpu.zero_optimization_stage, gpu.zero_optimization_stage, plain.zero_optimization_stage) == (1, 1, 3)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_zero_buckets_are_sized_for_small_3d_cnns(name):
    """DeepSpeed's default buckets (5e8 elements) are two 2 GB fp32 buffers per rank; these models
    have a few million parameters, so the shipped files ask for buckets of at most 1e8."""
    cfg = load_ds_config(CONFIG_DIR / name)
    zero = cfg["zero_optimization"]
    parsed = DeepSpeedConfig(copy.deepcopy(cfg)).zero_config
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        assert 10**6 <= zero[key] <= 10**8
        assert getattr(parsed, key) == zero[key]
    from ds_seg3d.memory.spec import PIPELINE_CONFIG, RunSpec, config_bucket, shipped_bucket

    assert config_bucket(cfg) == zero["reduce_bucket_size"]
    if name == PIPELINE_CONFIG.name:
        assert shipped_bucket() == zero["reduce_bucket_size"]
    assert RunSpec(bucket=None).bucket_elements == 500_000_000  # None still measures DeepSpeed's default


def test_fill_batch_fields_applies_overrides_without_touching_the_input():
    cfg = load_ds_config(CONFIG_DIR / "pipeline_zero1_cpu_fp32.json")
    before = copy.deepcopy(cfg)
    topo = topology_for(cfg, 8, 2, micro_batch=2, grad_accum=4)
    filled = fill_batch_fields(cfg, topo)
    assert cfg == before
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (2, 4)
    assert filled["train_batch_size"] == 2 * 4 * 4
    check_ds_config(filled, topo, pipeline=True)
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=1 but the run uses micro_batch=2"):
        check_ds_config(cfg, topo, pipeline=True)


def test_fill_batch_fields_from_world_and_stages():
    cfg = load_ds_config(CONFIG_DIR / "pipeline_zero1_cpu_fp32.json")
    by_world = fill_batch_fields(cfg, 8, 2, micro_batch=2, grad_accum=None)
    assert by_world == fill_batch_fields(cfg, Topology(8, 2, 2, cfg["gradient_accumulation_steps"]))
    assert by_world["train_batch_size"] == 2 * cfg["gradient_accumulation_steps"] * 4
    with pytest.raises(ValueError, match="either a Topology or"):
        fill_batch_fields(cfg, Topology(8, 2), 2)
    with pytest.raises(ValueError, match="stages=3 does not divide world_size=8"):
        fill_batch_fields(cfg, 8, 3)


def test_inference_config_needs_no_optimizer():
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4,
           "zero_optimization": {"stage": 0}}
    check_ds_config(cfg, Topology(4, 2, 2, 1), pipeline=True)
    DeepSpeedConfig(fill_batch_fields(cfg, Topology(1, 1, 2, 1)))


def _base() -> dict:
    return load_ds_config(CONFIG_DIR / "pipeline_zero1_cpu_fp32.json")


def test_train_batch_mismatch_is_refused_like_deepspeed():
    cfg = _base()
    cfg["train_batch_size"] = 5
    topo = topology_for(cfg, 2, 2)  # dp = 1, as DeepSpeedConfig assumes without a process group
    with pytest.raises(ValueError) as info:
        check_ds_config(cfg, topo, pipeline=True)
    message = str(info.value)
    assert message.startswith("train_batch_size=5 != ") and "set it to 2" in message and "\n" not in message
    with pytest.raises(AssertionError):
        DeepSpeedConfig(cfg)
    cfg["train_batch_size"] = 2
    check_ds_config(cfg, topo, pipeline=True)
    DeepSpeedConfig(cfg)


def test_train_batch_checked_against_data_parallel_size():
    cfg = _base()
    cfg["train_batch_size"] = 2
    with pytest.raises(ValueError, match=r"data-parallel size \(2\) = 4"):
        check_ds_config(cfg, Topology(4, 2, 1, 2), pipeline=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_refused_with_a_pipeline_only(stage):
    cfg = _base()
    cfg["zero_optimization"] = {"stage": stage}
    with pytest.raises(ValueError, match="ZeRO-2/3 are incompatible with pipeline parallelism; use ZeRO-1"):
        check_ds_config(cfg, Topology(2, 2, 1, 2), pipeline=True)
    check_ds_config(cfg, Topology(2, 1, 1, 2), pipeline=False)
    assert zero_stage(cfg) == stage


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("gradient_accumulation_steps"), "missing gradient_accumulation_steps"),
        (lambda c: c.pop("train_micro_batch_size_per_gpu"), "missing train_micro_batch_size_per_gpu"),
        (lambda c: c.update(optimizer={"params": {}}), 'optimizer must be an object with a "type"'),
        (lambda c: c.update(gradient_accumulation_steps=0), "gradient_accumulation_steps must be a positive integer"),
        (lambda c: c.update(zero_optimization={"stage": 4}), "zero_optimization.stage must be 0, 1, 2 or 3"),
        (lambda c: c.update(fp16={"enabled": True}, bf16={"enabled": True}), "fp16 and bf16 are both enabled"),
        (lambda c: c.update(gradient_clipping=-1), "gradient_clipping must be a number >= 0"),
    ],
)
def test_bad_configs_raise_one_line(edit, message):
    cfg = _base()
    edit(cfg)
    with pytest.raises(ValueError) as info:
        check_ds_config(cfg, Topology(2, 2, 1, 2), pipeline=True)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_plain_model_must_be_one_stage():
    cfg = load_ds_config(CONFIG_DIR / "plain_zero3.json")
    with pytest.raises(ValueError, match="runs as one stage"):
        check_ds_config(cfg, Topology(4, 2, 1, 2), pipeline=False)


def test_load_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"train_micro_batch_size_per_gpu": 1,,}')
    with pytest.raises(ValueError, match=rf"^{broken}: not valid JSON \(line 1"):
        load_ds_config(broken)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=rf"^{listed}: a DeepSpeed config must be a JSON object"):
        load_ds_config(listed)
    missing = tmp_path / "missing.json"
    with pytest.raises(ValueError, match=rf"^{missing}: cannot read DeepSpeed config"):
        load_ds_config(missing)


def test_a_torch_schedule_deepspeed_lacks_becomes_a_client_scheduler():
    """nnU-Net's poly schedule: DeepSpeed would hand torch's PolynomialLR its ZeRO wrapper, which torch
    refuses; as a client scheduler it gets the torch optimizer and follows lr0 * (1 - t / T) ** 0.9."""
    import torch

    from ds_seg3d.parallel.engines import torch_scheduler

    cfg = load_ds_config(CONFIG_DIR / "pipeline_zero1_cpu_fp32_sgd.json")
    stripped, make = torch_scheduler(cfg)
    assert "scheduler" not in stripped and "scheduler" in cfg and make is not None
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = make(opt)
    total = cfg["scheduler"]["params"]["total_iters"]
    for t in range(1, 4):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - t / total) ** 0.9)
    same, none = torch_scheduler(load_ds_config(CONFIG_DIR / "pipeline_zero1_cpu_fp32.json"))
    assert none is None and same["scheduler"]["type"] == "WarmupCosineLR"  # DeepSpeed's own stays DeepSpeed's
