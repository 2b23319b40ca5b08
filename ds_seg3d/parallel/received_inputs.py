"""One copy of each tensor a stage receives, not three.

DeepSpeed 0.19.8's ``PipelineEngine`` receives a stage's input into a persistent buffer
(``_exec_recv_activations``: ``p2p.recv(buffer)``), stores a clone of it per in-flight micro-batch
(``recvd = buffer.clone().detach()``, the leaf whose gradient is sent back), and its forward pass runs
on yet another clone (``_exec_forward_pass``: ``inputs = tuple(t.clone() for t in ...)``). For a U-Net
the received tensors are the full-resolution skips, the largest tensors of the network. Autograd
needs one of them: the leaf that the forward pass reads and that collects the input gradient.

``install`` gives one engine the two instructions with that one copy: the tensors are received
straight into fresh leaves (the persistent buffers serve only as shape and dtype records on the meta
device, and the pool DeepSpeed shares between receive and gradient buffers is left to the gradients),
and the forward pass runs on the stored leaves themselves. The gradients are the same (the stage's
input gradient lands in the same leaf's ``.grad``, which ``_exec_send_grads`` sends); a layer that
modified its received input in place would now fail loudly ("a leaf Variable that requires grad is
being used in an in-place operation") instead of writing into a private copy: no ds-seg3d layer does.

Everything else in both instructions is DeepSpeed's own code of the checked version, copied unchanged;
``install`` compares hashes of the installed sources with the versions checked and refuses to run on
any other (``DS_SEG3D_ONE_COPY=0`` keeps DeepSpeed's own, by choice).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from ds_seg3d.parallel.joint_backward import check_source

ENV = "DS_SEG3D_ONE_COPY"
CHECKED = {
    # sha256 of inspect.getsource(PipelineEngine.<method>) -> DeepSpeed version checked
    "_exec_recv_activations": {"04213b4788a27299e193230dbfdee170c4f05f4baf78c74cac3e67b3d0877831": "0.19.8"},
    "_exec_forward_pass": {"cf4dfb0f5996528b4d19aa60a0daea09885b8ddbf19ff7bba640e57b6dd7d56e": "0.19.8"},
}


def enabled() -> bool:
    """On unless ``DS_SEG3D_ONE_COPY=0``."""
    return os.environ.get(ENV, "1").strip() not in ("0", "false", "no", "off")


def check_deepspeed() -> None:
    """Raise unless the installed DeepSpeed's two instructions are ones this module was checked against."""
    for name, known in CHECKED.items():
        check_source(name, known, "one-copy receive (ds_seg3d/parallel/received_inputs.py)", ENV)


def install(engine: Any) -> bool:
    """Give ``engine`` (a ``PipelineEngine``) the one-copy receive and forward; returns whether it did."""
    if not enabled():
        return False
    check_deepspeed()
    from deepspeed.runtime.pipe import schedule

    engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, schedule.RecvActivation: recv_activations,
                               schedule.ForwardPass: forward_pass}
    return True


def _as_record(buffer: Any) -> Any:
    """A received buffer's shape and dtype, without its memory."""
    if isinstance(buffer, torch.Tensor):
        return torch.empty_like(buffer, device="meta")
    return tuple(torch.empty_like(b, device="meta") for b in buffer)


def recv_activations(self: Any, buffer_id: int) -> None:
    """DeepSpeed 0.19.8's ``_exec_recv_activations``, receiving into fresh leaves instead of a buffer + clone."""
    from deepspeed.runtime.pipe import p2p
    from deepspeed.runtime.pipe.engine import PIPE_RECV_INPUT_TIMER

    if self.wall_clock_breakdown():
        self.timers(PIPE_RECV_INPUT_TIMER).start()

    recvd = None

    # Allocate the buffer if necessary
    if self.dynamic_shape or self.pipe_recv_buf is None:
        # The change: keep only the shapes; the pool slots DeepSpeed just sized for them go back to the
        # gradient buffers (which size their own slots when they first arrive).
        self.pipe_recv_buf = _as_record(self._recv_tensor_meta(self.prev_stage))
        self._grad_layer_buf = []

    if isinstance(self.pipe_recv_buf, torch.Tensor):
        recvd = torch.empty_like(self.pipe_recv_buf, device=self.device)
        p2p.recv(recvd, self.prev_stage)
        recvd.requires_grad = recvd.is_floating_point()
    else:
        assert isinstance(self.pipe_recv_buf, tuple)
        recvd = [None] * len(self.pipe_recv_buf)
        for idx, record in enumerate(self.pipe_recv_buf):
            buffer = torch.empty_like(record, device=self.device)
            # XXX hardcode meta type
            if self.is_pipe_partitioned and idx == 0 and buffer.dtype != torch.long:
                if self.meta_buffer is None:
                    self.meta_buffer = torch.zeros(buffer.size(), dtype=torch.long, device=self.device)
                buffer = self.meta_buffer

            p2p.recv(buffer, self.prev_stage)
            # the meta record is received into the one reused buffer, so that one is still copied
            recvd[idx] = buffer.clone().detach() if buffer is self.meta_buffer else buffer

        # NCCL does not like to send torch.BoolTensor types, so un-cast the
        # attention mask
        if self.has_attention_mask or self.has_bool_tensors:
            recvd[-1] = recvd[-1].bool()

        recvd = tuple(recvd)

        for buffer in recvd:
            buffer.requires_grad = buffer.is_floating_point()

    self.pipe_buffers['inputs'][buffer_id] = recvd

    if self.wall_clock_breakdown():
        self.timers(PIPE_RECV_INPUT_TIMER).stop()


