"""The discriminator's own DeepSpeed engine, on the ranks of the last pipeline stage only.

Only the last stage sees the segmenter's output and the labels, so the discriminator lives there,
replicated over that stage's data-parallel ranks. DeepSpeed learns its data-parallel group from an
``mpu`` (model-parallel unit): ``LastStageMPU`` says "the replicas are the last-stage ranks, and
there is no model parallelism".

Behaviours of DeepSpeed 0.19.8 this module works around (``runtime/engine.py``, ``utils/groups.py``):

- ``deepspeed.initialize(mpu=...)`` stores the mpu in the process-wide ``deepspeed.utils.groups.mpu``,
  which the segmenter's engine had set to its ``PipelineParallelGrid``. ``build_discriminator_engine``
  restores it, so the segmenter keeps seeing its own groups (e.g. ``save_checkpoint`` picks its
  writer with ``groups._get_data_parallel_rank()``).
- A non-pipeline engine reads that process-wide mpu again at every step: its gradient all-reduce
  (``_reduce_non_expert_gradients``) asks ``groups._get_sequence_data_parallel_group()``. With the
  segmenter's grid installed, it would all-reduce over the grid's group for this rank; with no mpu,
  over the whole world, where first-stage ranks never join (a hang). ``DiscriminatorEngine`` therefore
  installs the discriminator's mpu for the duration of each forward, ``backward`` and ``step``.
- Gradient clipping all-reduces the norm over ``mpu.get_model_parallel_group()``; a ``None`` group
  would mean the whole world, so the mpu holds a real one-rank group for each discriminator rank.
- ``save_checkpoint`` / ``load_checkpoint`` run ``dist.barrier()`` and a checkpoint-tag all-reduce on
  the whole world and let global rank 0 (a first-stage rank) create the folder and write ``latest``:
  called on the last stage only they hang, so ``DiscriminatorEngine`` refuses them. With ZeRO-0 every
  replica holds the whole state: save ``engine.module``/``engine.optimizer``/``engine.lr_scheduler``
  state dicts from one replica instead.
- The engine places its module on ``args.device_rank`` when given (else ``LOCAL_RANK``) and makes that
  the process's current device (``_set_distributed_vars``). A discriminator device other than the
  rank's own GPU is passed that way; the current device is restored afterwards and set again around
  each discriminator call, because DeepSpeed's bf16/fp16 wrappers allocate on the current device.
- Monitors (``csv_monitor``) write from global rank 0 only, which is not a discriminator rank when
  there are two or more stages: the discriminator's losses must be logged by the training loop.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import groups

from ds_seg3d.parallel.ds_config import check_ds_config, fill_batch_fields
from ds_seg3d.parallel.topology import Topology


class LastStageMPU:
    """An ``mpu`` whose data-parallel group is the last pipeline stage and whose model parallelism is 1.

    Construction is collective: every rank of the world must build one, in the same order relative
    to other group creations (``torch.distributed.new_group`` requires it), even ranks that will
    never run the discriminator. Those get an object whose ``is_member`` is False.
    """

    def __init__(self, topology: Topology, rank: int | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("LastStageMPU needs torch.distributed: call ds_seg3d.parallel.init_distributed() first")
        world = dist.get_world_size()
        if topology.world_size != world:
            raise ValueError(f"topology is for {topology.world_size} ranks but {world} were launched")
        self.rank = dist.get_rank()
        if rank is not None and rank != self.rank:
            raise ValueError(f"rank {rank} given, but this process is rank {self.rank}")
        self.topology = topology
        self.ranks: list[int] = topology.ranks_of_stage(topology.stages - 1)
        self.is_member = self.rank in self.ranks
        group = dist.new_group(ranks=self.ranks)
        # One single-rank group per discriminator rank: DeepSpeed all-reduces gradient norms and
        # overflow flags over the "model-parallel group", which must hold this rank alone.
        own = None
        for r in self.ranks:
            single = dist.new_group(ranks=[r])
            if r == self.rank:
                own = single
        self._data_group = group if self.is_member else None
        self._own_group = own

    def _member(self) -> None:
        if not self.is_member:
            raise RuntimeError(
                f"rank {self.rank} runs stage {self.topology.stage_of(self.rank)}, not the last stage "
                f"({self.topology.stages - 1}); it holds no discriminator"
            )

    # Data parallelism: the replicas of the last stage.
    def get_data_parallel_group(self) -> Any:
        self._member()
        return self._data_group

    def get_data_parallel_rank(self) -> int:
        self._member()
        return self.ranks.index(self.rank)

    def get_data_parallel_world_size(self) -> int:
        return len(self.ranks)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.ranks)

    # Model parallelism (tensor and pipeline): none, every rank is its own group.
    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_group(self) -> Any:
        self._member()
        return self._own_group

    def get_tensor_model_parallel_rank(self) -> int:
        return 0

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1

    def get_tensor_model_parallel_group(self) -> Any:
        return self.get_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.rank

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self) -> Any:
        return self.get_model_parallel_group()


def discriminator_topology(topology: Topology) -> Topology:
    """The discriminator's own layout: one stage, replicated over the last stage's ranks.

    Micro-batch and accumulation are the segmenter's, so one segmenter step (``grad_accum``
    micro-batches) gives one discriminator step, and ``train_batch = micro x accum x dp_last``.
    """
    return Topology(
        world_size=len(topology.ranks_of_stage(topology.stages - 1)),
        stages=1,
        micro_batch=topology.micro_batch,
        grad_accum=topology.grad_accum,
    )


def discriminator_config(ds_cfg: dict[str, Any], topology: Topology) -> dict[str, Any]:
    """A private copy of the discriminator's config with batch fields filled from ``topology``; checked."""
    d_topology = discriminator_topology(topology)
    cfg = fill_batch_fields(ds_cfg, d_topology)
    check_ds_config(cfg, d_topology, pipeline=False)
    return cfg


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The discriminator's device: ``None`` means this rank's accelerator device (``LOCAL_RANK``).

    Only devices of the accelerator's own type are possible (DeepSpeed moves the module to
    ``accelerator.device_name(index)``): on a CPU run that is ``cpu``; on CUDA any visible GPU.
    """
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    default = torch.device(accelerator.device_name(local_rank))
    if device is None:
        return default
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"discriminator device {device!r} is not a device ({err})") from None
    if wanted.type != default.type:
        raise ValueError(
            f"discriminator device {wanted} is not a {default.type} device; DeepSpeed's accelerator here is "
            f"{accelerator.device_name()!r}, and an engine can only live on one of its devices"
        )
    if wanted.index is None:
        return default
    count = accelerator.device_count()
    if wanted.type != "cpu" and not 0 <= wanted.index < count:
        raise ValueError(f"discriminator device {wanted} does not exist: this node shows {count} {wanted.type} devices")
    return wanted


@contextlib.contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    """Make ``device`` the accelerator's current device inside the block (no-op on CPU)."""
    if device.type == "cpu" or device.index is None:
        yield
        return
    accelerator = get_accelerator()
    previous = accelerator.current_device()
    if previous == device.index:
        yield
        return
    accelerator.set_device(device.index)
    try:
        yield
    finally:
        accelerator.set_device(previous)


