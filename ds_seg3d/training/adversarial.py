"""Adversarial training: the discriminator's step and the adversarial term of the segmenter's loss.

The segmenter stays a pipeline; the discriminator is its own DeepSpeed engine on the last-stage ranks.
On the last stage, the segmenter's ``loss_fn`` adds ``weight x`` a non-saturating GAN term computed
with the discriminator's parameters frozen for that call (so no generator gradient lands in the
discriminator's ``.grad``), and stashes detached (image, probabilities, label) of every micro-batch.
After ``train_batch`` returns, ``discriminator_step`` trains the discriminator once on those pairs:
real (image, one-hot label) against fake (image, probabilities). Stepping inside ``loss_fn`` would
change the weights that the segmenter's pending backward passes use.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ds_seg3d import checkpoint as ckpt
from ds_seg3d.models.discriminator import Discriminator3D, DiscriminatorConfig, one_hot_labels
from ds_seg3d.parallel.discriminator_engine import build_discriminator_engine
from ds_seg3d.parallel.engines import all_reduce_sum
from ds_seg3d.training.losses import main_logits


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters left out of any graph built inside the block (restored afterwards)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class AdversarialLoss:
    """The segmenter's pipeline ``loss_fn(outputs, (labels, images))`` in adversarial mode.

    ``discriminator`` is set on the last-stage ranks once the discriminator engine exists; ``step``
    is set by the training loop before each ``train_batch`` (the term is off during the warm-up).
    """

    def __init__(self, seg_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], num_classes: int,
                 weight: float, warmup_steps: int, ramp_steps: int = 0):
        self.seg_loss = seg_loss
        self.num_classes = num_classes
        self.weight = weight
        self.warmup_steps = warmup_steps
        self.ramp_steps = ramp_steps
        self.discriminator: nn.Module | None = None
        self.step = 0
        self.stash: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.adv_terms: list[float] = []

    @property
    def active(self) -> bool:
        return self.weight > 0 and self.step > self.warmup_steps and self.discriminator is not None

    @property
    def current_weight(self) -> float:
        """``weight``, reached linearly over ``ramp_steps`` steps after the warm-up."""
        if not self.ramp_steps:
            return self.weight
        return self.weight * min(1.0, (self.step - self.warmup_steps) / self.ramp_steps)

    def __call__(self, outputs: torch.Tensor | tuple[torch.Tensor, ...],
                 target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        labels, images = target
        loss = self.seg_loss(outputs, labels)  # with deep supervision, outputs holds the coarser logits too
        probs = torch.softmax(main_logits(outputs).float(), dim=1)
        self.stash.append((images.detach(), probs.detach(), labels.detach()))
        if self.active:
            d = self.discriminator
            device = next(d.parameters()).device
            with frozen(d):
                fake = d(images.to(device), probs.to(device))
            # Non-saturating generator loss: -log D(image, prediction).
            adv = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake)).to(loss.device)
            self.adv_terms.append(float(adv.detach()))
            loss = loss + self.current_weight * adv
        return loss

    def take_stash(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        stash, self.stash = self.stash, []
        return stash


def discriminator_step(engine, stash: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                       num_classes: int, label_smoothing: float = 0.0, gradient_penalty: float = 0.0
                       ) -> dict[str, float]:
    """One optimizer step of the discriminator engine over the stashed micro-batches.

    The engine's gradient accumulation equals the segmenter's micro-batches per step, so DeepSpeed's
    ``step()`` applies the update on the last one. Real pairs are scored against ``1 - label_smoothing``;
    ``gradient_penalty`` adds R1 (gamma / 2 x the squared gradient of the real logits with respect to the
    real segmentation). Returns the loss and the accuracies on real and fake.
    """
    device = next(engine.module.parameters()).device
    losses, real_ok, fake_ok, count = 0.0, 0.0, 0.0, 0
    for images, probs, labels in stash:
        images, probs = images.to(device), probs.to(device)
        real_seg = one_hot_labels(labels.to(device), num_classes)
        real_logits = engine(images, real_seg)
        fake_logits = engine(images, probs)
        loss = 0.5 * (F.binary_cross_entropy_with_logits(real_logits,
                                                         torch.full_like(real_logits, 1.0 - label_smoothing))
                      + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
        if gradient_penalty > 0:
            # Through the bare module: DeepSpeed hooks the engine's outputs and refuses any backward through
            # them (autograd.grad included) outside engine.backward when it runs ZeRO-0, as this engine does.
            seg = real_seg.detach().requires_grad_(True)
            grad, = torch.autograd.grad(engine.module(images, seg).sum(), seg, create_graph=True)
            loss = loss + 0.5 * gradient_penalty * grad.pow(2).flatten(1).sum(1).mean()
        engine.backward(loss)
        engine.step()
        losses += float(loss.detach())
        real_ok += float((real_logits.detach() > 0).float().mean())
        fake_ok += float((fake_logits.detach() < 0).float().mean())
        count += 1
    count = max(count, 1)
    return {"d_loss": losses / count, "d_acc_real": real_ok / count, "d_acc_fake": fake_ok / count}


def with_images_for_last_stage(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
                               ) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    """(images, labels) -> (images, (labels, images)): the last stage gets the image from the data
    iterator, as it gets the labels; nothing but activations travels through the pipe."""
    for images, labels in batches:
        yield images, (labels, images)


def with_lr(ds_cfg: dict, lr: float) -> dict:
    """A copy of the discriminator's DeepSpeed config with its optimizer's (and a constant schedule's) rate
    set to ``lr``; unchanged for 0."""
    if not lr:
        return ds_cfg
    cfg = copy.deepcopy(ds_cfg)
    cfg.setdefault("optimizer", {}).setdefault("params", {})["lr"] = lr
    sched = (cfg.get("scheduler") or {}).get("params", {})
    for key in ("warmup_min_lr", "warmup_max_lr"):
        if key in sched:
            sched[key] = lr
    return cfg


class AdversarialTraining:
    """Everything adversarial mode adds to the loop: the loss, the discriminator engine, its step,
    its metrics (all-reduced so that rank 0 can log them) and its checkpoints."""

    METRICS = ("d_loss", "d_acc_real", "d_acc_fake", "adv_term")

    def __init__(self, seg_loss, num_classes: int, cfg):
        self.cfg = cfg
        self.num_classes = num_classes
        self.loss = AdversarialLoss(seg_loss, num_classes, cfg.weight, cfg.warmup_steps, cfg.ramp_steps)
        self.engine = None

    def attach(self, ds_cfg: dict, topology, rank: int, seed: int, device: str | None = None) -> None:
        """Build the discriminator engine; collective: every rank calls it, last-stage ranks get one."""
        torch.manual_seed(seed)  # identical initial weights on every replica
        model = Discriminator3D(DiscriminatorConfig(in_channels=1, num_classes=self.num_classes,
                                                    width=self.cfg.width, depth=self.cfg.depth,
                                                    patch_wise=self.cfg.patch_wise))
        self.engine = build_discriminator_engine(model, with_lr(ds_cfg, self.cfg.discriminator_lr), topology, rank,
                                                 device=device)
        self.loss.discriminator = self.engine.module if self.engine is not None else None

    def after_batch(self, step: int) -> dict[str, float]:
        """Step the discriminator on this batch's stash (last stage); metrics averaged over its ranks."""
        stash = self.loss.take_stash()
        values = torch.zeros(len(self.METRICS) + 1, dtype=torch.float64)
        if self.engine is not None:
            m = discriminator_step(self.engine, stash, self.num_classes, self.cfg.label_smoothing,
                                   self.cfg.gradient_penalty)
            adv = self.loss.adv_terms
            m["adv_term"] = sum(adv) / len(adv) if adv else 0.0
            values[:-1] = torch.tensor([m[k] for k in self.METRICS], dtype=torch.float64)
            values[-1] = 1.0
        self.loss.adv_terms = []
        values = all_reduce_sum(values)
        count = max(float(values[-1]), 1.0)
        return {k: float(values[i] / count) for i, k in enumerate(self.METRICS)}

    def save(self, run, tag: str) -> None:
        """One writer: the discriminator's first replica (ZeRO-0: every replica holds the whole state)."""
        if self.engine is not None and dist.get_rank(group=self.engine.data_parallel_group) == 0:
            ckpt.save_discriminator(self.engine, run, tag)

    def load(self, run, tag: str) -> None:
        if self.engine is not None:
            ckpt.load_discriminator(self.engine, run, tag)
