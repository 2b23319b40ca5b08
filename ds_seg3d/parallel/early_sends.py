"""Send a stage's output as soon as it exists, and let the stage compute while it travels.

DeepSpeed 0.19.8's ``TrainSchedule`` sends micro-batch k's activations one step after its forward pass,
behind the receipt of an earlier micro-batch's gradient (``[RecvGrad(k-1), SendActivation(k),
BackwardPass(k-1)]``), and its ``p2p.send`` blocks until the other stage has received (gloo's send
waits for the matching receive; ``p2p.send`` refuses ``async_op``). So in the steady state both stages
meet at every exchange: the next stage, done with a backward pass, waits for a gradient to travel one
way and then for the activation, computed long before, to travel the other; two transfers per
micro-batch on the critical path, paid by both stages.

``install`` gives one engine the order torch.distributed.pipelining's 1F1B uses: every stage but the
last sends its activations right after the forward pass that made them (the schedule's
``SendActivation`` is moved behind its ``ForwardPass``), and both sends are posted without waiting
(``isend``). Moving the send is only safe because it no longer blocks: with blocking sends, a stage
sending activations while the next one sends a gradient would wait on each other for ever. A stage now
waits only where it needs data (its receives, which stay blocking), and the next stage's receive finds
the activation already sent.

A posted send keeps its tensor alive until it is waited for, so the engine waits: for activations
before the next activations are posted (the stage still holds them in its output buffers then, for the
backward pass, so that costs no memory), for gradients before the stage's next forward or backward
pass (DeepSpeed frees a received input's gradient right after sending it; waiting before the next
compute keeps the peak where it was), and for everything at the end of the schedule. gloo keeps the
order of messages between two ranks, so the receiver matches them as before.

The copied send instructions are DeepSpeed's code of the checked version with ``p2p.send`` replaced;
``install`` compares hashes of the installed sources with the versions checked and refuses to run on
any other (``DS_SEG3D_EARLY_SENDS=0`` keeps DeepSpeed's own, by choice).
"""
from __future__ import annotations

import os
from types import MethodType
from typing import Any

import torch

from ds_seg3d.parallel.joint_backward import check_source

ENV = "DS_SEG3D_EARLY_SENDS"
CHECKED = {
    # sha256 of inspect.getsource(PipelineEngine.<method>) -> DeepSpeed version checked
    "_exec_send_activations": {"c2127e600a5476831a6bbb6f4ff9cde1484a13fed79025f1dafdbe8838befd4f": "0.19.8"},
    "_exec_send_grads": {"fc5d06a5dddd0d22cc5f44ec0bccab66f8c6740f3bef90a3a3577d3647f89ca2": "0.19.8"},
    "_exec_schedule": {"f162568c9f2bf30fe7a398feb387f7279074667eb218f8f5708dde4bea9e6db5": "0.19.8"},
}
SCHEDULE_CHECKED = {"2315b11ec9ed13b58874a66cb3da713170538dd4ed360846defaca79c2096625": "0.19.8"}  # TrainSchedule.steps: the order moved here
PENDING = "_ds_seg3d_pending_sends"  # engine attribute: {"activations": [...], "grads": [...]} of (work, tensor)


def enabled() -> bool:
    """On unless ``DS_SEG3D_EARLY_SENDS=0``."""
    return os.environ.get(ENV, "1").strip() not in ("0", "false", "no", "off")


def check_deepspeed() -> None:
    """Raise unless the installed DeepSpeed's send instructions, schedule loop and train schedule are ones
    this module was checked against."""
    from deepspeed.runtime.pipe.schedule import TrainSchedule

    what = "early sends (ds_seg3d/parallel/early_sends.py)"
    for name, known in CHECKED.items():
        check_source(name, known, what, ENV)
    check_source("steps", SCHEDULE_CHECKED, what, ENV, owner=TrainSchedule)


