"""The 3D PatchGAN discriminator: output shapes, gradients to the segmentation, config and input checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_seg3d.models import Discriminator3D, DiscriminatorConfig
from ds_seg3d.models.discriminator import MAX_WIDTH_FACTOR, one_hot_labels

# (config, batch, input grid, expected logits shape). Each strided block maps n -> n // 2.
SHAPE_CASES = [
    (DiscriminatorConfig(in_channels=1, num_classes=2, width=4, depth=1), 2, (8, 8, 6), (2, 1, 4, 4, 3)),
    (DiscriminatorConfig(in_channels=1, num_classes=3, width=4, depth=2), 1, (16, 16, 16), (1, 1, 4, 4, 4)),
    (DiscriminatorConfig(in_channels=2, num_classes=4, width=2, depth=3), 1, (32, 16, 24), (1, 1, 4, 2, 3)),
    (DiscriminatorConfig(in_channels=1, num_classes=2, width=4, depth=2), 1, (17, 18, 19), (1, 1, 4, 4, 4)),
    (DiscriminatorConfig(in_channels=1, num_classes=3, width=4, depth=2, patch_wise=False), 3, (16, 8, 8), (3, 1)),
    (DiscriminatorConfig(in_channels=2, num_classes=2, width=2, depth=4, patch_wise=False), 2, (16, 16, 32), (2, 1)),
]


def _inputs(cfg: DiscriminatorConfig, batch: int, grid: tuple[int, int, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn((batch, cfg.in_channels, *grid), generator=gen)
    seg = torch.softmax(torch.randn((batch, cfg.num_classes, *grid), generator=gen), dim=1)
    return image, seg


@pytest.mark.parametrize("cfg, batch, grid, expected", SHAPE_CASES)
def test_output_shape(cfg, batch, grid, expected):
    disc = Discriminator3D(cfg)
    logits = disc(*_inputs(cfg, batch, grid))
    assert tuple(logits.shape) == expected
    assert torch.isfinite(logits).all()
    if cfg.patch_wise:
        assert cfg.output_spatial(grid) == expected[2:]


def test_blocks_follow_patchgan():
    cfg = DiscriminatorConfig(in_channels=1, num_classes=3, width=4, depth=5)
    disc = Discriminator3D(cfg)
    blocks = list(disc.blocks)
    assert len(blocks) == cfg.depth
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in blocks[0]), "first block must not be normalised"
    assert blocks[0][0].in_channels == cfg.in_channels + cfg.num_classes
    for block in blocks[1:]:
        assert any(isinstance(m, nn.InstanceNorm3d) for m in block)
        assert block[0].bias is None  # the norm would cancel a bias
    assert all(isinstance(block[-1], nn.LeakyReLU) for block in blocks)
    widths = [block[0].out_channels for block in blocks]
    assert widths == [4, 8, 16, 32, 32]
    assert max(widths) == cfg.width * MAX_WIDTH_FACTOR
    assert all(block[0].stride == (2, 2, 2) for block in blocks)


@pytest.mark.parametrize("patch_wise", [True, False])
def test_gradient_reaches_the_segmentation(patch_wise):
    """The generator's adversarial loss must move the segmenter's logits through the softmax."""
    cfg = DiscriminatorConfig(in_channels=1, num_classes=3, width=4, depth=2, patch_wise=patch_wise)
    disc = Discriminator3D(cfg)
    image, _ = _inputs(cfg, 2, (16, 16, 16))
    seg_logits = torch.randn((2, 3, 16, 16, 16), requires_grad=True)
    fake = disc(image, torch.softmax(seg_logits, dim=1))
    F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake)).backward()
    assert seg_logits.grad is not None
    assert seg_logits.grad.abs().sum() > 0
    assert torch.isfinite(seg_logits.grad).all()
    # Every voxel of the segmentation influences the logits (no dead border).
    assert (seg_logits.grad.abs().sum(dim=1) > 0).float().mean() > 0.99
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_logits_depend_on_both_inputs():
    cfg = DiscriminatorConfig(in_channels=1, num_classes=2, width=4, depth=2)
    disc = Discriminator3D(cfg).eval()
    image, seg = _inputs(cfg, 1, (16, 16, 16))
    base = disc(image, seg)
    assert not torch.allclose(base, disc(image, 1.0 - seg))
    assert not torch.allclose(base, disc(-image, seg))


def test_bf16_module_takes_fp32_inputs_and_returns_fp32_gradients():
    """Under a bf16 engine the inputs are cast inside forward; the segmenter's graph stays fp32."""
    cfg = DiscriminatorConfig(in_channels=1, num_classes=2, width=4, depth=2)
    disc = Discriminator3D(cfg).to(torch.bfloat16)
    image, _ = _inputs(cfg, 1, (8, 8, 8))
    seg_logits = torch.randn((1, 2, 8, 8, 8), requires_grad=True)
    logits = disc(image, torch.softmax(seg_logits, dim=1))
    assert logits.dtype == torch.bfloat16
    logits.float().mean().backward()
    assert seg_logits.grad.dtype == torch.float32
    assert seg_logits.grad.abs().sum() > 0


