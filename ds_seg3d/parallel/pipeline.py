"""A flat list of layer descriptions becomes a DeepSpeed ``PipelineModule``.

The models know nothing about parallelism: each ``LayerDef(cls, args, kwargs)`` maps one-to-one
onto ``LayerSpec(cls, *args, **kwargs)``, so a stage allocates only its own layers. With
``seed_layers=True`` DeepSpeed seeds torch with ``seed + global layer index`` before building each
layer, which is exactly what ``ds_seg3d.models.layers.build_sequential(defs, seed)`` does on one
device: weights do not depend on the split, and pipelined and single-device runs are comparable.

DeepSpeed 0.19.8 partitions by ``"parameters"``, ``"uniform"`` or ``"type:<regex>"``; its
``"profile"`` method raises ``NotImplementedError`` and there is no hook for explicit boundaries.
``"memory"``, ``"time"`` and ``"balanced"`` (time under a memory budget) are therefore a ``PipelineModule``
subclass whose ``_partition_layers`` installs the boundaries computed by ``ds_seg3d.parallel.partition``
or ``ds_seg3d.parallel.timing`` (the method DeepSpeed's constructor calls before building any layer). The
same subclass repairs DeepSpeed's own methods for seeded builds (see ``PartitionedPipelineModule``).

Activation checkpointing uses DeepSpeed's non-reentrant variant. The pipe engine back-propagates
a stage's tuple outputs one tensor at a time (``retain_graph`` between them); the reentrant
``CheckpointFunction`` frees its saved inputs in the first of those calls and the second fails
(``'NoneType' object is not iterable``), so U-Net skip tuples cannot use it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as tdist
from deepspeed import comm as dist
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint

from ds_seg3d.parallel.layer_profile import LayerLike, stage_profile
from ds_seg3d.parallel.partition import check_boundaries, partition_table, profile_partition
from ds_seg3d.parallel.timing import balanced_partition, layer_seconds, stage_seconds, time_partition
from ds_seg3d.parallel.topology import Topology

PARTITION_METHODS = ("parameters", "uniform", "memory", "time", "balanced", "auto")


class PartitionedPipelineModule(PipelineModule):
    """A ``PipelineModule`` whose stage boundaries can be given instead of computed by DeepSpeed.

    With ``boundaries=None`` DeepSpeed's own ``partition_method`` decides, but its result is cast
    to Python ints: DeepSpeed 0.19.8's ``partition_balanced`` (``"parameters"``) returns numpy
    integers, and with ``seed_layers=True`` ``random.seed(base_seed + layer_idx)`` then raises
    ``TypeError`` on Python 3.11. Everything else (building, seeding, checkpoint naming,
    activation checkpointing) is DeepSpeed's own. The boundaries are also what a checkpoint must
    be reloaded with.
    """

    def __init__(self, layers: Sequence[Any], boundaries: Sequence[int] | None = None, **kwargs: Any) -> None:
        # Stored before super().__init__, which calls _partition_layers; a plain attribute set
        # with object.__setattr__ needs none of nn.Module's bookkeeping to exist yet.
        fixed = None if boundaries is None else [int(b) for b in boundaries]
        object.__setattr__(self, "_fixed_boundaries", fixed)
        if fixed is not None:
            kwargs["partition_method"] = "fixed"
        super().__init__(layers, **kwargs)

    def forward(self, forward_input: Any) -> Any:
        # DeepSpeed's bf16/fp16 engines cast the module, not the data it loads: the first stage casts the
        # float images it receives to its weights' dtype (labels and integer tensors stay as they are).
        if self._local_start == 0:
            dtype = next((p.dtype for p in self.parameters()), None)
            if dtype is not None:
                forward_input = _cast_floats(forward_input, dtype)
        return super().forward(forward_input)

    def _partition_layers(self, method: str = "parameters") -> None:
        if self._fixed_boundaries is None:
            super()._partition_layers(method=method)
            parts = [int(p) for p in self.parts]
        else:
            parts = self._fixed_boundaries
        self.parts = check_boundaries(parts, len(self._layer_specs), self.num_stages)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype) for v in value)
    return value


def layer_specs(defs: Sequence[LayerLike]) -> list[LayerSpec]:
    """``LayerDef(cls, args, kwargs)`` -> ``LayerSpec(cls, *args, **kwargs)``, one-to-one."""
    return [LayerSpec(d.cls, *d.args, **d.kwargs) for d in defs]


def build_pipeline(
    defs: Sequence[LayerLike],
    num_stages: int | Topology,
    loss_fn: Callable[..., torch.Tensor] | None,
    *,
    partition_method: str = "parameters",
    sample_shape: Sequence[int] | None = None,
    profile_shape: Sequence[int] | None = None,
    micro_batches: int | None = None,
    activation_checkpoint_interval: int = 0,
    seed: int = 1234,
    topology: Topology | None = None,
    boundaries: Sequence[int] | None = None,
    memory_budget: float | None = None,
) -> PartitionedPipelineModule:
    """Build this rank's stage of the pipeline; needs ``init_distributed()`` to have run.

    Args:
        defs: the model's flat layer list (``LayerDef``-like: ``cls``, ``args``, ``kwargs``).
        num_stages: pipeline stages (must equal ``topology.stages`` when both are given), or the
            run's ``Topology`` itself.
        loss_fn: ``loss_fn(outputs, labels)`` on the last stage.
        partition_method: ``"parameters"`` / ``"uniform"`` (DeepSpeed's), ``"memory"``
            (activation bytes x in-flight micro-batches, see ``partition.py``) or ``"time"`` (each
            layer's forward + backward timed on rank 0, the slowest stage minimised, see ``timing.py``) or
            ``"balanced"`` (the same among the splits whose stages fit ``memory_budget``) or ``"auto"``
            (balanced under ``memory_budget``, or within ``timing.AUTO_SLACK`` of the least memory any
            split needs when it is None; the least-memory split when nothing fits).
        sample_shape: one micro-batch of input, ``(B, C, X, Y, Z)``; required for ``"memory"`` and
            ``"time"`` and, when given, used to print predicted bytes per stage for any method.
        profile_shape: shape to profile at (scaled to ``sample_shape``); by default a reduced
            shape the network accepts (see ``stage_profile``).
        micro_batches: micro-batches per step (in-flight count); defaults to
            ``topology.grad_accum`` or 1.
        activation_checkpoint_interval: recompute activations every N layers (0: off).
        seed: base seed; layer i is initialised after ``torch.manual_seed(seed + i)``.
        topology: the validated pipe x data layout; defaults to ``num_stages`` x (world / stages).
        boundaries: explicit stage boundaries (``stages + 1`` layer indices), overriding ``partition_method``.
        memory_budget: bytes per rank, for ``"balanced"`` (required) and ``"auto"``.
    """
    if partition_method not in PARTITION_METHODS:
        raise ValueError(f"partition_method must be one of {', '.join(PARTITION_METHODS)}, got {partition_method!r}")
    if not dist.is_initialized():
        raise RuntimeError("build_pipeline needs torch.distributed: call ds_seg3d.parallel.init_distributed() first")
    world = dist.get_world_size()
    if isinstance(num_stages, Topology):
        if topology is not None and topology != num_stages:
            raise ValueError(f"two different topologies given: {num_stages} and {topology}")
        topology, num_stages = num_stages, num_stages.stages
    if topology is None:
        topology = Topology(world, num_stages, grad_accum=micro_batches or 1)
    if topology.stages != num_stages:
        raise ValueError(f"num_stages={num_stages} disagrees with topology.stages={topology.stages}")
    if topology.world_size != world:
        raise ValueError(f"topology is for {topology.world_size} ranks but {world} were launched")
    if micro_batches is None:
        micro_batches = topology.grad_accum
    if len(defs) < num_stages:
        raise ValueError(f"{len(defs)} layers cannot fill {num_stages} stages; use at most {len(defs)} stages")
    if activation_checkpoint_interval < 0:
        raise ValueError(f"activation_checkpoint_interval must be >= 0, got {activation_checkpoint_interval}")
    if partition_method == "balanced" and boundaries is None and not (memory_budget and memory_budget > 0):
        raise ValueError("partition_method='balanced' needs memory_budget (bytes per rank, > 0)")
    if partition_method in ("memory", "time", "balanced", "auto") and sample_shape is None and boundaries is None:
        raise ValueError(f"partition_method={partition_method!r} needs sample_shape (one micro-batch, "
                         "e.g. (1, 1, 64, 64, 64))")

    # Every rank computes the same profile (deterministic in the shapes), so the boundaries agree
    # without a broadcast; for DeepSpeed's methods only rank 0 profiles, to print the prediction.
    wanted = partition_method == "memory" or dist.get_rank() == 0
    profile = stage_profile(defs, sample_shape, profile_shape) if sample_shape is not None and wanted else None
    common = dict(
        num_stages=None,
        topology=topology.to_deepspeed(),
        loss_fn=loss_fn,
        seed_layers=True,
        base_seed=seed,
        activation_checkpoint_interval=activation_checkpoint_interval,
        activation_checkpoint_func=non_reentrant_checkpoint,
    )
    specs = layer_specs(defs)
    if boundaries is not None:
        partition_method = "given"
        module = PartitionedPipelineModule(specs, check_boundaries(boundaries, len(specs), num_stages), **common)
    elif partition_method == "memory":
        boundaries = profile_partition(profile, num_stages, micro_batches)
        module = PartitionedPipelineModule(specs, boundaries, **common)
    elif partition_method in ("time", "balanced", "auto"):
        # timings differ between ranks: rank 0 measures, every rank takes its boundaries
        shared: list[Any] = [None]
        if dist.get_rank() == 0:
            seconds = layer_seconds(defs, sample_shape, seed=seed)
            try:
                split: Any = (time_partition(seconds, num_stages) if partition_method == "time" else
                              balanced_partition(seconds, profile, num_stages, micro_batches, memory_budget,
                                                 strict=partition_method == "balanced"))
            except ValueError as e:  # every rank raises it, rather than wait for boundaries that never come
                split = str(e)
            shared = [(split, seconds)]
        tdist.broadcast_object_list(shared, src=0)
        boundaries, seconds = shared[0]
        if isinstance(boundaries, str):
            raise ValueError(boundaries)
        module = PartitionedPipelineModule(specs, boundaries, **common)
    else:
        module = PartitionedPipelineModule(specs, None, partition_method=partition_method, **common)

    if dist.get_rank() == 0:
        print(f"pipeline partition ({partition_method}): boundaries={list(module.parts)}", flush=True)
        if partition_method in ("time", "balanced", "auto"):
            per_stage = ", ".join(f"stage {i} {t:.3f} s" for i, t in enumerate(stage_seconds(seconds, module.parts)))
            print(f"forward + backward of one micro-batch, measured on rank 0: {per_stage}", flush=True)
        if profile is not None:
            print(partition_table(profile, module.parts, micro_batches), flush=True)
    return module