def install(engine: Any) -> bool:
    """Give ``engine`` (a ``PipelineEngine``) early, non-blocking sends; returns whether it did."""
    if not enabled():
        return False
    check_deepspeed()
    from deepspeed.runtime.pipe import schedule

    setattr(engine, PENDING, {"activations": [], "grads": []})
    engine._INSTRUCTION_MAP = {
        **engine._INSTRUCTION_MAP,
        schedule.SendActivation: send_activations,
        schedule.SendGrad: send_grads,
        schedule.ForwardPass: _after_grad_sends(engine._INSTRUCTION_MAP[schedule.ForwardPass]),
        schedule.BackwardPass: _after_grad_sends(engine._INSTRUCTION_MAP[schedule.BackwardPass]),
    }
    engine._exec_schedule = MethodType(exec_schedule, engine)
    return True


def early_send_steps(steps: Any, sends_activations: bool) -> Any:
    """A pipe schedule's steps with each ``SendActivation`` moved right behind the ``ForwardPass`` of
    the same buffer (the stage sends every forward pass's output once, as before)."""
    from deepspeed.runtime.pipe.schedule import ForwardPass, SendActivation

    for cmds in steps:
        moved = []
        for cmd in cmds:
            if isinstance(cmd, SendActivation):
                continue
            moved.append(cmd)
            if sends_activations and isinstance(cmd, ForwardPass):
                moved.append(SendActivation(cmd.buffer_id))
        yield moved


class _EarlySends:
    """A ``TrainSchedule`` whose steps send activations right after their forward pass."""

    def __init__(self, schedule: Any):
        self.schedule = schedule

    def num_pipe_buffers(self) -> int:
        return self.schedule.num_pipe_buffers()

    def __iter__(self) -> Any:
        return early_send_steps(self.schedule.steps(), self.schedule.stage_id < self.schedule.stages - 1)


def exec_schedule(self: Any, pipe_schedule: Any) -> None:
    """``PipelineEngine._exec_schedule`` on the early-send order for training, then every posted send waited."""
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.pipe.schedule import TrainSchedule

    if isinstance(pipe_schedule, TrainSchedule):
        pipe_schedule = _EarlySends(pipe_schedule)
    PipelineEngine._exec_schedule(self, pipe_schedule)
    wait_sends(self)


def wait_sends(engine: Any, kind: str | None = None) -> None:
    """Wait for the posted sends of one kind (``"activations"``, ``"grads"``) or of all, and drop them."""
    pending = getattr(engine, PENDING)
    for name in ([kind] if kind else list(pending)):
        for work, _ in pending[name]:
            work.wait()
        pending[name] = []


def _isend(self: Any, tensor: torch.Tensor, stage: int, kind: str) -> None:
    """Post ``tensor`` to ``stage`` without waiting (what ``p2p.send`` does, with ``isend``)."""
    from deepspeed import comm as dist
    from deepspeed.runtime.pipe import p2p

    p2p._is_valid_send_recv(self.stage_id, stage)
    work = dist.isend(tensor, self.grid.stage_to_global(stage_id=stage))
    getattr(self, PENDING)[kind].append((work, tensor))


def _after_grad_sends(instruction: Any) -> Any:
    """``instruction`` (a compute pass) preceded by waiting for the stage's posted gradient sends."""

    def compute(self: Any, buffer_id: int) -> None:
        wait_sends(self, "grads")
        return MethodType(instruction, self)(buffer_id=buffer_id)

    compute.__name__ = getattr(instruction, "__name__", "compute")
    return compute


