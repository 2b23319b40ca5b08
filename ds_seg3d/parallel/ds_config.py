"""DeepSpeed JSON configs: load, check against the topology, and apply batch overrides.

DeepSpeed reports a wrong batch layout as a bare ``AssertionError`` deep in engine start-up, after
the model has been built on every rank, and a ZeRO stage the pipeline engine refuses equally late.
``check_ds_config`` runs the same checks first, on one rank, with one-line messages that say what
to change. ``fill_batch_fields`` is how command-line overrides (``--micro-batch``, ``--grad-accum``)
reach the config: it writes all three batch fields so they cannot disagree.

The shipped configs omit ``train_batch_size`` (DeepSpeed derives micro x accumulation x dp, so one
file serves any world size); when a config does give it, it must match (see ds_configs/README.md).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ds_seg3d.parallel.topology import Topology
from ds_seg3d.paths import resolve

MICRO = "train_micro_batch_size_per_gpu"
ACCUM = "gradient_accumulation_steps"
TRAIN_BATCH = "train_batch_size"
ZERO = "zero_optimization"
REQUIRED_FIELDS = (MICRO, ACCUM)


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config; a missing or malformed file is a one-line ``ValueError``.

    A relative ``ds_configs/<name>.json`` that does not exist here is the shipped file of that name."""
    path = resolve(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"{path}: cannot read DeepSpeed config ({err.strerror or err})") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a DeepSpeed config must be a JSON object, got {type(cfg).__name__}")
    return cfg


def _positive_int(cfg: dict[str, Any], key: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def zero_stage(cfg: dict[str, Any]) -> int:
    """The configured ZeRO stage (0 when the section is absent)."""
    section = cfg.get(ZERO) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{ZERO} must be an object, got {type(section).__name__}")
    stage = section.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise ValueError(f"{ZERO}.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def check_ds_config(cfg: dict[str, Any], topology: Topology, pipeline: bool) -> None:
    """Raise a one-line ``ValueError`` if DeepSpeed would reject ``cfg`` on this topology.

    ``topology`` carries the micro-batch and accumulation the run intends (after overrides);
    the config must agree, and ``train_batch_size``, when present, must be their product with dp.
    """
    missing = [key for key in REQUIRED_FIELDS if key not in cfg]
    if missing:
        raise ValueError(f"DeepSpeed config is missing {', '.join(missing)}; add it or call fill_batch_fields()")
    optimizer = cfg.get("optimizer", {"type": None})  # inference-only engines have none
    if not isinstance(optimizer, dict) or "type" not in optimizer:
        raise ValueError('optimizer must be an object with a "type" (e.g. {"type": "Adam", "params": {...}})')
    micro, accum = _positive_int(cfg, MICRO), _positive_int(cfg, ACCUM)
    if micro != topology.micro_batch:
        raise ValueError(f"{MICRO}={micro} but the run uses micro_batch={topology.micro_batch}; "
                         "apply the override with fill_batch_fields()")
    if accum != topology.grad_accum:
        raise ValueError(f"{ACCUM}={accum} but the run uses grad_accum={topology.grad_accum}; "
                         "apply the override with fill_batch_fields()")
    if TRAIN_BATCH in cfg:
        train = cfg[TRAIN_BATCH]
        expected = micro * accum * topology.dp
        if train != expected:
            raise ValueError(
                f"{TRAIN_BATCH}={train!r} != {MICRO} ({micro}) x {ACCUM} ({accum}) x data-parallel size "
                f"({topology.dp}) = {expected}; set it to {expected} or remove it to let DeepSpeed derive it"
            )
    stage = zero_stage(cfg)
    if pipeline and stage > 1:
        raise ValueError(
            f"{ZERO}.stage={stage}: ZeRO-2/3 are incompatible with pipeline parallelism; "
            "use ZeRO-1 (stage 1) with a pipeline, or ZeRO-2/3 with a plain (unpipelined) model"
        )
    if not pipeline and topology.stages != 1:
        raise ValueError(f"a plain (unpipelined) model runs as one stage, but the topology has {topology.stages}")
    fp16 = (cfg.get("fp16") or {}).get("enabled", False)
    bf16 = (cfg.get("bf16") or {}).get("enabled", False)
    if fp16 and bf16:
        raise ValueError("fp16 and bf16 are both enabled; enable at most one")
    clipping = cfg.get("gradient_clipping", 0.0)
    if isinstance(clipping, bool) or not isinstance(clipping, (int, float)) or clipping < 0:
        raise ValueError(f"gradient_clipping must be a number >= 0, got {clipping!r}")


def fill_batch_fields(
    cfg: dict[str, Any],
    topology: Topology | int,
    stages: int | None = None,
    *,
    micro_batch: int | None = None,
    grad_accum: int | None = None,
) -> dict[str, Any]:
    """A copy of ``cfg`` whose three batch fields are the topology's (overrides win over the file).

    Either pass the run's ``Topology``, or ``(world_size, stages, micro_batch=..., grad_accum=...)``
    with ``None`` overrides falling back to the file's values (see ``topology_for``).
    """
    if not isinstance(topology, Topology):
        if stages is None:
            raise ValueError("fill_batch_fields needs a Topology or a world size and a stage count")
        topology = topology_for(cfg, topology, stages, micro_batch, grad_accum)
    elif stages is not None or micro_batch is not None or grad_accum is not None:
        raise ValueError("pass either a Topology or (world_size, stages, overrides), not both")
    out = copy.deepcopy(cfg)
    out[MICRO] = topology.micro_batch
    out[ACCUM] = topology.grad_accum
    out[TRAIN_BATCH] = topology.train_batch
    return out


def topology_for(
    cfg: dict[str, Any],
    world_size: int,
    stages: int,
    micro_batch: int | None = None,
    grad_accum: int | None = None,
) -> Topology:
    """The run's topology: batch fields from ``cfg`` unless overridden (e.g. from the command line)."""
    for key in (MICRO, ACCUM):
        if key not in cfg and (micro_batch if key == MICRO else grad_accum) is None:
            raise ValueError(f"DeepSpeed config is missing {key} and no override was given")
    return Topology(
        world_size=world_size,
        stages=stages,
        micro_batch=micro_batch if micro_batch is not None else _positive_int(cfg, MICRO),
        grad_accum=grad_accum if grad_accum is not None else _positive_int(cfg, ACCUM),
    )
