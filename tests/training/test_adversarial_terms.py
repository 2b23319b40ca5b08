"""The adversarial term's schedule and the discriminator's stabilisers, one process, no launcher."""
from __future__ import annotations

import pytest
import torch

from ds_seg3d.models.discriminator import Discriminator3D, DiscriminatorConfig
from ds_seg3d.training.adversarial import AdversarialLoss


def test_the_adversarial_weight_ramps_up_after_the_warm_up():
    loss = AdversarialLoss(lambda logits, labels: logits.sum() * 0, 2, weight=0.1, warmup_steps=10, ramp_steps=20)
    for step, expected in ((11, 0.005), (20, 0.05), (30, 0.1), (45, 0.1)):
        loss.step = step
        assert loss.current_weight == pytest.approx(expected)
    assert AdversarialLoss(lambda *a: 0, 2, weight=0.1, warmup_steps=10).current_weight == 0.1


def test_label_smoothing_and_r1_penalty_change_the_discriminators_step():
    from ds_seg3d.training.adversarial import discriminator_step

    class Engine:  # the DeepSpeed engine's calls, on a plain module (the step itself is DeepSpeed's)
        def __init__(self, module):
            self.module, self.losses = module, []

        def __call__(self, image, seg):
            return self.module(image, seg)

        def backward(self, loss):
            self.losses.append(float(loss.detach()))

        def step(self):
            pass

    torch.manual_seed(0)
    disc = Discriminator3D(DiscriminatorConfig(in_channels=1, num_classes=2, width=4, depth=2))
    stash = [(torch.randn(1, 1, 16, 16, 8), torch.softmax(torch.randn(1, 2, 16, 16, 8), 1),
              torch.randint(0, 2, (1, 16, 16, 8)))]
    losses = {}
    for name, kw in (("plain", {}), ("smooth", {"label_smoothing": 0.1}), ("r1", {"gradient_penalty": 10.0})):
        engine = Engine(disc)
        discriminator_step(engine, stash, 2, **kw)
        losses[name] = engine.losses[0]
    assert losses["smooth"] != losses["plain"] and losses["r1"] > losses["plain"]


def test_discriminator_learning_rate_replaces_the_jsons():
    from ds_seg3d.parallel.ds_config import load_ds_config
    from ds_seg3d.paths import shipped
    from ds_seg3d.training.adversarial import with_lr

    cfg = load_ds_config(shipped("ds_configs/discriminator_cpu_fp32.json"))
    changed = with_lr(cfg, 5e-5)
    assert changed["optimizer"]["params"]["lr"] == 5e-5 and changed["scheduler"]["params"]["warmup_max_lr"] == 5e-5
    assert cfg["optimizer"]["params"]["lr"] == 2e-4 and with_lr(cfg, 0.0) is cfg