def send_activations(self: Any, buffer_id: int) -> None:
    """DeepSpeed 0.19.8's ``_exec_send_activations`` with non-blocking sends."""
    from deepspeed.runtime.pipe.engine import PIPE_SEND_OUTPUT_TIMER

    if self.wall_clock_breakdown():
        self.timers(PIPE_SEND_OUTPUT_TIMER).start()

    # The change: the previous activations' sends must be done first (their tensors stay referenced in
    # the output buffers for the backward pass anyway), then these are posted without waiting.
    wait_sends(self, "activations")

    outputs = self.pipe_buffers['outputs'][buffer_id]

    # NCCL does not like to send torch.BoolTensor types, so cast the mask to half().
    # We could do char, but with half() we can eventually flatten with other fp16
    # messages (TODO)
    if self.has_attention_mask or self.has_bool_tensors:
        outputs = list(outputs)
        outputs[-1] = outputs[-1].half()
        outputs = tuple(outputs)

    if self.dynamic_shape or self.first_output_send:
        self.first_output_send = False
        self._send_tensor_meta(outputs, self.next_stage)

    if isinstance(outputs, torch.Tensor):
        _isend(self, outputs, self.next_stage, "activations")
    elif isinstance(outputs, tuple):
        for idx, buffer in enumerate(outputs):
            _isend(self, buffer, self.next_stage, "activations")
    else:
        raise NotImplementedError('Could not send output of type '
                                  f'{type(outputs)}')

    # Restore the boolean tensor
    if self.has_attention_mask or self.has_bool_tensors:
        outputs = list(outputs)
        outputs[-1] = outputs[-1].bool()
        outputs = tuple(outputs)

    if self.wall_clock_breakdown():
        self.timers(PIPE_SEND_OUTPUT_TIMER).stop()


def send_grads(self: Any, buffer_id: int) -> None:
    """DeepSpeed 0.19.8's ``_exec_send_grads`` with non-blocking sends (waited before the next compute)."""
    from deepspeed.runtime.pipe.engine import PIPE_SEND_GRAD_TIMER, PartitionedTensor

    if self.wall_clock_breakdown():
        self.timers(PIPE_SEND_GRAD_TIMER).start()

    inputs = self.pipe_buffers['inputs'][buffer_id]

    # Partition the gradient
    if self.is_grad_partitioned:
        if isinstance(inputs, tuple):
            first_input = inputs[0]
            assert all([torch.is_tensor(elt) for elt in inputs[1:]])
            inputs_grad_tail = [elt.grad for elt in inputs[1:]]
        elif torch.is_tensor(inputs):
            first_input = inputs
            inputs_grad_tail = []
        else:
            raise ValueError("expecting a tensor or a tuple of tensors")
        assert torch.is_tensor(first_input)
        part = PartitionedTensor(tensor=first_input.grad, group=self.grid.get_slice_parallel_group())

        inputs = (part.to_meta(), part.data(), *inputs_grad_tail)

    # XXX Terrible hack
    # Drop the attention mask from the input buffer here. It does not have
    # a grad that needs to be communicated. We free the buffer immediately
    # after, so no need to restore it. The receiver also has a hack that skips
    # the recv. This is because NCCL does not let us send torch.BoolTensor :-(.
    if self.has_attention_mask or self.has_bool_tensors:
        inputs = list(inputs)
        inputs.pop()
        inputs = tuple(inputs)

    if isinstance(inputs, torch.Tensor):
        assert inputs.grad is not None
        _isend(self, inputs.grad, self.prev_stage, "grads")
    else:
        # XXX terrible hacky branch
        if self.is_grad_partitioned:
            # First two sends are partitioned gradient
            _isend(self, inputs[0], self.prev_stage, "grads")
            _isend(self, inputs[1], self.prev_stage, "grads")
        else:
            for idx, buffer in enumerate(inputs):
                # Skip tensors that will not produce a grad
                if not buffer.is_floating_point():
                    assert buffer.grad is None
                    continue
                assert buffer.grad is not None
                _isend(self, buffer.grad, self.prev_stage, "grads")

    # We can free up the input buffer now
    self.pipe_buffers['inputs'][buffer_id] = None

    if self.wall_clock_breakdown():
        self.timers(PIPE_SEND_GRAD_TIMER).stop()
