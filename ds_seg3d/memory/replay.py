"""DeepSpeed's pipeline schedule for one stage, replayed in one process: what the stage holds, and when.

What a stage holds is more than its layers' saved tensors: the engine keeps the received input per
in-flight micro-batch (DeepSpeed's own receive path also a persistent receive buffer and a clone for
the forward pass; ds-seg3d's engine receives into that one copy, see ``received_inputs``), gradient
buffers, the first stage's loaded images and the last stage's labels in
``max(2, in-flight)`` pipe buffers, and the last stage's logits with the graph behind them until
their buffer is reused (its backward pass returns before clearing them). On top of that, the
backward pass has a working set (gradients of activations, the convolution's own buffers) that
depends on the device's kernels. Rather than model each of these, ``StageReplay`` runs DeepSpeed's own
``TrainSchedule`` for one stage, with the engine's buffer handling for every instruction.

It runs on two kinds of device. On the real one, ``replay_peak`` measures the peak live bytes with
``PeakTracker`` (the reference, and the planner's method on a GPU, where it takes milliseconds). On the
meta device, ``traced_peak`` counts every tensor the ops allocate with ``LiveBytes`` and adds each
kernel's workspace from a table measured once per network (``ds_seg3d.memory.workspace``): no compute,
so a stage at its full patch costs the same fraction of a second as a slab, and the planner never
extrapolates the tensors.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ds_seg3d.memory.live_bytes import LiveBytes
from ds_seg3d.memory.measurement import PeakTracker
from ds_seg3d.models.layers import LayerDef, build_sequential
from ds_seg3d.parallel import joint_backward, received_inputs
from ds_seg3d.training.losses import DeepSupervisionLoss, DiceCELoss

SEED = 1234


@dataclass(frozen=True)
class StageKey:
    """What a stage's activation memory depends on (besides the model and the patch)."""

    start: int
    stop: int
    stages: int
    stage: int
    micro_batches: int
    checkpoint: int
    plain: bool = False
    zero3: bool = False
    """ZeRO-3 wraps every module's inputs and outputs in identity autograd functions (see below)."""


def _tensors(x: Any) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else [t for t in x]


def _detached_inputs(x: Any) -> Any:
    """What ``_exec_recv_activations`` stores: clones that require grad (float tensors only)."""
    if isinstance(x, Tensor):
        r = x.clone().detach()
        r.requires_grad = r.is_floating_point()
        return r
    out = tuple(t.clone().detach() for t in x)
    for t in out:
        t.requires_grad = t.is_floating_point()
    return out


def _clone(x: Any) -> Any:
    return x.clone() if isinstance(x, Tensor) else tuple(t.clone() for t in x)


def _identity_function() -> type[torch.autograd.Function]:
    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(x: Tensor) -> Tensor:
            return x.detach()

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            pass

        @staticmethod
        def backward(ctx: Any, *grads: Tensor) -> Any:
            return grads
    return Identity


def add_zero3_hooks(root: nn.Module) -> None:
    """What ZeRO-3's parameter coordinator does to activations (``runtime/zero/parameter_offload.py``):
    every module's tensor inputs and outputs pass through an identity ``autograd.Function`` returning
    ``detach()``. That changes the backward working set: an in-place activation after a norm then
    acts on a fresh tensor instead of a view, and autograd needs no ``CopySlices`` buffers for it."""
    fn = _identity_function()

    def wrap(value: Any) -> Any:
        if isinstance(value, Tensor):
            return fn.apply(value) if value.requires_grad or value.is_floating_point() else value
        if isinstance(value, tuple):
            return tuple(wrap(v) for v in value)
        return value

    for module in root.modules():
        module.register_forward_pre_hook(lambda m, args: wrap(args))
        module.register_forward_hook(lambda m, args, out: wrap(out))


def stage_forward(layers: nn.Sequential, checkpoint: int) -> Callable[[Any], Any]:
    """``PipelineModule.forward`` for one stage: chunks of ``checkpoint`` layers through DeepSpeed's
    non-reentrant checkpoint (every layer here has parameters, so every chunk is checkpointable)."""
    funcs = list(layers)

    def run_range(start: int, end: int) -> Callable[..., Any]:
        def run(*inputs: Any) -> Any:
            x = inputs[0] if len(inputs) == 1 else inputs
            for f in funcs[start:end]:
                x = f(x)
            return x
        return run

    if checkpoint == 0:
        return lambda x: run_range(0, len(funcs))(x)
    from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint

    def forward(x: Any) -> Any:
        for start in range(0, len(funcs), checkpoint):
            end = min(start + checkpoint, len(funcs))
            x = non_reentrant_checkpoint(run_range(start, end), *(x if isinstance(x, tuple) else (x,)))
        return x
    return forward


