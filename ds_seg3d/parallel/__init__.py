"""The distributed half: topology, partitioning, PipelineModule construction, DeepSpeed engines.

It knows no anatomy and no particular network: it takes a flat list of layer descriptions and a
loss function. ``topology``, ``partition`` and ``ds_config`` are plain Python/torch and import
eagerly; the names that need DeepSpeed (``build_pipeline``, ``initialize_pipeline``, ...) load it
on first use, so planning and config checks do not pay DeepSpeed's import time.
"""
from __future__ import annotations

import importlib
from typing import Any

from ds_seg3d.parallel.ds_config import check_ds_config, fill_batch_fields, load_ds_config, topology_for
from ds_seg3d.parallel.layer_profile import LayerProfile, profile_layers, scale_profile
from ds_seg3d.parallel.partition import (
    StageBytes,
    compare_partitions,
    memory_partition,
    parameter_partition,
    partition_table,
    predicted_stage_bytes,
    profile_partition,
    uniform_partition,
)
from ds_seg3d.parallel.topology import Topology, in_flight

_LAZY = {
    "build_pipeline": "ds_seg3d.parallel.pipeline",
    "PartitionedPipelineModule": "ds_seg3d.parallel.pipeline",
    "layer_specs": "ds_seg3d.parallel.pipeline",
    "init_distributed": "ds_seg3d.parallel.engines",
    "initialize_pipeline": "ds_seg3d.parallel.engines",
    "initialize_plain": "ds_seg3d.parallel.engines",
}

__all__ = [
    "Topology", "in_flight",
    "LayerProfile", "StageBytes", "profile_layers", "scale_profile", "memory_partition",
    "parameter_partition", "uniform_partition", "profile_partition", "predicted_stage_bytes",
    "partition_table", "compare_partitions",
    "load_ds_config", "check_ds_config", "fill_batch_fields", "topology_for",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
