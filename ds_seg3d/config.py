"""The experiment config: data, model and training settings, typed, documented and validated on load.

It is separate from the DeepSpeed JSON (optimizer, precision, ZeRO, micro-batch and accumulation),
which stays a plain DeepSpeed file under ``ds_configs/``. An experiment file is TOML with the sections
below; every field may be overridden on the command line with ``--set section.field=value``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, get_type_hints

from ds_seg3d.data.augment import AUGMENTATIONS
from ds_seg3d.models import MODEL_CONFIGS
from ds_seg3d.paths import resolve
from ds_seg3d.planning.plans import CONFIGURATIONS, NetworkPlan


@dataclasses.dataclass
class DataConfig:
    shards: str = ""
    """Folder of HDF5 shards with manifest.json (``data_tools build-shards`` output)."""
    patch: tuple[int, int, int] | None = None
    """Training patch size in voxels (X, Y, Z); also the sliding-window size at validation. Empty: the
    plan's (a planned model); a network named in ``model.name`` needs one."""
    oversample_foreground: float = 0.33
    """Share of patches centred on a foreground voxel (nnU-Net uses 0.33)."""
    augment: str = "nnunet"
    """Training patch augmentation: "nnunet" (nnU-Net's transforms: rotation, scaling, noise, blur,
    brightness, contrast, low resolution, gamma, mirroring), "light" (flips, in-plane quarter turns,
    intensity scale/shift and noise; ``true`` in earlier configs) or "none" (``false``)."""
    spatial_prob: float = 0.2
    """With ``augment = "nnunet"``: probability of the rotation and, separately, of the scaling of a patch
    (nnU-Net's 0.2)."""
    train_split: str = "train"
    """Manifest split to train on."""
    val_split: str = "val"
    """Manifest split for periodic validation (whole volumes); empty or missing split: no validation."""

    def validate(self) -> None:
        if self.patch is not None and (len(self.patch) != 3 or min(self.patch) < 1):
            raise ValueError(f"data.patch must be three positive sizes, got {self.patch}")
        flag = str(self.augment).lower()  # earlier configs said true / false
        self.augment = "light" if flag in ("true", "yes", "on", "1") else "none" if flag in (
            "false", "no", "off", "0") else str(self.augment)
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"data.augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if not 0.0 <= self.oversample_foreground <= 1.0:
            raise ValueError(f"data.oversample_foreground must be in [0, 1], got {self.oversample_foreground}")
        if not 0.0 <= self.spatial_prob <= 1.0:
            raise ValueError(f"data.spatial_prob must be in [0, 1], got {self.spatial_prob}")


PLANNED = "planned"


@dataclasses.dataclass
class ModelConfig:
    name: str = PLANNED
    """Network: "planned" (the shards' plans.json, see ``plan``), or one of ``ds_seg3d.models.MODEL_CONFIGS``
    ("unet3d", "deep_cnn", "cnn2d") configured by ``params`` alone."""
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Fields of the network's config dataclass (e.g. base_width, levels); for a planned model they
    override the plan's, otherwise the rest keep their defaults."""
    plan: str = "3d"
    """Which planned network a "planned" model trains: "3d" (the 3D U-Net) or "2d" (the slice-wise U-Net)."""

    def build_config(self, in_channels: int, num_classes: int) -> Any:
        if self.name == PLANNED:
            raise ValueError("model.name is 'planned': apply the shards' plan first (ds_seg3d.config.apply_plan)")
        if self.name not in MODEL_CONFIGS:
            raise ValueError(f"model.name {self.name!r} is not one of {', '.join(MODEL_CONFIGS)}")
        cls = MODEL_CONFIGS[self.name]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(self.params) - known)
        if unknown:
            raise ValueError(f"model.params: {', '.join(unknown)} not fields of {cls.__name__} ({', '.join(sorted(known))})")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in self.params.items()}
        cfg = cls(**{**kw, "in_channels": in_channels, "num_classes": num_classes})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.name != PLANNED and self.name not in MODEL_CONFIGS:
            raise ValueError(f"model.name {self.name!r} is neither {PLANNED!r} nor one of {', '.join(MODEL_CONFIGS)}")
        if self.plan not in CONFIGURATIONS:
            raise ValueError(f"model.plan must be one of {', '.join(CONFIGURATIONS)}, got {self.plan!r}")


PARTITIONS = ("auto", "memory", "time", "balanced", "parameters", "uniform")


