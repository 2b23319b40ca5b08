"""The slice-wise 2D U-Net: shapes, slice independence, pipeline cuts, capacity, config, training, prediction."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ds_seg3d.config import load_config
from ds_seg3d.inference.cases import model_from_run
from ds_seg3d.models import MODEL_CONFIGS, CNN2DConfig, build_layers, build_sequential, check_patch, count_parameters
from ds_seg3d.models.cnn2d import from_slices, to_slices
from ds_seg3d.training.losses import DiceCELoss
from tests.launch import REPO_ROOT, run_deepspeed

torch.set_num_threads(1)

TINY = CNN2DConfig(levels=3, base_width=4, max_width=8, convs_per_level=1)

# (config, input shape (B, C, X, Y, Z))
SHAPE_CASES = [
    (TINY, (2, 1, 16, 16, 5)),
    (CNN2DConfig(levels=3, base_width=4, max_width=16), (1, 1, 16, 24, 1)),
    (CNN2DConfig(in_channels=2, num_classes=4, levels=4, base_width=3, max_width=12), (1, 2, 16, 32, 7)),
    (CNN2DConfig(levels=1, base_width=4), (1, 1, 6, 10, 3)),
]


def tiny_model(seed: int = 0) -> nn.Sequential:
    return build_sequential(build_layers("cnn2d", TINY), seed=seed).eval()


@pytest.mark.parametrize(("cfg", "shape"), SHAPE_CASES, ids=["x".join(map(str, s[2:])) for _, s in SHAPE_CASES])
def test_output_has_the_input_shape_with_class_channels(cfg, shape):
    check_patch(cfg, shape[2:])
    logits = build_sequential(build_layers("cnn2d", cfg), seed=0)(torch.randn(shape))
    assert isinstance(logits, Tensor) and logits.dtype == torch.float32
    assert tuple(logits.shape) == (shape[0], cfg.num_classes, *shape[2:])
    assert torch.isfinite(logits).all()


def test_fold_and_unfold_are_inverse_and_free_for_one_volume():
    x = torch.randn(2, 3, 4, 5, 6)
    slices = to_slices(x)
    assert slices.shape == (12, 3, 4, 5)
    assert torch.equal(slices[1 * 6 + 2], x[1, :, :, :, 2])  # sample b, slice z -> row b * Z + z
    back = from_slices(slices, 6)
    assert torch.equal(back, x) and back.is_contiguous()
    one = x[:1]
    assert to_slices(one).data_ptr() == one.data_ptr()  # a view: no copy for a micro-batch of 1
    with pytest.raises(ValueError, match="B, C, X, Y, Z"):
        to_slices(torch.randn(3, 4, 5, 6))


@torch.no_grad()
def test_perturbing_one_slice_changes_that_output_slice_only():
    model = tiny_model()
    x = torch.randn(2, 1, 16, 16, 6)
    y = x.clone()
    y[1, 0, 3:9, 5:12, 3] += 3.0 * torch.randn(6, 7)
    a, b = model(x), model(y)
    changed = (a - b).abs().amax(dim=(1, 2, 3))  # (B, Z)
    assert changed[1, 3] > 1e-3
    changed[1, 3] = 0
    assert changed.max() <= 1e-6, changed  # a 3D conv or a volume-wide norm would leak into the others


@torch.no_grad()
def test_a_volume_is_predicted_exactly_as_its_slices_one_at_a_time():
    # Holds only if every norm's statistics come from the slice alone (InstanceNorm3d would mix them).
    model = tiny_model(seed=3)
    x = torch.randn(1, 1, 16, 16, 5) * torch.linspace(0.2, 4.0, 5)  # slices of very different contrast
    whole = model(x)
    for k in range(x.shape[-1]):
        alone = model(x[..., k:k + 1])
        assert torch.allclose(whole[..., k:k + 1], alone, atol=1e-5, rtol=0), k


def test_every_norm_normalises_each_slice_and_channel_on_its_own():
    model = build_sequential(build_layers("cnn2d", TINY), seed=0)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
    assert norms and all(isinstance(m, nn.InstanceNorm2d) for m in norms)
    batch, depth = 2, 4
    stats = []

    def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        flat = output.detach().flatten(2)  # (B*Z, C, X*Y): before the in-place activation overwrites it
        stats.append((output.shape[0], flat.mean(-1), flat.var(-1, unbiased=False)))

    for m in norms:
        m.register_forward_hook(record)
    # Each slice gets its own offset and scale: only per-slice statistics bring them all to (0, 1).
    x = torch.randn(batch, 1, 16, 16, depth) * torch.arange(1.0, depth + 1) + 10 * torch.arange(depth)
    with torch.no_grad():
        model(x)
    assert len(stats) == len(norms)
    for rows, mean, var in stats:
        assert rows == batch * depth
        assert mean.abs().max() < 1e-4
        assert (var - 1).abs().max() < 1e-2  # affine weight 1, bias 0 at initialisation; eps aside


@pytest.mark.parametrize("cut", range(2, 2 * TINY.levels - 1))  # after enc1 .. dec1: skips in flight
def test_pipeline_style_partial_runs_equal_the_sequential_model(cut):
    defs = build_layers("cnn2d", TINY)
    seed = 7
    full = build_sequential(defs, seed=seed)
    first, second = build_sequential(defs[:cut], seed=seed), build_sequential(defs[cut:], seed=seed + cut)
    x = torch.randn(1, 1, 16, 16, 4)
    labels = torch.randint(0, 2, (1, 16, 16, 4))
    loss_fn = DiceCELoss()

    ref = full(x)
    loss_fn(ref, labels).backward()
    sent = first(x)
    assert isinstance(sent, tuple) and len(sent) >= 2, "the cut should send skips across"
    # What DeepSpeed sends: contiguous, graph-produced float tensors, received as fresh leaves.
    assert all(t.is_contiguous() and t.is_floating_point() and t.grad_fn is not None for t in sent)
    received = tuple(t.detach().clone().requires_grad_(True) for t in sent)
    out = second(received)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    loss_fn(out, labels).backward()
    torch.autograd.backward(sent, [t.grad for t in received])
    ref_grads = dict(full.named_parameters())
    for stage, offset in ((first, 0), (second, cut)):
        for name, p in stage.named_parameters():
            index, rest = name.split(".", 1)
            want = ref_grads[f"{int(index) + offset}.{rest}"].grad
            assert torch.allclose(p.grad, want, atol=1e-6, rtol=1e-4), name


def test_kidney_2d_is_the_3d_demo_with_the_2d_plan():
    demo = load_config(REPO_ROOT / "experiments" / "kidney_demo.toml")
    slices = load_config(REPO_ROOT / "experiments" / "kidney_2d.toml")
    assert (demo.model.name, demo.model.plan, slices.model.name, slices.model.plan) == ("planned", "3d", "planned", "2d")
    assert demo.data == slices.data and demo.train == slices.train and demo.model.params == slices.model.params == {}


def test_default_config_matches_the_default_3d_unet_in_capacity():
    n2d = count_parameters(build_layers("cnn2d", CNN2DConfig()))
    n3d = count_parameters(build_layers("unet3d", MODEL_CONFIGS["unet3d"]()))
    assert 0.85 <= n2d / n3d <= 1.15, (n2d, n3d)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (CNN2DConfig(levels=0), "levels"),
        (CNN2DConfig(base_width=32, max_width=16), "max_width"),
        (CNN2DConfig(convs_per_level=0), "convs_per_level"),
        (CNN2DConfig(num_classes=1), "num_classes"),
        (CNN2DConfig(in_channels=True), "in_channels"),
    ],
)
def test_config_validation(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_layers("cnn2d", cfg)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ((32, 20, 8), r"divisible by the product of the level strides, \(8, 8\) along X and Y"),
        ((12, 32, 8), r"divisible by the product of the level strides, \(8, 8\) along X and Y"),
        ((8, 8, 16), "one pixel at the bottleneck"),
        ((32, 32), "three positive integers"),
        ((32, 32, 0), "three positive integers"),
    ],
)
def test_check_patch_rejects(patch, message):
    with pytest.raises(ValueError, match=message):
        check_patch(CNN2DConfig(levels=4), patch)


def test_check_patch_accepts_any_depth_and_guards_real_failures():
    for depth in (1, 3, 17):
        check_patch(CNN2DConfig(levels=4), (16, 8, depth))
    model = tiny_model()
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 1, 16, 10, 4))  # X, Y not divisible by 4: the skips no longer line up


def test_experiment_toml_and_overrides_select_the_2d_network(tmp_path):
    toml = tmp_path / "exp.toml"
    toml.write_text('[data]\npatch = [32, 32, 8]\n[model]\nname = "cnn2d"\n'
                    'params = { levels = 3, base_width = 4, max_width = 16 }\n')
    cfg = load_config(toml, ["model.params.convs_per_level=1", "model.params.base_width=6"])
    model_cfg = cfg.model.build_config(in_channels=2, num_classes=3)
    assert model_cfg == CNN2DConfig(in_channels=2, num_classes=3, levels=3, base_width=6, max_width=16,
                                    convs_per_level=1)
    check_patch(model_cfg, cfg.data.patch)
    with pytest.raises(ValueError, match="depth not fields of CNN2DConfig"):
        load_config(toml, ["model.params.depth=4"]).model.build_config(1, 2)
    # What predict rebuilds from a run's run.json (train writes the config's fields there).
    info = {"model": {"name": "cnn2d", "config": json.loads(json.dumps(dataclasses.asdict(model_cfg)))}}
    rebuilt, defs = model_from_run(info)
    assert rebuilt == model_cfg and [d.name for d in defs] == [d.name for d in build_layers("cnn2d", model_cfg)]


def test_a_few_steps_learn_a_toy_slab():
    torch.manual_seed(0)
    model = build_sequential(build_layers("cnn2d", TINY), seed=1)
    labels = torch.zeros(2, 16, 16, 6, dtype=torch.long)
    labels[:, 4:12, 6:14, :] = 1
    images = labels[:, None].float() + 0.3 * torch.randn(2, 1, 16, 16, 6)
    loss_fn = DiceCELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = loss_fn(model(images), labels)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


EXPERIMENT = """
[data]
patch = [32, 32, 8]
oversample_foreground = 0.5
[model]
name = "cnn2d"
params = { levels = 3, base_width = 4, max_width = 16, convs_per_level = 1 }
[train]
stages = 2
val_every = 0
val_max_cases = 1
checkpoint_every = 0
log_every = 1
"""


@pytest.mark.multirank
def test_two_stage_training_then_single_device_prediction(kidney_shards: Path, tmp_path: Path):
    """In bf16 (the GPU config; DeepSpeed runs it on CPU too): the first stage casts the fp32 images it loads."""
    cfg = json.loads((REPO_ROOT / "ds_configs" / "pipeline_zero1_gpu_bf16.json").read_text())
    cfg.pop("csv_monitor", None)
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    run = tmp_path / "run"
    run_deepspeed("ds_seg3d.train", ["--data", str(kidney_shards), "--out", str(run), "--config",
                                     str(tmp_path / "exp.toml"), "--deepspeed_config", str(tmp_path / "ds.json"),
                                     "--steps", "3"], num_ranks=2, timeout=600, module=True)
    assert json.loads((run / "run.json").read_text())["model"]["name"] == "cnn2d"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"train"' in line]
    assert losses and all(np.isfinite(losses))

    manifest = json.loads((kidney_shards / "manifest.json").read_text())
    case = Path(manifest["cases"][manifest["splits"]["test"][0]]["image"])
    done = subprocess.run([sys.executable, "-m", "ds_seg3d", "predict", "--checkpoint", str(run),
                           "--out", str(tmp_path / "pred"), "--overlap", "0", str(case)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out, ref = nib.load(tmp_path / "pred" / case.name), nib.load(case)
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    assert (tmp_path / "pred" / "volumes.csv").read_text().splitlines()[0] == "case,kidney_ml"
