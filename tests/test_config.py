"""The experiment config: TOML loading, --set overrides, validation, model configs, shipped files."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ds_seg3d.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, load_config, resolve_partition
from ds_seg3d.models import DeepCNNConfig, UNet3DConfig, build_layers

REPO = Path(__file__).resolve().parents[1]

FULL_TOML = """
[data]
shards = "/data/shards"
patch = [32, 48, 16]
oversample_foreground = 0.5
augment = false
train_split = "tr"
val_split = "va"

[model]
name = "deep_cnn"
params = { depth = 6, width = 4, dilations = [1, 2] }

[train]
steps = 12
stages = 3
partition = "uniform"
activation_checkpoint_interval = 2
seed = 7
dice_weight = 0.5
ce_weight = 2.0
val_every = 4
val_overlap = 0.5
val_max_cases = 1
checkpoint_every = 6
log_every = 2
"""


def _write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_validate_and_match_no_file():
    cfg = ExperimentConfig()
    assert cfg.validate() is cfg
    assert load_config(None) == cfg
    assert load_config(None).to_dict() == dataclasses.asdict(ExperimentConfig())


def test_every_section_loads_with_declared_types(tmp_path):
    cfg = load_config(_write(tmp_path, FULL_TOML))
    assert cfg.data == DataConfig(shards="/data/shards", patch=(32, 48, 16), oversample_foreground=0.5,
                                  augment="none", train_split="tr", val_split="va")
    assert isinstance(cfg.data.patch, tuple)
    assert cfg.model.name == "deep_cnn"
    assert cfg.model.params == {"depth": 6, "width": 4, "dilations": [1, 2]}
    assert cfg.train == TrainConfig(steps=12, stages=3, partition="uniform", activation_checkpoint_interval=2,
                                    seed=7, dice_weight=0.5, ce_weight=2.0, val_every=4, val_overlap=0.5,
                                    val_max_cases=1, checkpoint_every=6, log_every=2)
    # A section left out keeps its defaults.
    partial = load_config(_write(tmp_path, "[train]\nsteps = 5\n", "partial.toml"))
    assert partial.data == DataConfig() and partial.model == ModelConfig() and partial.train.steps == 5


@pytest.mark.parametrize("text, name", [
    ("[bogus]\nx = 1\n", "bogus"),
    ("[data]\npatchh = [1, 2, 3]\n", "patchh"),
    ("[train]\nstepz = 3\n", "stepz"),
    ("[model]\nsize = 3\n", "size"),
])
def test_unknown_section_or_field_names_file_and_field(tmp_path, text, name):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and name in msg and "\n" not in msg


@pytest.mark.parametrize("text", ["[train\nsteps = 1\n", "data = 3\n"])
def test_bad_toml_names_file(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=str(path)):
        load_config(path)


def test_missing_file_names_file(tmp_path):
    with pytest.raises(ValueError, match="not found") as err:
        load_config(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in str(err.value)


# (override, how to read it back, expected value, expected type)
OVERRIDES = [
    ("train.steps=7", lambda c: c.train.steps, 7, int),
    ("train.seed= 99", lambda c: c.train.seed, 99, int),
    ("data.oversample_foreground=0.75", lambda c: c.data.oversample_foreground, 0.75, float),
    ("data.spatial_prob=1", lambda c: c.data.spatial_prob, 1.0, float),
    ("train.dice_weight=2", lambda c: c.train.dice_weight, 2.0, float),
    ("data.augment=false", lambda c: c.data.augment, "none", str),  # earlier configs' flag
    ("data.augment=off", lambda c: c.data.augment, "none", str),
    ("data.augment=True", lambda c: c.data.augment, "light", str),
    ("data.augment=nnunet", lambda c: c.data.augment, "nnunet", str),
    ("data.patch=64,64,32", lambda c: c.data.patch, (64, 64, 32), tuple),
    ("data.patch=16, 8, 4", lambda c: c.data.patch, (16, 8, 4), tuple),
    ("data.shards=/tmp/x=y", lambda c: c.data.shards, "/tmp/x=y", str),
    ("train.partition=parameters", lambda c: c.train.partition, "parameters", str),
    ("model.name=deep_cnn", lambda c: c.model.name, "deep_cnn", str),
    ("model.params.base_width=8", lambda c: c.model.params["base_width"], 8, int),
    ("model.params.dilations=[1, 3]", lambda c: c.model.params["dilations"], [1, 3], list),
    ("model.params.note=plain text", lambda c: c.model.params["note"], "plain text", str),
    ('model.params={"levels": 3}', lambda c: c.model.params, {"levels": 3}, dict),
]


@pytest.mark.parametrize("override, get, expected, typ", OVERRIDES)
def test_set_override_of_each_type(override, get, expected, typ):
    cfg = load_config(None, [override])
    value = get(cfg)
    assert value == expected and type(value) is typ
    assert ExperimentConfig().model.params == {}  # overrides never leak into the defaults


def test_overrides_apply_on_top_of_file_in_order(tmp_path):
    cfg = load_config(_write(tmp_path, FULL_TOML), ["train.steps=3", "train.steps=4", "model.params.width=8"])
    assert cfg.train.steps == 4
    assert cfg.model.params == {"depth": 6, "width": 8, "dilations": [1, 2]}


@pytest.mark.parametrize("overrides, fragment", [
    (["train.steps=-1"], "train.steps"),
    (["train.steps=0"], "train.steps"),
    (["train.steps=2.5"], "train.steps"),
    (["train.steps=abc"], "train.steps"),
    (["train.stages=0"], "train.stages"),
    (["train.partition=greedy"], "train.partition"),
    (["train.memory_budget_gb=-1"], "train.memory_budget_gb"),
    (["train.val_overlap=1.0"], "val_overlap"),
    (["train.val_overlap=-0.1"], "val_overlap"),
    (["train.activation_checkpoint_interval=-1"], "activation_checkpoint_interval"),
    (["train.log_every=0"], "log_every"),
    (["train.val_every=-5"], "val_every"),
    (["train.dice_weight=0", "train.ce_weight=0"], "weight"),
    (["train.ce_weight=-1"], "weight"),
    (["data.patch=64,64"], "data.patch"),
    (["data.patch=0,64,32"], "data.patch"),
    (["data.oversample_foreground=1.5"], "oversample_foreground"),
    (["data.spatial_prob=-0.1"], "spatial_prob"),
    (["data.augment=maybe"], "data.augment"),
    (["model.name=resnet"], "resnet"),
    (["model.params=[1, 2]"], "model.params"),
    (["train.steps"], "section.field=value"),
    (["steps=3"], "section.field=value"),
    (["bogus.steps=3"], "bogus"),
    (["train.nope=3"], "nope"),
    (["train.steps.x=3"], "steps.x"),
])
def test_invalid_values_raise_value_error(overrides, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.parametrize("line, field", [
    ("[train]\nsteps = 2.5\n", "train.steps"),
    ("[train]\nsteps = true\n", "train.steps"),
    ("[data]\naugment = 3\n", "data.augment"),
    ("[data]\npatch = 64\n", "data.patch"),
    ("[model]\nparams = 3\n", "model.params"),
])
def test_toml_values_of_the_wrong_type_are_rejected(tmp_path, line, field):
    path = _write(tmp_path, line)
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_build_config_rejects_unknown_params():
    with pytest.raises(ValueError, match="widht") as err:
        ModelConfig("unet3d", {"widht": 8}).build_config(1, 2)
    assert "UNet3DConfig" in str(err.value)
    with pytest.raises(ValueError, match="resnet"):
        ModelConfig("resnet").build_config(1, 2)


@pytest.mark.parametrize("name, params, cls, checks", [
    ("unet3d", {"levels": 3, "base_width": 4, "max_width": 8}, UNet3DConfig, {"levels": 3, "base_width": 4}),
    ("unet3d", {}, UNet3DConfig, {"levels": UNet3DConfig().levels}),
    ("deep_cnn", {"depth": 6, "width": 4, "dilations": [1, 2]}, DeepCNNConfig, {"dilations": (1, 2)}),
])
def test_build_config_builds_validated_config_of_right_class(name, params, cls, checks):
    cfg = ModelConfig(name, params).build_config(in_channels=2, num_classes=3)
    assert type(cfg) is cls
    assert cfg.in_channels == 2 and cfg.num_classes == 3
    for field, value in checks.items():
        assert getattr(cfg, field) == value
    assert len(build_layers(name, cfg)) > 0


def test_build_config_runs_the_model_validation():
    with pytest.raises(ValueError, match="base_width"):
        ModelConfig("unet3d", {"base_width": 0}).build_config(1, 2)
    with pytest.raises(ValueError, match="num_classes"):
        ModelConfig("unet3d").build_config(1, 1)


def test_shipped_experiments_all_load():
    files = sorted((REPO / "experiments").glob("*.toml"))
    assert files, "no experiment files shipped"
    from ds_seg3d.config import apply_plan
    from ds_seg3d.models import check_patch
    from ds_seg3d.planning.plans import plan_network

    plans = {c: plan_network(c, (1.2, 1.2, 3.0), (96.0, 80.0, 40.0), lambda *a: (True, 0.0), base_width=8)
             for c in ("3d", "2d")}
    for path in files:
        cfg = load_config(path)
        if cfg.model.name == "planned":  # every shipped experiment trains the shards' plan
            cfg = apply_plan(cfg, plans[cfg.model.plan])
        model_cfg = cfg.model.build_config(in_channels=1, num_classes=2)
        assert len(build_layers(cfg.model.name, model_cfg)) > 0, path
        check_patch(model_cfg, cfg.data.patch)


@pytest.mark.parametrize("partition, budget, plan, expected", [
    ("auto", 0.0, 0.15, ("auto", 0.15)),   # a planned model: its budget
    ("auto", 2.0, 0.15, ("auto", 2.0)),    # the config's budget first
    ("auto", 0.0, None, ("auto", 0.0)),    # nothing known: relative to the least memory
    ("balanced", 0.0, 0.5, ("balanced", 0.5)),
    ("time", 3.0, 0.5, ("time", 0.0)),
    ("memory", 0.0, 0.5, ("memory", 0.0)),
])
def test_partition_resolution(partition, budget, plan, expected):
    method, gb, why = resolve_partition(partition, budget, plan)
    assert (method, gb) == expected and why


def test_balanced_without_any_budget_says_what_to_set():
    with pytest.raises(ValueError, match="train.memory_budget_gb"):
        resolve_partition("balanced", 0.0, None)
