"""One training configuration whose memory is planned or measured, in a form both sides share.

The planner predicts a ``RunSpec``, the sweep launches the same ``RunSpec`` on real ranks, and the
two are compared row by row, so everything that changes memory lives here: network and size,
patch, stages, data-parallel replicas, micro-batches, checkpointing, partition, ZeRO stage,
precision and DeepSpeed's ZeRO bucket size. ``ds_config()`` turns it into the DeepSpeed JSON the
run uses, starting from the shipped files so the measured runs train the way users train.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from typing import Any

import torch

from ds_seg3d.config import ModelConfig
from ds_seg3d.models import build_layers, check_patch
from ds_seg3d.models.layers import LayerDef
from ds_seg3d.parallel.ds_config import fill_batch_fields, load_ds_config
from ds_seg3d.parallel.topology import Topology
from ds_seg3d.paths import DEFAULT_DS_CONFIG, PLAIN_ZERO3_CONFIG, shipped

PIPELINE_CONFIG = shipped(DEFAULT_DS_CONFIG)
PLAIN_CONFIG = shipped(PLAIN_ZERO3_CONFIG)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
PARTITIONS = ("memory", "parameters", "uniform")
DEEPSPEED_BUCKET = 500_000_000
"""DeepSpeed's default ``reduce_bucket_size`` / ``allgather_bucket_size`` (elements)."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A training configuration: enough to build its engine and to predict its memory."""

    model: str = "unet3d"
    """Network name (``ds_seg3d.models.MODEL_CONFIGS``)."""
    params: tuple[tuple[str, Any], ...] = ()
    """Fields of the network's config dataclass, as sorted (name, value) pairs (hashable)."""
    patch: tuple[int, int, int] = (128, 128, 16)
    """Training patch (X, Y, Z) in voxels."""
    stages: int = 1
    """Pipeline stages; 1 with ``plain`` is the unpipelined engine."""
    ranks: int = 1
    """Processes in the job; ``ranks / stages`` data-parallel replicas."""
    micro_batches: int = 1
    """Micro-batches per optimizer step (DeepSpeed's gradient_accumulation_steps)."""
    micro_batch: int = 1
    """Samples per micro-batch."""
    checkpoint: int = 0
    """Activation checkpointing interval in layers (0: off)."""
    partition: str = "memory"
    """Stage boundaries: "memory" (this project's) or DeepSpeed's "parameters" / "uniform"."""
    zero: int = 1
    """ZeRO stage: 0/1 with a pipeline, 2/3 only with ``plain``."""
    precision: str = "fp32"
    """"fp32" or "bf16" (bf16 weights and activations, fp32 master weights)."""
    bucket: int | None = 1 << 20
    """ZeRO reduce/all-gather bucket in elements (None: DeepSpeed's default, 5e8)."""
    plain: bool = False
    """The unpipelined DeepSpeedEngine (the ZeRO-2/3 comparison) instead of the PipelineEngine."""
    classes: int = 3
    """Output classes (background included)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch", tuple(int(n) for n in self.patch))
        object.__setattr__(self, "params", tuple(sorted((str(k), _hashable(v)) for k, v in dict(self.params).items())))
        self.validate()

    def validate(self) -> RunSpec:
        """Raise one-line ``ValueError`` naming the field to change."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if not 0 <= self.zero <= 3:
            raise ValueError(f"zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.zero > 1 and not self.plain:
            raise ValueError(f"ZeRO-{self.zero} needs the plain engine: DeepSpeed's pipeline engine takes ZeRO-0/1 only")
        if self.plain and self.stages != 1:
            raise ValueError(f"the plain engine runs one stage, got stages={self.stages}")
        if self.checkpoint < 0:
            raise ValueError(f"checkpoint must be >= 0, got {self.checkpoint}")
        if self.plain and self.checkpoint:
            raise ValueError("activation checkpointing is a pipeline option here; the plain engine runs without it")
        if self.bucket is not None and self.bucket < 1:
            raise ValueError(f"bucket must be >= 1 element, got {self.bucket}")
        self.topology()
        layers = self.layer_defs()
        if len(layers) < self.stages:
            raise ValueError(f"{self.model} has {len(layers)} layers, fewer than stages={self.stages}")
        check_patch(self.model_config(), self.patch)
        return self

    # ------------------------------------------------------------------ derived

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def dp(self) -> int:
        return self.ranks // self.stages

    @property
    def bucket_elements(self) -> int:
        """The reduce bucket the run's DeepSpeed config asks for (what the planner's bucket term uses)."""
        return config_bucket(self.ds_config())

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One micro-batch of images: (B, C, X, Y, Z)."""
        return (self.micro_batch, 1, *self.patch)

    def topology(self) -> Topology:
        return Topology(self.ranks, self.stages, self.micro_batch, self.micro_batches)

    def model_config(self) -> Any:
        return ModelConfig(name=self.model, params=dict(self.params)).build_config(in_channels=1, num_classes=self.classes)

    def layer_defs(self) -> list[LayerDef]:
        return build_layers(self.model, self.model_config())

    def with_(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)

    def label(self) -> str:
        """Short, unique, human-readable name (the CSV's ``config`` column)."""
        size = ",".join(f"{k}={v}" for k, v in self.params)
        engine = f"plain zero{self.zero}" if self.plain else f"p{self.stages} m{self.micro_batches} {self.partition}"
        if not self.plain:
            engine += f" zero{self.zero}"
        parts = [self.model + (f"({size})" if size else ""), "x".join(map(str, self.patch)), engine,
                 f"dp{self.dp}", self.precision]
        if self.checkpoint:
            parts.append(f"ckpt{self.checkpoint}")
        if self.micro_batch != 1:
            parts.append(f"mb{self.micro_batch}")
        if self.bucket != RunSpec.bucket:
            parts.append("bucket=" + ("default" if self.bucket is None else str(self.bucket)))
        return " ".join(parts)

    def ds_config(self) -> dict[str, Any]:
        """The DeepSpeed config this run trains with: a shipped file, with this spec's choices applied."""
        cfg = copy.deepcopy(load_ds_config(PLAIN_CONFIG if self.plain else PIPELINE_CONFIG))
        zero = cfg.setdefault("zero_optimization", {})
        zero["stage"] = self.zero
        if self.bucket is not None:
            zero["reduce_bucket_size"] = self.bucket
            zero["allgather_bucket_size"] = self.bucket
            if self.zero == 3:
                zero["stage3_prefetch_bucket_size"] = self.bucket
        else:
            for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
                zero.pop(key, None)
        cfg.pop("fp16", None)
        cfg["bf16"] = {"enabled": self.precision == "bf16"}
        cfg["csv_monitor"] = {"enabled": False}
        cfg.pop("tensorboard", None)
        return fill_batch_fields(cfg, self.topology())

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["params"] = dict(self.params)
        d["patch"] = list(self.patch)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RunSpec field(s): {', '.join(unknown)}")
        d = dict(d)
        if "params" in d:
            d["params"] = tuple(dict(d["params"]).items())
        if "patch" in d:
            d["patch"] = tuple(d["patch"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls.from_dict(json.loads(text))


def config_bucket(ds_config: dict[str, Any]) -> int:
    """ZeRO's gradient reduce bucket (elements) under a DeepSpeed config: its
    ``zero_optimization.reduce_bucket_size``, or DeepSpeed's default when it has none."""
    return int((ds_config.get("zero_optimization") or {}).get("reduce_bucket_size", DEEPSPEED_BUCKET))


def shipped_bucket() -> int:
    """The bucket of the shipped pipeline config, what ``ds_seg3d.train`` runs with by default."""
    return config_bucket(load_ds_config(PIPELINE_CONFIG))


def _hashable(value: Any) -> Any:
    """Lists (nested too: per-level strides and kernels) as tuples, so a spec can key a cache."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def voxels(patch: tuple[int, ...]) -> int:
    return math.prod(patch)
