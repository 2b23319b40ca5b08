"""Process-group set-up and one ``deepspeed.initialize`` per engine.

Each engine gets its own deep copy of its config: DeepSpeed keeps and mutates what it is given,
and two engines (e.g. the segmentation pipeline and a discriminator) must never share one dict.
The config is checked against the module's topology before DeepSpeed sees it, so a batch or ZeRO
mistake is one clear line instead of an assert raised on every rank mid start-up.
"""
from __future__ import annotations

import atexit
import copy
import os
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.pipe import PipelineModule

from ds_seg3d.parallel import joint_backward, received_inputs
from ds_seg3d.parallel.ds_config import check_ds_config, topology_for
from ds_seg3d.parallel.launch import free_port
from ds_seg3d.parallel.teardown import destroy_at_exit
from ds_seg3d.parallel.topology import Topology

_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(backend: str | None = None) -> None:
    """Join (or create) the process group; idempotent.

    The backend follows the accelerator (gloo on CPU, nccl on CUDA). Started without a launcher,
    the process becomes a world of one instead of DeepSpeed's MPI discovery, so the same entry
    point works for a quick single-process run.
    """
    if dist.is_initialized():
        return
    if not all(key in os.environ for key in _LAUNCHER_ENV):
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if backend is None:
        backend = get_accelerator().communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    atexit.register(destroy_at_exit)  # see ds_seg3d.parallel.teardown
    _unlink_shm_buffer()


def shm_buffer_path(rank: int | None = None) -> Path:
    """Where DeepSpeed's CPU shared-memory all-reduce keeps this rank's workspace (about 66 MiB)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _unlink_shm_buffer() -> None:
    """Remove the name of this rank's shared-memory all-reduce workspace once every rank has mapped it.

    DeepSpeed's CPU accelerator creates one per rank (when all ranks share a host) and never unlinks
    it, so every job, finished or killed, would leave its workspaces in /dev/shm, which is RAM. The
    mappings stay valid after the unlink; the barrier ensures no rank still has to open a peer's.
    """
    path = shm_buffer_path()
    if not path.exists():
        return
    dist.barrier()
    path.unlink(missing_ok=True)


def module_topology(module: PipelineModule) -> tuple[int, int]:
    """(world size, stages) of a built pipeline module."""
    topo = module.topology()
    return topo.world_size(), topo.get_dim("pipe")


def initialize_pipeline(module: PipelineModule, ds_cfg: dict[str, Any]) -> Any:
    """Wrap a built ``PipelineModule`` in DeepSpeed's ``PipelineEngine`` (ZeRO-0/1 only)."""
    if not isinstance(module, PipelineModule):
        raise TypeError(f"initialize_pipeline needs a PipelineModule, got {type(module).__name__}")
    world, stages = module_topology(module)
    topology: Topology = topology_for(ds_cfg, world, stages)
    check_ds_config(ds_cfg, topology, pipeline=True)
    params = [p for p in module.parameters() if p.requires_grad]
    cfg, scheduler = torch_scheduler(ds_cfg)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=cfg, lr_scheduler=scheduler)
    joint_backward.install(engine)  # one backward per stage and micro-batch, not one per sent tensor
    received_inputs.install(engine)  # one copy of what a stage receives, not three
    return engine


def torch_scheduler(ds_cfg: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(a copy of the config, a client scheduler or None): a ``scheduler`` that DeepSpeed does not define
    but ``torch.optim.lr_scheduler`` does (e.g. ``PolynomialLR``, nnU-Net's poly schedule) is built by us.

    DeepSpeed would build it around its ZeRO optimizer wrapper, which torch's schedulers refuse ("not an
    Optimizer"); as a client scheduler it receives the wrapped torch optimizer, whose parameter groups
    the ZeRO optimizer steps, and DeepSpeed saves and restores its state with the checkpoint.
    """
    from deepspeed.runtime import lr_schedules

    cfg = copy.deepcopy(ds_cfg)
    section = cfg.get("scheduler") or {}
    name = section.get("type")
    if name is None or hasattr(lr_schedules, name) or not hasattr(torch.optim.lr_scheduler, name):
        return cfg, None
    del cfg["scheduler"]
    params = dict(section.get("params") or {})
    return cfg, lambda optimizer: getattr(torch.optim.lr_scheduler, name)(optimizer, **params)


def initialize_plain(model: torch.nn.Module, ds_cfg: dict[str, Any]) -> Any:
    """Wrap an unpipelined model (any ZeRO stage, e.g. the ZeRO-3 memory comparison)."""
    init_distributed()
    topology = topology_for(ds_cfg, dist.get_world_size(), 1)
    check_ds_config(ds_cfg, topology, pipeline=False)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=copy.deepcopy(ds_cfg))
    return engine


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small host tensor over every rank and return it on the host.

    NCCL reduces only device tensors, so the values make the trip through this rank's accelerator
    (on the CPU accelerator, with gloo, that is the host itself).
    """
    import torch.distributed as tdist

    if not tdist.is_initialized():
        return values
    on_device = values.to(get_accelerator().current_device_name())
    tdist.all_reduce(on_device)
    return on_device.cpu()


PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def peer_gone(e: BaseException) -> bool:
    """Whether a collective or send/receive failed because a peer rank's process ended (gloo's wording)."""
    return isinstance(e, RuntimeError) and any(words in str(e) for words in PEER_GONE)