def test_one_hot_labels():
    labels = torch.tensor([[[[0, 2], [1, 1]]]])  # (1, 1, 2, 2)
    onehot = one_hot_labels(labels, 3)
    assert onehot.shape == (1, 3, 1, 2, 2)
    assert onehot.dtype == torch.float32
    assert torch.equal(onehot.argmax(dim=1), labels)
    assert torch.equal(onehot.sum(dim=1), torch.ones_like(labels, dtype=torch.float32))
    with pytest.raises(ValueError, match="integer"):
        one_hot_labels(labels.float(), 3)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"in_channels": 0}, "in_channels"),
        ({"in_channels": 1.5}, "in_channels"),
        ({"width": -4}, "width"),
        ({"depth": 0}, "depth"),
        ({"depth": True}, "depth"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": "3"}, "num_classes"),
        ({"patch_wise": 1}, "patch_wise"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    cfg = DiscriminatorConfig(**changes)
    with pytest.raises(ValueError, match=f"DiscriminatorConfig.{field}"):
        cfg.validate()
    with pytest.raises(ValueError, match=f"DiscriminatorConfig.{field}"):
        Discriminator3D(cfg)


def test_default_config_is_valid():
    cfg = DiscriminatorConfig()
    assert cfg.validate() is cfg
    assert (cfg.in_channels, cfg.width, cfg.depth, cfg.patch_wise) == (1, 16, 4, True)


@pytest.mark.parametrize(
    "image_shape, seg_shape, message",
    [
        ((1, 2, 16, 16, 16), (1, 3, 16, 16, 16), "image has 2 channels"),
        ((1, 1, 16, 16, 16), (1, 16, 16, 16), r"\(B, C, X, Y, Z\)"),
        ((1, 1, 16, 16, 16), (1, 2, 16, 16, 16), "seg has 2 channels"),
        ((1, 1, 16, 16, 16), (1, 3, 16, 16, 8), "differ in batch or grid"),
        ((2, 1, 16, 16, 16), (1, 3, 16, 16, 16), "differ in batch or grid"),
        ((1, 1, 4, 16, 16), (1, 3, 4, 16, 16), "too small for depth=3"),
    ],
)
def test_bad_inputs_are_refused(image_shape, seg_shape, message):
    disc = Discriminator3D(DiscriminatorConfig(in_channels=1, num_classes=3, width=2, depth=3))
    with pytest.raises(ValueError, match=message):
        disc(torch.zeros(image_shape), torch.zeros(seg_shape))


def test_smallest_accepted_input_runs():
    """``output_spatial`` accepts exactly the grids the network can run on (InstanceNorm needs > 1 voxel)."""
    cfg = DiscriminatorConfig(in_channels=1, num_classes=2, width=2, depth=2)
    disc = Discriminator3D(cfg)
    assert cfg.output_spatial((4, 4, 8)) == (1, 1, 2)
    assert disc(torch.zeros(1, 1, 4, 4, 8), torch.zeros(1, 2, 4, 4, 8)).shape == (1, 1, 1, 1, 2)
    with pytest.raises(ValueError, match="too small"):
        cfg.output_spatial((4, 4, 4))  # the second block would normalise a single voxel
    with pytest.raises(ValueError, match="three positive integers"):
        cfg.output_spatial((4, 4))