class StageReplay:
    """DeepSpeed's PipelineEngine instructions for one stage, with its buffer handling, on one device."""

    def __init__(self, defs: Sequence[LayerDef], key: StageKey, sample: Tensor, labels: Tensor) -> None:
        self.key, self.sample, self.labels = key, sample, labels
        self.first, self.last = key.stage == 0, key.stage == key.stages - 1
        if sample.device.type == "meta":  # no weights to initialise
            with torch.device("meta"):
                layers = build_sequential(defs)
        else:
            layers = build_sequential(defs, seed=SEED)
        dtype = sample.dtype
        layers.to(device=sample.device, dtype=dtype).train()
        with torch.no_grad():  # what the previous stage sends: the prefix's output on this slab
            x: Any = sample
            for layer in list(layers)[: key.start]:
                x = layer(x)
        self.received = x if key.start > 0 else None
        self.layers = nn.Sequential(*list(layers)[key.start: key.stop])
        del layers
        for p in self.layers.parameters():  # gradients are model state, accounted for apart
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
        if key.zero3:
            add_zero3_hooks(self.layers)
            self.forward = self.layers
        else:
            self.forward = stage_forward(self.layers, key.checkpoint)
        self.loss_fn = DeepSupervisionLoss(DiceCELoss())
        self.buffers: dict[str, list[Any]] = {}
        self.recv_buf: Any = None
        self.grad_layer: Any = None
        self.pool: list[Tensor] = []
        self.loss: Tensor | None = None

    def batch(self) -> tuple[Tensor, Tensor]:
        """A fresh micro-batch, as the data iterator hands it out."""
        return torch.randn_like(self.sample), torch.randint_like(self.labels, 0, 2)

    def run_plain(self, micro_batches: int) -> None:
        """The unpipelined engine: forward, loss, backward per micro-batch, nothing kept between them."""
        for _ in range(micro_batches):
            images, labels = self.batch()
            loss = self.loss_fn(self.forward(images), labels)
            loss.backward()
            del images, labels, loss

    def run_step(self, micro_batches: int) -> None:
        from deepspeed.runtime.pipe import schedule as sched

        schedule = sched.TrainSchedule(micro_batches=micro_batches, stages=self.key.stages, stage_id=self.key.stage)
        n = schedule.num_pipe_buffers()
        for name in ("inputs", "labels", "outputs"):
            self.buffers.setdefault(name, [None] * n)
        handlers = {sched.LoadMicroBatch: self._load, sched.ForwardPass: self._forward,
                    sched.BackwardPass: self._backward, sched.RecvActivation: self._recv_activation,
                    sched.SendGrad: self._send_grad, sched.RecvGrad: self._recv_grad}
        for commands in schedule.steps():
            for cmd in commands:
                handler = handlers.get(type(cmd))
                if handler is not None:
                    handler(cmd.buffer_id)

    def _load(self, buf: int) -> None:
        images, labels = self.batch()
        if self.first:
            self.buffers["inputs"][buf] = images.clone().detach()
        if self.last:
            self.buffers["labels"][buf] = labels

    def _pooled(self, idx: int, like: Tensor) -> Tensor:
        """``PipelineEngine._allocate_or_extend_buffers``: receive and gradient buffers share one pool by
        position, each slot grown only when a larger tensor arrives (a middle stage's received input and
        the gradient of its output often occupy the same memory)."""
        n = like.numel()
        if len(self.pool) <= idx or self.pool[idx].numel() < n:
            new = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
            if len(self.pool) <= idx:
                self.pool.append(new)
            else:
                self.pool[idx] = new
            return new
        return self.pool[idx].flatten()[:n].view(like.shape)

    def _recv_activation(self, buf: int) -> None:
        if received_inputs.enabled():  # ds-seg3d's engine: received straight into fresh leaves, no buffer
            self.buffers["inputs"][buf] = _detached_inputs(self.received)
            return
        sent = _tensors(self.received)
        if self.recv_buf is None:  # allocated once, on the first receive
            self.recv_buf = [self._pooled(i, t) for i, t in enumerate(sent)]
        for dst, src in zip(self.recv_buf, sent):
            dst.copy_(src)
        recv = self.recv_buf[0] if isinstance(self.received, Tensor) else tuple(self.recv_buf)
        self.buffers["inputs"][buf] = _detached_inputs(recv)

    def _forward(self, buf: int) -> None:
        inputs = self.buffers["inputs"][buf]  # ds-seg3d's engine runs on them; DeepSpeed's own on clones
        outputs = self.forward(inputs if received_inputs.enabled() else _clone(inputs))
        self.buffers["outputs"][buf] = outputs
        if self.last:
            self.loss = self.loss_fn(outputs, self.buffers["labels"][buf])

    def _recv_grad(self, buf: int) -> None:
        if self.grad_layer is None:
            outs = [t for t in _tensors(self.buffers["outputs"][buf]) if t.is_floating_point()]
            self.grad_layer = [self._pooled(i, t) for i, t in enumerate(outs)]
        for g in self.grad_layer:
            g.normal_()

    def _backward(self, buf: int) -> None:
        if self.last:  # the engine returns here: the outputs stay in their buffer until it is reused
            self.loss.backward()
            return
        outs = [t for t in _tensors(self.buffers["outputs"][buf]) if t.is_floating_point()]
        if joint_backward.enabled():  # what ds_seg3d's engine does: one walk over every sent tensor
            torch.autograd.backward(outs, list(self.grad_layer[:len(outs)]))
        else:  # DeepSpeed's own: one walk per tensor, the graph kept until the last
            for i, (out, grad) in enumerate(zip(outs, self.grad_layer)):
                out.backward(gradient=grad, retain_graph=i < len(outs) - 1)
        self.buffers["outputs"][buf] = None

    def _send_grad(self, buf: int) -> None:
        self.buffers["inputs"][buf] = None


