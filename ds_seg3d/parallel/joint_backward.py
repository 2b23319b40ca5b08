"""One backward pass per stage and micro-batch, however many tensors the stage sends.

Since v0.18.5 (PR 7787) DeepSpeed's ``PipelineEngine._exec_backward_pass`` back-propagates each output
tensor of a stage on its own, ``out.backward(gradient=grad, retain_graph=i < n - 1)``. A U-Net stage
sends its skips too, and they share the encoder that made them: the encoder's graph is walked once per
skip (measured: 0.517 s against 0.215 s per micro-batch on a U-Net's first stage) and kept alive until
the last walk. Up to v0.18.4 it was one ``torch.autograd.backward(tensors, grad_tensors)``, which gives
the same gradients in one walk. ``install`` puts that single call back, for one engine, through the
narrowest opening DeepSpeed has: the engine's instruction map, which ``_exec_schedule`` reads from the
instance. Everything around the call is DeepSpeed's own code of the checked version, copied unchanged
(pipe-partition restore, bf16 ``clear_lp_grads`` / ``update_hp_grads``, ``_running_engine_backward``,
the output hooks DeepSpeed registered in ``forward`` that scale each output's gradient by the
accumulation steps and run the backward prologue once).

The copy is tied to DeepSpeed's source: ``install`` compares a hash of the installed
``_exec_backward_pass`` with the versions this was checked against and refuses to run on any other
rather than silently fall back (``DS_SEG3D_JOINT_BACKWARD=0`` keeps DeepSpeed's own, by choice).
"""
from __future__ import annotations

import hashlib
import inspect
import os
from typing import Any

import torch

ENV = "DS_SEG3D_JOINT_BACKWARD"
CHECKED = {
    # sha256 of inspect.getsource(PipelineEngine._exec_backward_pass) -> DeepSpeed version checked
    "ae2eeff56b84d1e4a7dfd458d379fccd9e7f996598a201e8f1abf1b0e72a1e63": "0.19.8",
}


def source_digest(function: Any) -> str:
    """sha256 of a function's source: how an override here recognises the DeepSpeed code it was copied from."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def enabled() -> bool:
    """On unless ``DS_SEG3D_JOINT_BACKWARD=0``."""
    return os.environ.get(ENV, "1").strip() not in ("0", "false", "no", "off")


def check_source(name: str, known: dict[str, str], what: str, env: str) -> None:
    """Raise unless ``PipelineEngine.<name>``'s source hashes to one of ``known`` (sha256 -> DeepSpeed version):
    an override copied from DeepSpeed's code refuses to run beside code it was not checked against."""
    import deepspeed
    from deepspeed.runtime.pipe.engine import PipelineEngine

    digest = source_digest(getattr(PipelineEngine, name))
    if digest not in known:
        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__}: PipelineEngine.{name} differs from the versions the {what} was "
            f"checked against ({', '.join(sorted(set(known.values())))}; source sha256 {digest[:12]}); check it "
            f"against that code, or set {env}=0 to run DeepSpeed's own")


def check_deepspeed() -> None:
    """Raise unless the installed DeepSpeed's ``_exec_backward_pass`` is one this module was checked against."""
    check_source("_exec_backward_pass", CHECKED, "joint backward (ds_seg3d/parallel/joint_backward.py)", ENV)


def install(engine: Any) -> bool:
    """Give ``engine`` (a ``PipelineEngine``) the joint backward; returns whether it did (see ``enabled``)."""
    if not enabled():
        return False
    check_deepspeed()
    from deepspeed.runtime.pipe import schedule

    engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, schedule.BackwardPass: joint_backward_pass}
    return True


