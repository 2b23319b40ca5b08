"""Activation memory of one pipeline stage, measured on thin slabs of the patch and extrapolated.

What a stage holds is more than its layers' saved tensors: DeepSpeed's engine keeps a received copy
of the input per in-flight micro-batch and clones it again for the forward pass, persistent
receive and gradient buffers, the first stage's loaded images and the last stage's labels in
``max(2, in-flight)`` pipe buffers, and the last stage's logits with the graph behind them until
their buffer is reused (its backward pass returns before clearing them). On top of that, the
backward pass has a working set (gradients of activations, the convolution's own buffers) that
depends on the device's kernels. Rather than model each of these, ``StageCalibrator`` replays
DeepSpeed's own ``TrainSchedule`` for one stage in one process, with the engine's buffer handling
for every instruction, and measures the peak live bytes with ``PeakTracker``.

It does so on slabs of the patch: full X and Y, a few Z steps of the network (``SLAB_STEPS``). Every
activation, buffer and kernel workspace of a fully convolutional network is linear in Z, so two
slabs give the line and the real patch is a point on it. X and Y stay whole because PyTorch
picks CPU convolution kernels from batch x channels x X x Y (``ConvParams::use_mkldnn``): the
oneDNN kernels need about 5 activations of workspace, the unfolding fallback about 30, and a
cube scaled down in every axis would calibrate on the wrong one. Nothing runs at full size.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ds_seg3d.memory.measurement import PeakTracker
from ds_seg3d.models.layers import LayerDef, build_sequential
from ds_seg3d.parallel import joint_backward
from ds_seg3d.training.losses import DeepSupervisionLoss, DiceCELoss

SEED = 1234
SLAB_STEPS = {torch.float32: (1, 2), torch.bfloat16: (2, 3)}
"""Z steps of the two calibration slabs, by precision. fp32 stages are linear in Z from the first step
on. bf16 stages on a CPU are not: oneDNN's bf16 kernels grow faster than linearly at small Z (a
U-Net stage at 128 x 128 x Z adds 15.5 / 17.3 / 21.2 MiB per 4 Z from Z = 4 on), so the line
through one and two steps falls 7-10 % short at 16; through two and three steps it is within 4 %.
On a GPU both are linear and the thicker slabs only cost a little more calibration time."""


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


@dataclass(frozen=True)
class StageActivations:
    """Activation-side bytes of one stage measured on slabs; ``at(z)`` extrapolates to a patch."""

    slabs: tuple[int, ...]
    """Z sizes calibrated on."""
    peaks: tuple[int, ...]
    """Peak live bytes of a steady step on each slab: held micro-batches, pipe buffers, working set."""
    at_rest: tuple[int, ...]
    """Live bytes between steps on each slab: pipe buffers, receive buffers, retained outputs."""

    def at(self, z: int) -> tuple[int, int]:
        """(peak, at rest) for a patch of depth ``z``."""
        return _extrapolate(self.slabs, self.peaks, z), _extrapolate(self.slabs, self.at_rest, z)


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


class _StageReplay:
    """DeepSpeed's PipelineEngine instructions for one stage, with its buffer handling, on one device."""

    def __init__(self, defs: Sequence[LayerDef], key: StageKey, sample: Tensor, labels: Tensor) -> None:
        self.key, self.sample, self.labels = key, sample, labels
        self.first, self.last = key.stage == 0, key.stage == key.stages - 1
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
        sent = _tensors(self.received)
        if self.recv_buf is None:  # allocated once, on the first receive
            self.recv_buf = [self._pooled(i, t) for i, t in enumerate(sent)]
        for dst, src in zip(self.recv_buf, sent):
            dst.copy_(src)
        recv = self.recv_buf[0] if isinstance(self.received, Tensor) else tuple(self.recv_buf)
        self.buffers["inputs"][buf] = _detached_inputs(recv)

    def _forward(self, buf: int) -> None:
        outputs = self.forward(_clone(self.buffers["inputs"][buf]))
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


def replay_peak(defs: Sequence[LayerDef], key: StageKey, sample_shape: Sequence[int], dtype: torch.dtype,
                classes: int, device: str | torch.device = "cpu") -> tuple[int, int]:
    """(peak, at rest) live bytes of a steady training step of one stage at ``sample_shape``.

    Two steps run: the first creates every lazily allocated buffer (as the warm-up step of a
    measured run does), the second is measured, relative to the live bytes before the first.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(SEED)
        sample = torch.randn(tuple(sample_shape), device=device).to(dtype)
        labels = torch.zeros((sample.shape[0], *sample.shape[2:]), dtype=torch.long, device=device)
        replay = _StageReplay(defs, key, sample, labels)
        tracker = PeakTracker(device).start()
        with tracker.window("base"):
            pass
        micro = key.micro_batches
        if key.plain:
            replay.run_plain(1)
            with tracker.window("step"):
                replay.run_plain(micro)
        else:
            replay.run_step(micro)
            with tracker.window("step"):
                replay.run_step(micro)
        tracker.stop()
    base, step = tracker.result("base"), tracker.result("step")
    return step.peak - base.end, step.start - base.end


def effective_micro_batches(key: StageKey) -> int:
    """Micro-batches that reproduce the steady state of ``key.micro_batches``: every pipe buffer
    used once and then reused, which is all that more micro-batches repeat."""
    if key.plain:
        return 1
    in_flight = min(key.stages - key.stage, key.micro_batches)
    return min(key.micro_batches, max(2, in_flight) + 1)


class StageCalibrator:
    """Replays stages on slabs of the patch and extrapolates linearly in Z; results are cached."""

    def __init__(self, defs: Sequence[LayerDef], sample_shape: Sequence[int], z_step: int, dtype: torch.dtype,
                 classes: int, device: str | torch.device = "cpu", slab_steps: Sequence[int] | None = None) -> None:
        self.defs, self.shape = list(defs), tuple(sample_shape)
        self.dtype, self.classes, self.device = dtype, classes, device
        slab_steps = SLAB_STEPS.get(dtype, SLAB_STEPS[torch.float32]) if slab_steps is None else slab_steps
        self.slabs = tuple(sorted({z_step * k for k in slab_steps}))
        self._cache: dict[StageKey, StageActivations] = {}

    def __call__(self, key: StageKey) -> StageActivations:
        key = StageKey(key.start, key.stop, key.stages, key.stage, effective_micro_batches(key), key.checkpoint,
                       key.plain, key.zero3)
        if key not in self._cache:
            points = [replay_peak(self.defs, key, (*self.shape[:-1], z), self.dtype, self.classes, self.device)
                      for z in self.slabs]
            self._cache[key] = StageActivations(self.slabs, tuple(p[0] for p in points), tuple(p[1] for p in points))
        return self._cache[key]


def _extrapolate(zs: Sequence[int], values: Sequence[int], z: int) -> int:
    """The line through the slab measurements, at ``z`` (one slab: proportional)."""
    if len(zs) == 1:
        return int(round(values[0] * z / zs[0]))
    (z0, z1), (v0, v1) = zs[-2:], values[-2:]
    slope = (v1 - v0) / (z1 - z0)
    return int(round(v1 + slope * (z - z1)))
