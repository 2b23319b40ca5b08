"""The run folder: per-layer pipeline checkpoints loaded into the single-device model, the ``latest``
pointer, and the metrics log with its training curve."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ds_seg3d.checkpoint import (
    CHECKPOINTS,
    LATEST,
    checkpoint_root,
    latest_tag,
    layer_file,
    load_layers,
    step_tag,
    write_latest,
)
from ds_seg3d.models import UNet3DConfig, build_layers, build_sequential
from ds_seg3d.training.run_log import METRICS, MetricsLog, plot_training_curve, read_metrics

torch.set_num_threads(1)

TINY = UNet3DConfig(levels=2, base_width=2, max_width=4)


def _model(seed: int, **changes) -> nn.Sequential:
    cfg = UNet3DConfig(**{**TINY.__dict__, **changes})
    return build_sequential(build_layers("unet3d", cfg), seed=seed)


def _save_like_deepspeed(model: nn.Sequential, run: Path, tag: str, latest: bool = True) -> Path:
    """One ``layer_NN-model_states.pt`` per layer, as PipelineModule.save_state_dict writes them."""
    tag_dir = run / CHECKPOINTS / tag
    tag_dir.mkdir(parents=True)
    for i, layer in enumerate(model):
        torch.save(layer.state_dict(), tag_dir / f"layer_{i:02d}-model_states.pt")
    if latest:
        write_latest(run, tag)
    return tag_dir


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_layer_file_name_matches_deepspeed():
    assert layer_file(Path("t"), 3).name == "layer_03-model_states.pt"
    assert layer_file(Path("t"), 12).name == "layer_12-model_states.pt"
    assert step_tag(40) == "step0000040"


def test_load_layers_restores_weights_into_fresh_model(tmp_path):
    trained = _model(seed=0)
    with torch.no_grad():  # move away from the seeded init so a re-seeded build cannot pass by luck
        for p in trained.parameters():
            p.add_(0.5)
    tag = step_tag(20)
    _save_like_deepspeed(trained, tmp_path, tag)
    fresh = _model(seed=1)
    assert not _same_weights(fresh, trained)
    assert load_layers(fresh, tmp_path) == tag
    assert _same_weights(fresh, trained)
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), trained.eval()(x))


def test_explicit_tag_needs_no_latest(tmp_path):
    old, new = _model(seed=0), _model(seed=5)
    _save_like_deepspeed(old, tmp_path, step_tag(1), latest=False)
    _save_like_deepspeed(new, tmp_path, step_tag(2))
    target = _model(seed=9)
    assert load_layers(target, tmp_path, step_tag(1)) == step_tag(1)
    assert _same_weights(target, old)
    assert load_layers(target, tmp_path) == step_tag(2)
    assert _same_weights(target, new)


@pytest.mark.parametrize("changes, bad_layer", [
    ({"base_width": 4, "max_width": 8}, 0),   # different width: the first layer already differs
    ({"num_classes": 3}, None),               # only the head differs
])
def test_different_model_raises_naming_the_file_and_leaves_model_untouched(tmp_path, changes, bad_layer):
    _save_like_deepspeed(_model(seed=0), tmp_path, "t")
    other = _model(seed=1, **changes)
    before = copy.deepcopy(other)
    bad = len(other) - 1 if bad_layer is None else bad_layer
    with pytest.raises(ValueError) as err:
        load_layers(other, tmp_path)
    msg = str(err.value)
    assert str(layer_file(checkpoint_root(tmp_path) / "t", bad)) in msg and "\n" not in msg
    assert _same_weights(other, before)


@pytest.mark.parametrize("saved_levels, model_levels, fragment", [
    (3, 2, "the model has only 4 layers"),   # checkpoint deeper than the model: extra layer files
    (2, 3, "does not match the model"),      # shallower: layer 2 is a decoder, not an encoder
])
def test_different_depth_raises(tmp_path, saved_levels, model_levels, fragment):
    _save_like_deepspeed(_model(seed=0, levels=saved_levels), tmp_path, "t")
    model = _model(seed=0, levels=model_levels)
    assert len(model) == 2 * model_levels
    with pytest.raises(ValueError, match=fragment) as err:
        load_layers(model, tmp_path)
    assert str(checkpoint_root(tmp_path) / "t" / "layer_") in str(err.value)


def test_missing_layer_file_raises_naming_it(tmp_path):
    tag_dir = _save_like_deepspeed(_model(seed=0), tmp_path, "t")
    layer_file(tag_dir, 2).unlink()
    with pytest.raises(ValueError, match="missing layer file") as err:
        load_layers(_model(seed=1), tmp_path)
    assert str(layer_file(tag_dir, 2)) in str(err.value)


def test_layers_without_weights_load_with_or_without_their_empty_file(tmp_path):
    # DeepSpeed writes an (empty) state file for a layer without weights as well.
    trained = nn.Sequential(*_model(seed=0), nn.Identity())
    tag_dir = _save_like_deepspeed(trained, tmp_path, "t")
    assert layer_file(tag_dir, len(trained) - 1).is_file()
    fresh = nn.Sequential(*_model(seed=1), nn.Identity())
    load_layers(fresh, tmp_path)
    assert _same_weights(fresh, trained)
    layer_file(tag_dir, len(trained) - 1).unlink()
    fresh = nn.Sequential(*_model(seed=2), nn.Identity())
    load_layers(fresh, tmp_path)
    assert _same_weights(fresh, trained)


@pytest.mark.parametrize("latest_text", [None, "step0000099", "", "  \n"])
def test_missing_or_dangling_latest_raises(tmp_path, latest_text):
    _save_like_deepspeed(_model(seed=0), tmp_path, step_tag(5), latest=False)
    if latest_text is not None:
        (checkpoint_root(tmp_path) / LATEST).write_text(latest_text)
    assert latest_tag(tmp_path) is None
    with pytest.raises(ValueError, match="no complete checkpoint") as err:
        load_layers(_model(seed=0), tmp_path)
    assert str(checkpoint_root(tmp_path)) in str(err.value)


def test_unknown_explicit_tag_raises(tmp_path):
    _save_like_deepspeed(_model(seed=0), tmp_path, step_tag(5))
    with pytest.raises(ValueError, match="no such checkpoint"):
        load_layers(_model(seed=0), tmp_path, "step0000006")


def test_latest_tag_reads_what_write_latest_wrote(tmp_path):
    assert latest_tag(tmp_path) is None  # no checkpoints folder at all
    (checkpoint_root(tmp_path) / "step0000010").mkdir(parents=True)
    write_latest(tmp_path, "step0000010")
    assert latest_tag(tmp_path) == "step0000010"


def test_write_latest_replaces_by_rename(tmp_path):
    root = checkpoint_root(tmp_path)
    for tag in ("step0000001", "step0000002"):
        (root / tag).mkdir(parents=True)
    write_latest(tmp_path, "step0000001")
    latest = root / LATEST
    with open(latest) as reader:  # a reader holding the old file keeps seeing a complete old tag
        old_inode = os.fstat(reader.fileno()).st_ino
        write_latest(tmp_path, "step0000002")
        assert reader.read() == "step0000001"
    assert latest.stat().st_ino != old_inode
    assert latest.read_text() == "step0000002"
    assert latest_tag(tmp_path) == "step0000002"
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step0000001", "step0000002"]


# The rest of the run folder: metrics.jsonl and the training curve drawn from it.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_metrics_log_appends_json_lines(tmp_path):
    run = tmp_path / "runs" / "a"
    log = MetricsLog(run)
    log.write("train", 1, loss=0.9, lr=1e-3)
    log.write("val", 1, dice={"kidney": 0.5})
    MetricsLog(run).write("train", 2, loss=0.7)  # a resumed run appends to the same file
    lines = (run / METRICS).read_text().splitlines()
    assert len(lines) == 3 and all(line.startswith("{") for line in lines)
    records = read_metrics(run)
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("val", 1), ("train", 2)]
    assert records[0]["loss"] == 0.9 and records[0]["lr"] == 1e-3
    assert records[1]["dice"] == {"kidney": 0.5}
    assert all(isinstance(r["time"], float) for r in records)
    assert read_metrics(tmp_path / "elsewhere") == []


@pytest.mark.parametrize("records", [[], [("val", 5, {"dice": {"kidney": 0.4}})]])
def test_no_curve_without_train_records(tmp_path, records):
    log = MetricsLog(tmp_path)
    for kind, step, values in records:
        log.write(kind, step, **values)
    assert plot_training_curve(tmp_path) is None
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("with_val", [False, True])
def test_curve_is_a_png(tmp_path, with_val):
    log = MetricsLog(tmp_path)
    for step in range(1, 6):
        log.write("train", step, loss=1.0 / step)
    log.write("train", 3, loss=0.2)  # a resumed run's line replaces the earlier one
    if with_val:
        log.write("val", 5, dice={"kidney": 0.6, "cyst": 0.3})
    out = plot_training_curve(tmp_path, "curve.png")
    assert out == tmp_path / "curve.png"
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 1000