@contextlib.contextmanager
def _process_mpu(mpu: Any) -> Iterator[None]:
    """Install ``mpu`` as DeepSpeed's process-wide mpu inside the block, then put the previous one back."""
    previous = groups.mpu
    groups.mpu = mpu
    try:
        yield
    finally:
        groups.mpu = previous


class DiscriminatorEngine:
    """The discriminator's DeepSpeed engine, run with its own groups and device.

    Behaves like the wrapped ``DeepSpeedEngine`` (attributes are read from and written to it:
    ``module``, ``optimizer``, ``lr_scheduler``, ``global_steps``, ...), except that calling it,
    ``backward`` and ``step`` run with the discriminator's mpu installed process-wide and its device
    current, and that DeepSpeed's world-collective checkpoint methods are refused (see the module
    docstring).
    """

    _OWN = ("engine", "mpu", "device")

    def __init__(self, engine: Any, mpu: LastStageMPU, device: torch.device) -> None:
        object.__setattr__(self, "engine", engine)
        object.__setattr__(self, "mpu", mpu)
        object.__setattr__(self, "device", device)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The discriminator's groups and device, for any other engine call that communicates."""
        with _process_mpu(self.mpu), _on_device(self.device):
            yield

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.active():
            return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with self.active():
            return self.engine.backward(loss, *args, **kwargs)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        with self.active():
            return self.engine.step(*args, **kwargs)

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "DeepSpeed's save_checkpoint synchronises the whole world and writes from global rank 0, which has "
            "no discriminator; save engine.module / engine.optimizer / engine.lr_scheduler state dicts instead"
        )

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "DeepSpeed's load_checkpoint synchronises the whole world, which has ranks without a discriminator; "
            "load engine.module / engine.optimizer / engine.lr_scheduler state dicts instead"
        )

    def __getattr__(self, name: str) -> Any:  # only reached for names this class does not define
        if name in self._OWN:  # not set yet (copy, unpickling): no recursion through self.engine
            raise AttributeError(name)
        return getattr(self.engine, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.engine, name, value)


def build_discriminator_engine(
    model: torch.nn.Module,
    ds_cfg: dict[str, Any],
    topology: Topology,
    rank: int,
    device: torch.device | str | None = None,
) -> DiscriminatorEngine | None:
    """The discriminator engine on last-stage ranks, ``None`` elsewhere. Collective: every rank calls it.

    Args:
        model: the discriminator (built on every rank; only last-stage ranks keep it). DeepSpeed
            broadcasts the first replica's weights, so the replicas start identical whatever the seed.
        ds_cfg: the discriminator's own DeepSpeed config (never the segmenter's dict); it is copied
            and its batch fields are filled from ``topology`` (``micro x accum x last-stage dp``).
        topology: the segmenter's pipe x data layout.
        rank: this process's global rank.
        device: where the discriminator runs (``--discriminator-device``): ``None`` for the rank's
            own accelerator device, or another device of the same type, e.g. ``cuda:1`` on a node
            with a GPU to spare. On a CPU run only ``cpu``. Ranks of one node that share the
            discriminator group must not pick the same GPU (NCCL refuses duplicate GPUs).
    """
    cfg = discriminator_config(ds_cfg, topology)  # same on every rank: fails before any collective
    target = resolve_device(device)
    mpu = LastStageMPU(topology, rank)
    if not mpu.is_member:
        return None
    # Only pass device_rank when it differs from LOCAL_RANK: DeepSpeed's default path stays untouched.
    args = None
    if target.index is not None and target.index != int(os.environ.get("LOCAL_RANK", 0)):
        args = SimpleNamespace(device_rank=target.index)
    params = [p for p in model.parameters() if p.requires_grad]
    accelerator = get_accelerator()
    saved_device = None if accelerator.device_name() == "cpu" else accelerator.current_device()
    saved_mpu = groups.mpu  # initialize() replaces it with ours; the segmenter's engine needs it back
    try:
        engine, _, _, _ = deepspeed.initialize(
            args=args, model=model, model_parameters=params, config=cfg, mpu=mpu
        )
    finally:
        groups.mpu = saved_mpu
        if saved_device is not None:
            accelerator.set_device(saved_device)
    return DiscriminatorEngine(engine, mpu, torch.device(engine.device))