def resolve_partition(partition: str, budget_gb: float, plan_budget_gb: float | None) -> tuple[str, float, str]:
    """(method, budget GiB per rank or 0, why) for ``train.partition``: "auto" and "balanced" take the config's
    budget, else the one a planned model was sized for."""
    budget, source = ((budget_gb, "train.memory_budget_gb") if budget_gb > 0 else
                      (plan_budget_gb or 0.0, "the plan's budget") if plan_budget_gb else (0.0, ""))
    if partition == "auto":
        if budget > 0:
            return "auto", budget, (f"auto: the fastest split within {budget:g} GiB per rank ({source}; the least-"
                                    "memory split if none fits)")
        return "auto", 0.0, ("auto: no memory budget known (train.memory_budget_gb, or a planned model): the fastest "
                             "split needing at most 1.25x the least memory any split needs")
    if partition == "balanced":
        if budget <= 0:
            raise ValueError("train.partition = \"balanced\" needs a memory budget: set train.memory_budget_gb "
                             "(GiB per rank) or train a planned model")
        return "balanced", budget, f"the fastest split within {budget:g} GiB per rank ({source})"
    return partition, 0.0, partition


@dataclasses.dataclass
class TrainConfig:
    steps: int = 300
    """Optimizer steps (``train_batch`` calls); each consumes micro-batch x accumulation x dp patches."""
    stages: int = 2
    """Pipeline stages; must divide the number of ranks. The rest is data parallel."""
    partition: str = "auto"
    """How layers are split over stages: "memory" (activation bytes x in-flight micro-batches), "time"
    (each layer's forward + backward timed, the slowest stage minimised), "balanced" (the fastest split
    whose stages fit the memory budget), DeepSpeed's own "parameters" / "uniform", or "auto": the fastest
    split within the budget when one is known (``memory_budget_gb``, else the budget a planned model was
    sized for; the least-memory split if none fits), otherwise the fastest needing at most 1.25x the
    least memory any split needs."""
    memory_budget_gb: float = 0.0
    """Memory per rank, GiB, that every stage of a "balanced" split must fit (activations, pipe buffers,
    weights, gradients and optimizer states in the partition's cost model); 0: the plan's budget."""
    activation_checkpoint_interval: int = 0
    """Recompute activations in the backward pass every N layers (0: off)."""
    seed: int = 1234
    """Seeds the layer initialisation (the same for any stage count) and the patch sampler."""
    dice_weight: float = 1.0
    """Weight of the soft Dice term (foreground classes) in the loss."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy term in the loss."""
    val_every: int = 100
    """Validate every N steps (and at the end); 0: only at the end."""
    val_overlap: float = 0.25
    """Sliding-window overlap at validation."""
    val_max_cases: int = 4
    """At most this many validation cases per validation round (0: all)."""
    checkpoint_every: int = 100
    """Save a checkpoint every N steps (and at the end); 0: only at the end."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    max_skipped_steps: int = 32
    """Stop the run when fp16's loss scaler skips this many optimizer steps in a row (0: never); a fresh
    run skips one step per halving of the initial scale (16 for DeepSpeed's default 2^16)."""

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        if self.stages < 1:
            raise ValueError(f"train.stages must be >= 1, got {self.stages}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"train.partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if self.memory_budget_gb < 0:
            raise ValueError(f"train.memory_budget_gb must be >= 0, got {self.memory_budget_gb}")
        if self.activation_checkpoint_interval < 0:
            raise ValueError("train.activation_checkpoint_interval must be >= 0")
        if not 0.0 <= self.val_overlap < 1.0:
            raise ValueError(f"train.val_overlap must be in [0, 1), got {self.val_overlap}")
        # Checked here because the loop would otherwise fail only after the engines are built.
        if self.max_skipped_steps < 0:
            raise ValueError(f"train.max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        if self.log_every < 1:
            raise ValueError(f"train.log_every must be >= 1, got {self.log_every}")
        for name in ("val_every", "checkpoint_every", "val_max_cases"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if min(self.dice_weight, self.ce_weight) < 0 or self.dice_weight == self.ce_weight == 0:
            raise ValueError(f"train.dice_weight and train.ce_weight must be >= 0 and not both 0, "
                             f"got {self.dice_weight} and {self.ce_weight}")


@dataclasses.dataclass
class AdversarialConfig:
    enabled: bool = False
    """Train a discriminator (its own DeepSpeed engine on the last-stage ranks) against the segmenter."""
    weight: float = 0.05
    """lambda: weight of the non-saturating adversarial term in the segmenter's loss."""
    warmup_steps: int = 50
    """Segmentation-only steps before the adversarial term is switched on (the discriminator trains
    from the start)."""
    width: int = 16
    """Channels of the discriminator's first block (doubling per block)."""
    depth: int = 4
    """Strided conv blocks of the discriminator."""
    patch_wise: bool = True
    """Patch-wise real/fake logits (PatchGAN) instead of one global logit per patch."""
    ramp_steps: int = 0
    """After the warm-up, the term's weight rises linearly from 0 to ``weight`` over this many steps
    (0: at once)."""
    label_smoothing: float = 0.0
    """One-sided label smoothing: the discriminator's target for real pairs is 1 - this (0: none)."""
    gradient_penalty: float = 0.0
    """gamma of an R1 penalty, gamma / 2 x the squared gradient of the discriminator's output on real
    pairs with respect to the segmentation it judges (0: none)."""
    discriminator_lr: float = 0.0
    """The discriminator's learning rate, replacing its DeepSpeed JSON's (0: the JSON's)."""

    def validate(self) -> None:
        if self.weight < 0:
            raise ValueError(f"adversarial.weight must be >= 0, got {self.weight}")
        if self.ramp_steps < 0 or self.gradient_penalty < 0 or self.discriminator_lr < 0:
            raise ValueError("adversarial.ramp_steps, gradient_penalty and discriminator_lr must be >= 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"adversarial.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.warmup_steps < 0:
            raise ValueError(f"adversarial.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.width < 1 or self.depth < 1:
            raise ValueError("adversarial.width and adversarial.depth must be >= 1")


@dataclasses.dataclass
class ExperimentConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Where the patches come from."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Which network, and its size."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Schedule, pipeline layout, loss, validation and checkpoints."""
    adversarial: AdversarialConfig = dataclasses.field(default_factory=AdversarialConfig)
    """Adversarial training (off by default)."""

    def validate(self) -> "ExperimentConfig":
        self.data.validate()
        self.model.validate()
        self.train.validate()
        self.adversarial.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a TOML or command-line value to the field's declared type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "planned")):
            return None  # an optional field left to its default source (e.g. the plan's patch)
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, inner, where)
    origin = getattr(hint, "__origin__", None)
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float, str):
        # TOML 2.5 or true for an int field is a mistake, not something to truncate silently.
        if hint is not str and (isinstance(value, bool) or (hint is int and isinstance(value, float))):
            raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}") from None
    if origin is tuple:
        if not isinstance(value, (str, list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        items = value.split(",") if isinstance(value, str) else list(value)
        args = hint.__args__
        if len(items) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(items, args))
    if origin is dict:
        try:
            value = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError:
            raise ValueError(f"{where}: expected a table or JSON object, got {value!r}") from None
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    return value


def _section_from(cls: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"[{section}]: expected a table, got {values!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"[{section}]: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()})


def from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    sections = {f.name: f.type for f in dataclasses.fields(ExperimentConfig)}
    hints = get_type_hints(ExperimentConfig)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(sections)}")
    return ExperimentConfig(**{k: _section_from(hints[k], v, k) for k, v in raw.items()}).validate()


def apply_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply ``section.field=value`` strings (``model.params.base_width=8`` sets a model parameter)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2:
            raise ValueError(f"override {item!r}: expected section.field=value")
        section = getattr(cfg, parts[0], None)
        if section is None or not dataclasses.is_dataclass(section):
            raise ValueError(f"override {item!r}: unknown section {parts[0]!r}")
        if parts[0] == "model" and parts[1] == "params" and len(parts) == 3:
            try:
                section.params[parts[2]] = json.loads(value)
            except json.JSONDecodeError:
                section.params[parts[2]] = value
            continue
        hints = get_type_hints(type(section))
        if len(parts) != 2 or parts[1] not in hints:
            raise ValueError(f"override {item!r}: {parts[0]} has no field {'.'.join(parts[1:])!r}")
        setattr(section, parts[1], _coerce(value, hints[parts[1]], key))
    return cfg.validate()


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Load a TOML experiment file (or the defaults when ``path`` is None) and apply overrides.

    A relative ``experiments/<name>.toml`` that does not exist here is the shipped file of that name."""
    if path is None:
        cfg = ExperimentConfig()
    else:
        path = resolve(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: experiment config not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        try:
            cfg = from_dict(raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return apply_overrides(cfg, list(overrides))


def apply_plan(cfg: ExperimentConfig, plan: NetworkPlan) -> ExperimentConfig:
    """``cfg`` with its planned model made concrete: the plan's network and params, then ``model.params`` on
    top (e.g. a narrower ``base_width``), and the plan's patch unless ``data.patch`` is given.

    Fewer ``levels`` than planned keep the plan's first strides and kernels; more are refused.
    """
    if cfg.model.name != PLANNED:
        return cfg
    params = {**plan.params, **cfg.model.params}
    levels = int(params["levels"])
    for key in ("strides", "kernels"):
        if key in cfg.model.params or key not in params:
            continue
        if levels > len(params[key]):
            raise ValueError(f"model.params.levels={levels}: the plan has {len(params[key])} levels; give "
                             f"model.params.{key} for more")
        params[key] = params[key][:levels]
    out = copy.deepcopy(cfg)
    out.model = ModelConfig(name=plan.model, plan=cfg.model.plan, params=params)
    out.data.patch = cfg.data.patch if cfg.data.patch is not None else tuple(plan.patch)
    return out.validate()