@contextlib.contextmanager
def _checkpoint_on_own_device(device: torch.device) -> Iterator[None]:
    """DeepSpeed's checkpoint copies its inputs to the accelerator's device, where they already are (a
    no-op that returns the same tensors); on the meta device that copy would read data, so it is
    replaced by the identity it amounts to."""
    if device.type != "meta":
        yield
        return
    from unittest import mock

    from deepspeed.runtime.activation_checkpointing import checkpointing

    with mock.patch.object(checkpointing, "copy_to_device", lambda item, device, criterion_func: item):
        yield


@contextlib.contextmanager
def stage_replay(defs: Sequence[LayerDef], key: StageKey, sample_shape: Sequence[int], dtype: torch.dtype,
                 device: str | torch.device) -> Iterator[StageReplay]:
    """A ``StageReplay`` on ``device`` (``"meta"`` to trace), with the caller's random state kept."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _checkpoint_on_own_device(device):
        torch.manual_seed(SEED)
        sample = torch.randn(tuple(sample_shape), device=device).to(dtype)
        labels = torch.zeros((sample.shape[0], *sample.shape[2:]), dtype=torch.long, device=device)
        yield StageReplay(defs, key, sample, labels)


def _two_steps(replay: StageReplay, key: StageKey, before_second: Callable[[], None]) -> None:
    """A warm-up step, which creates every lazily allocated buffer (as the warm-up step of a measured
    run does), then the step that is measured."""
    run = replay.run_plain if key.plain else replay.run_step
    run(1 if key.plain else key.micro_batches)
    before_second()
    run(key.micro_batches)


def replay_peak(defs: Sequence[LayerDef], key: StageKey, sample_shape: Sequence[int], dtype: torch.dtype,
                classes: int, device: str | torch.device = "cpu") -> tuple[int, int]:
    """(peak, at rest) live bytes of a steady training step of one stage at ``sample_shape``, measured on
    the real device, relative to the live bytes before the warm-up step."""
    device = torch.device(device)
    with stage_replay(defs, key, sample_shape, dtype, device) as replay:
        tracker = PeakTracker(device).start()
        with tracker.window("base"):
            pass
        with contextlib.ExitStack() as measured_step:
            _two_steps(replay, key, lambda: measured_step.enter_context(tracker.window("step")))
        tracker.stop()
    base, measured = tracker.result("base"), tracker.result("step")
    return measured.peak - base.end, measured.start - base.end


def traced_peak(defs: Sequence[LayerDef], key: StageKey, sample_shape: Sequence[int], dtype: torch.dtype,
                workspace: Mapping[Hashable, int] | None = None) -> tuple[int, int]:
    """``replay_peak`` traced on the meta device: every tensor the ops allocate, plus each kernel's
    ``workspace`` (by op signature) while it runs."""
    with stage_replay(defs, key, sample_shape, dtype, "meta") as replay, LiveBytes(workspace) as mode:
        rest: list[int] = []
        _two_steps(replay, key, lambda: (rest.append(mode.live), mode.reset_peak()))
    return mode.peak, rest[0]


def effective_micro_batches(key: StageKey) -> int:
    """Micro-batches that reproduce the steady state of ``key.micro_batches``: every pipe buffer
    used once and then reused, which is all that more micro-batches repeat."""
    if key.plain:
        return 1
    in_flight = min(key.stages - key.stage, key.micro_batches)
    return min(key.micro_batches, max(2, in_flight) + 1)


def canonical_key(key: StageKey) -> StageKey:
    """The smallest replay with the same memory as ``key``.

    A stage's instructions depend on its layers, on whether it is the first or the last stage, and on
    ``min(p - s, m)``, the micro-batches it holds at once: 1F1B runs ``p - s - 1`` warm-up forwards,
    so a stage with at least ``m`` stages from it to the end runs all ``m`` forwards and then all
    backwards, whatever ``p``. Stages of different pipelines that agree on those share one replay."""
    if key.plain:
        return replace(key, stages=1, stage=0, micro_batches=1)
    first, last = key.stage == 0, key.stage == key.stages - 1
    depth = max(2, min(key.stages - key.stage, key.micro_batches))
    if first and last:
        stages, stage = 1, 0
    elif first:
        stages, stage = depth, 0
    elif last:
        stages, stage = 2, 1
    else:
        stages, stage = depth + 1, 1
    return replace(key, stages=stages, stage=stage, micro_batches=effective_micro_batches(key))