def joint_backward_pass(self: Any, buffer_id: int) -> None:
    """DeepSpeed 0.19.8's ``PipelineEngine._exec_backward_pass`` with one ``torch.autograd.backward`` over a
    stage's outputs instead of one ``backward`` per output."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import (
        BACKWARD_GLOBAL_TIMER,
        BACKWARD_INNER_GLOBAL_TIMER,
        BACKWARD_INNER_MICRO_TIMER,
        BACKWARD_MICRO_TIMER,
        PartitionedTensor,
    )

    assert self.optimizer is not None, "must provide optimizer during " \
                                       "init in order to use backward"

    # The last stage just runs backward on the loss using DeepSpeed's typical
    # mechanisms.
    if self.is_last_stage():
        DeepSpeedEngine.backward(self, self.loss)
        return

    outputs = self.pipe_buffers['outputs'][buffer_id]

    if self.wall_clock_breakdown():
        self.timers(BACKWARD_MICRO_TIMER).start()
        self.timers(BACKWARD_GLOBAL_TIMER).start()
        self.timers(BACKWARD_INNER_MICRO_TIMER).start()
        self.timers(BACKWARD_INNER_GLOBAL_TIMER).start()

    # Reconstruct if we previously partitioned the output. We must be
    # careful to also restore the computational graph of the tensors we partitioned.
    if self.is_pipe_partitioned:
        if self.is_grad_partitioned:
            if self.pipe_partition_output_meta_cache is None:
                self.pipe_partition_output_meta_cache = outputs[0].to('cpu')
            part_output = PartitionedTensor.from_meta(meta=self.pipe_partition_output_meta_cache,
                                                      local_part=outputs[1],
                                                      group=self.grid.get_slice_parallel_group())
            self.pipe_buffers['output_tensors'][buffer_id].data = part_output.full()
            outputs = (self.pipe_buffers['output_tensors'][buffer_id], *outputs[2:])
        else:
            # Already restored from partition
            self.pipe_buffers['output_tensors'][buffer_id].data = outputs[0]
            outputs = (self.pipe_buffers['output_tensors'][buffer_id], *outputs[1:])

    grad_tensors = self.grad_layer
    if self.is_grad_partitioned:
        if self.grad_partition_grad_layer_meta_cache is None:
            self.grad_partition_grad_layer_meta_cache = self.grad_layer[0].to('cpu')
        part_grad = PartitionedTensor.from_meta(meta=self.grad_partition_grad_layer_meta_cache,
                                                local_part=self.grad_layer[1],
                                                group=self.grid.get_slice_parallel_group())
        grad_tensors = (part_grad.full(), *grad_tensors[2:])
        part_grad = None

    if self.using_bf16_optimizer and not self.is_last_stage():
        # manually call because we don't call optimizer.backward()
        self.optimizer.clear_lp_grads()

    # Set _running_engine_backward to avoid RuntimeError in post-backward hook
    # when needs_scaler=True (the hook checks this flag to skip error checking)
    self._running_engine_backward = True
    try:
        if isinstance(outputs, tuple):
            out_tensors = [t for t in outputs if t.is_floating_point()]
            assert len(out_tensors) == len(grad_tensors)
            # The one change: all outputs in one walk of the graph they share.
            torch.autograd.backward(tensors=out_tensors, grad_tensors=list(grad_tensors))
        else:
            outputs.backward(gradient=grad_tensors)
    finally:
        self._running_engine_backward = False

    if self.using_bf16_optimizer and not self.is_last_stage():
        # manually call because we don't call optimizer.backward()
        if not self._config.bfloat16_config.immediate_grad_update:
            self.optimizer.update_hp_grads(clear_lp_grads=False)

    # Free up the memory from the output of forward()
    self.pipe_buffers['output_tensors'][buffer_id] = None
    self.pipe_buffers['outputs'][buffer_id] = None
    grad_tensors = None

    if self.wall_clock_breakdown():
        self.timers(BACKWARD_INNER_MICRO_TIMER).stop()
        self.timers(BACKWARD_INNER_GLOBAL_TIMER).stop()
        self.timers(BACKWARD_MICRO_TIMER).stop()
        self.timers(BACKWARD_GLOBAL_TIMER).stop()
