"""The model layer lists: shapes, seeding, what travels between layers, gradients, validation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds_seg3d.models import (
    MODEL_CONFIGS,
    DeepCNNConfig,
    LayerDef,
    UNet3DConfig,
    build_layers,
    build_sequential,
    check_patch,
    count_parameters,
    receptive_field,
)
from ds_seg3d.models.unet3d import DecoderLayer, EncoderLayer, HeadLayer

torch.set_num_threads(1)

TINY_CNN = DeepCNNConfig(num_classes=3, depth=6, width=4, dilations=(1, 2))
TINY_UNET = UNet3DConfig(levels=3, base_width=4, max_width=8)
# nnU-Net's plan for 1.2 x 1.2 x 3.0 mm voxels: X and Y are pooled first, Z joins once it is within 2x.
ANISO = UNet3DConfig(levels=4, base_width=4, max_width=16, strides=((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)),
                     kernels=((3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3)))

# (model, config, input shape, expected output shape)
SHAPE_CASES = [
    ("deep_cnn", TINY_CNN, (2, 1, 16, 16, 16), (2, 3, 16, 16, 16)),
    ("deep_cnn", DeepCNNConfig(in_channels=2, depth=4, width=4, downsample=1), (1, 2, 8, 12, 10), (1, 2, 8, 12, 10)),
    ("deep_cnn", DeepCNNConfig(depth=5, width=4, downsample=4), (1, 1, 16, 32, 8), (1, 2, 16, 32, 8)),
    ("deep_cnn", DeepCNNConfig(depth=4, width=3, downsample=3), (1, 1, 9, 6, 12), (1, 2, 9, 6, 12)),
    ("unet3d", TINY_UNET, (2, 1, 16, 16, 16), (2, 2, 16, 16, 16)),
    (
        "unet3d",
        UNet3DConfig(in_channels=2, num_classes=4, levels=4, base_width=4, max_width=16),
        (1, 2, 16, 24, 32),
        (1, 4, 16, 24, 32),
    ),
    ("unet3d", UNet3DConfig(levels=2, base_width=4, convs_per_level=1), (1, 1, 8, 8, 8), (1, 2, 8, 8, 8)),
    ("unet3d", UNet3DConfig(levels=1, base_width=4), (1, 1, 8, 6, 4), (1, 2, 8, 6, 4)),
    ("unet3d", ANISO, (1, 1, 16, 24, 8), (1, 2, 16, 24, 8)),
]
SHAPE_IDS = [f"{name}-{'x'.join(map(str, shape[2:]))}-{i}" for i, (name, _, shape, _) in enumerate(SHAPE_CASES)]
SMALL_MODELS = [("deep_cnn", TINY_CNN, (1, 1, 16, 16, 16)), ("unet3d", TINY_UNET, (1, 1, 16, 16, 16))]


def run_layers(model: nn.Sequential, x: Tensor) -> list:
    """Every value that leaves a layer, in order (what pipeline stages would send each other)."""
    values = []
    for layer in model:
        x = layer(x)
        values.append(x)
    return values


def conv_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]


@pytest.mark.parametrize(("name", "cfg", "in_shape", "out_shape"), SHAPE_CASES, ids=SHAPE_IDS)
def test_output_shape(name, cfg, in_shape, out_shape):
    check_patch(cfg, in_shape[2:])
    model = build_sequential(build_layers(name, cfg), seed=0)
    logits = model(torch.randn(in_shape))
    assert isinstance(logits, Tensor)
    assert tuple(logits.shape) == out_shape
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("name", "cfg", "in_shape"), SMALL_MODELS, ids=[m[0] for m in SMALL_MODELS])
def test_sequential_equals_layers_built_and_called_one_by_one(name, cfg, in_shape):
    defs = build_layers(name, cfg)
    seed = 11
    layers = []
    for i, layer_def in enumerate(defs):
        torch.manual_seed(seed + i)
        layers.append(layer_def.build())
    x = torch.randn(in_shape)
    y = x
    for layer in layers:
        y = layer(y)
    assert torch.equal(build_sequential(defs, seed=seed)(x), y)


@pytest.mark.parametrize(("name", "cfg", "in_shape"), SMALL_MODELS, ids=[m[0] for m in SMALL_MODELS])
def test_seed_fixes_weights_per_layer(name, cfg, in_shape):
    defs = build_layers(name, cfg)
    a = build_sequential(defs, seed=5).state_dict()
    b = build_sequential(defs, seed=5).state_dict()
    c = build_sequential(defs, seed=6).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if k.endswith("weight") and a[k].dim() == 5]
    assert weights and all(not torch.equal(a[k], c[k]) for k in weights)
    # A pipeline stage builds only its slice; its layers must still match the full build.
    start = len(defs) // 2
    tail = build_sequential(defs[start:], seed=5 + start)  # base seed + global index, as a stage does
    for i, module in enumerate(tail):
        for key, value in module.state_dict().items():
            assert torch.equal(value, a[f"{start + i}.{key}"])


def test_seeding_matches_deepspeed_per_layer_seeding():
    # PipelineModule(seed_layers=True, base_seed=s) calls this before building global layer i.
    from deepspeed.runtime.utils import set_random_seed

    defs = build_layers("unet3d", TINY_UNET)
    ours = build_sequential(defs, seed=1234).state_dict()
    for i, layer_def in enumerate(defs):
        set_random_seed(1234 + i)
        for key, value in layer_def.build().state_dict().items():
            assert torch.equal(value, ours[f"{i}.{key}"])


@pytest.mark.parametrize(("name", "cfg", "in_shape"), SMALL_MODELS, ids=[m[0] for m in SMALL_MODELS])
def test_only_graph_produced_float_tensors_travel(name, cfg, in_shape):
    model = build_sequential(build_layers(name, cfg), seed=0)
    values = run_layers(model, torch.randn(in_shape))
    for value in values[:-1]:
        tensors = value if isinstance(value, tuple) else (value,)
        assert isinstance(value, (Tensor, tuple)) and tensors
        for t in tensors:
            assert isinstance(t, Tensor)
            assert t.is_floating_point()
            assert t.grad_fn is not None  # produced by the graph, never the raw input
    assert isinstance(values[-1], Tensor)


@pytest.mark.parametrize("levels", [1, 3, 4])
def test_unet_tuple_grows_through_encoder_and_shrinks_through_decoder(levels):
    cfg = UNet3DConfig(levels=levels, base_width=2, max_width=8, convs_per_level=1)
    defs = build_layers("unet3d", cfg)
    values = run_layers(build_sequential(defs, seed=0), torch.randn(1, 1, 16, 16, 16))
    lengths = [len(v) if isinstance(v, tuple) else None for v in values]
    expected = list(range(1, levels + 1)) + list(range(levels - 1, 0, -1)) + [None]
    assert lengths == expected
    names = [d.name for d in defs]
    assert names == [f"enc{i}" for i in range(levels)] + [f"dec{i}" for i in reversed(range(levels - 1))] + ["head"]
    # Each skip is passed on untouched (same tensor object) by the layers between its ends.
    s0 = values[0][0]
    for value in values[1 : 2 * levels - 2]:
        assert value[0] is s0


def test_layers_accept_a_bare_tensor_for_a_one_tuple():
    # DeepSpeed's activation checkpointing unpacks 1-tuples before the first layer of an interval.
    torch.manual_seed(0)
    enc1, head = EncoderLayer(2, 4, 1, 2, True), HeadLayer(2, 3)
    x = torch.randn(1, 2, 8, 8, 8)
    a, b = enc1(x), enc1((x,))
    assert len(a) == len(b) == 2 and all(torch.equal(p, q) for p, q in zip(a, b))
    assert torch.equal(head(x), head((x,)))
    with pytest.raises(ValueError, match="every skip consumed"):
        head((x, x))
    with pytest.raises(ValueError, match="needs a skip"):
        DecoderLayer(2, 2, 1)(x)


@pytest.mark.parametrize(("name", "cfg", "in_shape"), SMALL_MODELS, ids=[m[0] for m in SMALL_MODELS])
def test_every_parameter_gets_a_gradient(name, cfg, in_shape):
    model = build_sequential(build_layers(name, cfg), seed=0)
    logits = model(torch.randn(in_shape))
    labels = torch.randint(0, logits.shape[1], (in_shape[0], *in_shape[2:]))
    F.cross_entropy(logits, labels).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert param.grad.abs().sum() > 0, pname


def test_unet_gradient_reaches_first_layer_through_the_skip_alone():
    cfg = UNet3DConfig(levels=3, base_width=4, max_width=8, convs_per_level=1)
    model = build_sequential(build_layers("unet3d", cfg), seed=0)
    # Zero every upsampling weight: the coarse path then contributes only a constant bias, so enc0
    # can influence the logits only through its skip, carried untouched past enc1, enc2 and dec1.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DecoderLayer):
                module.up.weight.zero_()
    logits = model(torch.randn(1, 1, 16, 16, 16))
    labels = torch.randint(0, 2, (1, 16, 16, 16))
    F.cross_entropy(logits, labels).backward()

    def grad_norm(layer: nn.Module) -> float:
        return sum(float(p.grad.abs().sum()) for p in layer.parameters() if p.grad is not None)

    assert grad_norm(model[0]) > 0  # enc0: reached through the skip only
    assert grad_norm(model[1]) == 0 and grad_norm(model[2]) == 0  # enc1, bottleneck: path cut


def test_deep_cnn_default_is_25_conv_layers_with_an_organ_sized_field():
    cfg = DeepCNNConfig()
    defs = build_layers("deep_cnn", cfg)
    assert len(defs) == cfg.depth == 25  # one pipeline layer per block
    assert len(conv_modules(build_sequential(defs))) == 25
    assert receptive_field(cfg) >= 100


@pytest.mark.parametrize(
    "cfg",
    [
        DeepCNNConfig(depth=6, width=2, dilations=(1, 2), downsample=2),
        DeepCNNConfig(depth=5, width=2, dilations=(1, 3), downsample=1),
        DeepCNNConfig(depth=6, width=2, dilations=(1,), downsample=4),
    ],
    ids=["ds2", "ds1", "ds4"],
)
def test_receptive_field_matches_the_network(cfg):
    # Without the norms (whose statistics span the patch) the gradient of one output voxel is
    # non-zero exactly on its receptive field; positive weights rule out accidental cancellation.
    model = build_sequential(build_layers("deep_cnn", cfg), seed=0)
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.InstanceNorm3d):
                setattr(parent, child_name, nn.Identity())
    with torch.no_grad():
        for param in model.parameters():
            param.abs_()
    size, centre = 48, 24
    x = torch.randn(1, 1, size, size, size, requires_grad=True)
    model(x)[0, 0, centre, centre, centre].backward()
    support = x.grad[0, 0].abs() > 0
    field = receptive_field(cfg)
    assert field < size
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = support.any(dim=other).nonzero().flatten()
        assert int(idx.max() - idx.min()) + 1 == field


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (DeepCNNConfig(depth=2), "depth must be >= 3"),
        (DeepCNNConfig(width=0), "width"),
        (DeepCNNConfig(dilations=()), "dilations"),
        (DeepCNNConfig(dilations=(1, 0)), "dilations"),
        (DeepCNNConfig(num_classes=1), "num_classes"),
        (DeepCNNConfig(downsample=0), "downsample"),
        (UNet3DConfig(levels=0), "levels"),
        (UNet3DConfig(base_width=32, max_width=16), "max_width"),
        (UNet3DConfig(convs_per_level=0), "convs_per_level"),
        (UNet3DConfig(num_classes=1), "num_classes"),
        (UNet3DConfig(in_channels=True), "in_channels"),
    ],
)
def test_config_validation(cfg, message):
    with pytest.raises(ValueError, match=message):
        cfg.validate()
    name = next(n for n, t in MODEL_CONFIGS.items() if isinstance(cfg, t))
    with pytest.raises(ValueError, match=message):
        build_layers(name, cfg)


@pytest.mark.parametrize(
    ("cfg", "patch", "message"),
    [
        (UNet3DConfig(levels=4), (32, 32, 20), r"divisible by the product of the level strides, \(8, 8, 8\)"),
        (ANISO, (32, 32, 10), r"divisible by the product of the level strides, \(8, 8, 4\)"),
        (UNet3DConfig(levels=4), (8, 8, 8), "one voxel at the bottleneck"),
        (UNet3DConfig(), (32, 32), "three positive integers"),
        (DeepCNNConfig(), (15, 16, 16), "divisible by downsample=2"),
        (DeepCNNConfig(downsample=4), (4, 4, 4), "only one voxel"),
        (DeepCNNConfig(), (16, 0, 16), "three positive integers"),
    ],
)
def test_check_patch_rejects(cfg, patch, message):
    with pytest.raises(ValueError, match=message):
        check_patch(cfg, patch)


def test_check_patch_guards_real_failures():
    # What check_patch rejects really breaks the networks: a shape error or a wrong-sized output.
    unet = build_sequential(build_layers("unet3d", TINY_UNET), seed=0)
    with pytest.raises(RuntimeError):
        unet(torch.randn(1, 1, 16, 16, 10))
    cnn = build_sequential(build_layers("deep_cnn", TINY_CNN), seed=0)
    assert tuple(cnn(torch.randn(1, 1, 15, 16, 16)).shape[2:]) != (15, 16, 16)


def test_registry_rejects_unknown_names_and_mismatched_configs():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_layers("resnet", UNet3DConfig())
    with pytest.raises(ValueError, match="needs a UNet3DConfig"):
        build_layers("unet3d", DeepCNNConfig())
    with pytest.raises(ValueError, match="no model takes"):
        check_patch(object(), (16, 16, 16))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_every_default_config_builds_and_counts(name):
    defs = build_layers(name, MODEL_CONFIGS[name]())
    assert all(isinstance(d, LayerDef) for d in defs)
    assert len({d.name for d in defs}) == len(defs)
    model = build_sequential(defs)
    real = sum(p.numel() for p in model.parameters())
    assert count_parameters(defs) == real == count_parameters(list(model))
    assert real > 0


def test_unet_widths_double_then_cap():
    cfg = UNet3DConfig(levels=5, base_width=8, max_width=32)
    defs = build_layers("unet3d", cfg)
    model = build_sequential(defs)
    encoder_out = [conv_modules(model[i])[-1].out_channels for i in range(cfg.levels)]
    assert encoder_out == [min(8 * 2**i, 32) for i in range(5)] == cfg.widths()
    strides = [conv_modules(model[i])[0].stride for i in range(cfg.levels)]
    assert strides == [(1, 1, 1)] + [(2, 2, 2)] * 4


def test_layer_def_requires_a_module_class_and_names_itself():
    assert LayerDef(nn.Identity).name == "Identity"
    assert isinstance(LayerDef(nn.Conv3d, (1, 2, 3), {"bias": False}).build(), nn.Conv3d)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        LayerDef(len)  # type: ignore[arg-type]


def test_per_level_strides_and_kernels_shape_every_level():
    model = build_sequential(build_layers("unet3d", ANISO), seed=0)
    convs = [m for m in model[0].modules() if isinstance(m, nn.Conv3d)]
    assert all(c.kernel_size == (3, 3, 1) and c.padding == (1, 1, 0) for c in convs)  # no mixing across slices
    values = run_layers(model, torch.randn(1, 1, 16, 24, 8))
    sizes = [tuple(v[-1].shape[2:]) for v in values[:4]]
    assert sizes == [(16, 24, 8), (8, 12, 8), (4, 6, 4), (2, 3, 2)]
    ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose3d)]
    assert [u.stride for u in ups] == [(2, 2, 2), (2, 2, 2), (2, 2, 1)]
    assert ANISO.divisor() == (8, 8, 4)


@pytest.mark.parametrize(("changes", "message"), [
    ({"strides": ((1, 1, 1), (2, 2, 2))}, "2 entries for 4 levels"),
    ({"strides": ((2, 2, 2),) * 4}, "must start with"),
    ({"kernels": ((3, 3, 2),) * 4}, "odd sizes"),
    ({"strides": ((1, 1, 1), (2, 0, 2), (2, 2, 2), (2, 2, 2))}, "triples of positive integers"),
    ({"deep_supervision": "yes"}, "true or false"),
])
def test_topology_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        build_layers("unet3d", UNet3DConfig(levels=4, **changes))


def test_nested_lists_from_toml_or_json_become_tuples():
    cfg = UNet3DConfig(levels=2, strides=[[1, 1, 1], [2, 2, 1]], kernels=[[3, 3, 1], [3, 3, 3]])
    assert cfg.strides == ((1, 1, 1), (2, 2, 1)) and cfg.kernels == ((3, 3, 1), (3, 3, 3))
    assert cfg == UNet3DConfig(levels=2, strides=((1, 1, 1), (2, 2, 1)), kernels=((3, 3, 1), (3, 3, 3)))


@pytest.mark.parametrize("name", ["unet3d", "cnn2d"])
def test_deep_supervision_adds_coarser_logits_while_training_only(name):
    cfg = MODEL_CONFIGS[name](levels=5, base_width=2, max_width=8, convs_per_level=1, num_classes=3,
                              deep_supervision=True)
    assert cfg.supervised_levels() == [1, 2]  # the coarsest decoder level gets none (nnU-Net's weight 0)
    model = build_sequential(build_layers(name, cfg), seed=0)
    x = torch.randn(1, 1, 32, 32, 16)
    out = model.train()(x)
    z = (16, 8, 4) if name == "unet3d" else (16, 16, 16)
    assert isinstance(out, tuple) and [tuple(o.shape) for o in out] == [
        (1, 3, 32, 32, z[0]), (1, 3, 16, 16, z[1]), (1, 3, 8, 8, z[2])]
    plain = build_sequential(build_layers(name, MODEL_CONFIGS[name](**{**cfg.__dict__, "deep_supervision": False})),
                             seed=0)
    with torch.no_grad():
        evaluated = model.eval()(x)
        assert isinstance(evaluated, Tensor) and torch.allclose(evaluated, out[0].detach(), atol=1e-5)
        # the same weights without the auxiliary heads give the same full-resolution logits
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".aux." not in k})
        assert torch.allclose(plain.eval()(x), evaluated, atol=1e-6)