def forward_pass(self: Any, buffer_id: int) -> None:
    """DeepSpeed 0.19.8's ``_exec_forward_pass``, running on the stored inputs instead of clones of them."""
    from collections import OrderedDict

    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PartitionedTensor

    self.tput_timer.start()

    # The change: no clone. The stored tensors are leaves (received: requires_grad; loaded: no grad), and
    # autograd collects the input gradient in them directly.
    inputs = self.pipe_buffers['inputs'][buffer_id]

    # collect the partitioned input from the previous stage
    if self.is_pipe_partitioned and not self.is_first_stage():
        if self.pipe_partition_input_meta_cache is None:
            self.pipe_partition_input_meta_cache = inputs[0].to('cpu')
        part_input = PartitionedTensor.from_meta(meta=self.pipe_partition_input_meta_cache,
                                                 local_part=inputs[1],
                                                 group=self.grid.get_slice_parallel_group())

        inputs = (part_input.full(), *inputs[2:])
        inputs[0].requires_grad = True
        # skip mask
        #inputs[1].requires_grad = True
        part_input = None
        inputs = inputs[0] if len(inputs) == 1 else inputs
        self.pipe_buffers['inputs'][buffer_id] = inputs

    outputs = DeepSpeedEngine.forward(self, inputs)

    # Reset activation checkpointing buffers.
    # Need to call this between evaluation iterations
    if not self.module.training:
        ds_checkpointing.reset()

    # Partition the outputs if we are not the last stage
    if self.is_pipe_partitioned and not self.is_last_stage():
        if isinstance(outputs, tuple):
            first_output = outputs[0]
            # TODO: Improve pipe partitioning to pass multiple tensors that require grads
            assert all([torch.is_tensor(elt) and elt.requires_grad is False for elt in outputs[1:]])
            outputs_tail = outputs[1:]
        elif torch.is_tensor(outputs):
            first_output = outputs
            outputs_tail = []
        else:
            raise ValueError("expecting a tensor or a tuple of tensors")
        part = PartitionedTensor(tensor=first_output, group=self.grid.get_slice_parallel_group())
        # Clear the large output data, but save the computation graph
        first_output.data = torch.zeros(1, device=first_output.data.device)
        self.pipe_buffers['output_tensors'][buffer_id] = first_output
        # Inject the partitioned tensor into the output before sending
        outputs = (part.to_meta(), part.data(), *outputs_tail)
        part = None

    self.pipe_buffers['outputs'][buffer_id] = outputs

    # Optionally compute loss on the last device
    if self.is_last_stage():
        if self._compute_loss and self.module.loss_fn is not None:
            labels = self.pipe_buffers['labels'][buffer_id]
            self.loss = self.module.loss_fn(outputs, labels)
        else:
            # Some models just return loss from forward()
            self.loss = outputs
        if self.eval_return_logits:
            self.outputs = outputs

        if isinstance(self.loss, torch.Tensor):
            self.fwd_outputs.append(self.loss.detach())
        else:
            self.fwd_outputs.append([l.detach() for l in self.loss])

        def add_to_total_loss(_total_loss: Any, _loss: Any) -> Any:
            if isinstance(_loss, torch.Tensor):
                if _total_loss is None:
                    _total_loss = torch.zeros_like(_loss)
                _total_loss += _loss.detach()
            else:
                if _total_loss is None:
                    _total_loss = [torch.zeros_like(_l) for _l in _loss]
                for _idx, _l in enumerate(_loss):
                    _total_loss[_idx] += _l.detach()
            return _total_loss

        self.total_loss = add_to_total_loss(self.total_loss, self.loss)

        # aggregate additional losses across gradient accumulation steps
        additional_losses = self.module.get_additional_losses()
        if additional_losses is not None:
            if self.total_additional_losses is None:
                self.total_additional_losses = OrderedDict()
            for name, loss in additional_losses.items():
                total = self.total_additional_losses[name] if name in self.total_additional_losses else None
                self.total_additional_losses[name] = add_to_total_loss(total, loss)
