"""The pipe x data grid of one run, validated before any process group exists.

DeepSpeed discovers a bad layout only deep inside ``deepspeed.initialize`` (an assert about
``train_batch_size`` or a stage count that does not divide the world). ``Topology`` checks the same
invariants up front with messages that say what to change, and answers the rank questions
(which stage, which data-parallel replica, how many micro-batches in flight) without a process
group, so the planner and the tests can reason about layouts that are never launched.

Rank order matches ``deepspeed.runtime.pipe.topology.PipeDataParallelTopology``: axes
``['pipe', 'data']`` in row-major order, so rank = stage * dp + dp_rank and the replicas of one
stage are adjacent ranks (gradient all-reduce stays on fast intra-node links).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # deepspeed is imported lazily: planning must not pay its import time
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def in_flight(stage: int, stages: int, micro_batches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at its peak under DeepSpeed's 1F1B schedule.

    Stage s runs ``stages - s`` forwards before its first backward (warm-up), capped by the number
    of micro-batches: this multiplies the stage's activation memory, so stage 0 is the fullest.
    """
    return min(stages - stage, micro_batches)


@dataclass(frozen=True)
class Topology:
    """A pipeline-parallel x data-parallel layout of ``world_size`` ranks.

    Attributes:
        world_size: number of ranks (processes) in the job.
        stages: pipeline stages; must divide ``world_size``.
        micro_batch: samples per micro-batch per data-parallel replica
            (DeepSpeed's ``train_micro_batch_size_per_gpu``).
        grad_accum: micro-batches per optimizer step (DeepSpeed's ``gradient_accumulation_steps``);
            in pipeline mode these are the micro-batches that fill the pipe.
    """

    world_size: int
    stages: int
    micro_batch: int = 1
    grad_accum: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "Topology":
        """Raise a one-line ``ValueError`` naming the field to change; return ``self`` when valid."""
        for name in ("world_size", "stages", "micro_batch", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}; launch at least one rank")
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if self.world_size % self.stages != 0:
            choices = ", ".join(str(d) for d in _divisors(self.world_size))
            raise ValueError(
                f"stages={self.stages} does not divide world_size={self.world_size}; "
                f"choose stages from {{{choices}}} or launch a multiple of {self.stages} ranks"
            )
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        return self

    @property
    def dp(self) -> int:
        """Data-parallel replicas of the whole pipeline."""
        return self.world_size // self.stages

    @property
    def train_batch(self) -> int:
        """Samples per optimizer step over all replicas (DeepSpeed's ``train_batch_size``)."""
        return self.micro_batch * self.grad_accum * self.dp

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.world_size - 1}")

    def _check_stage(self, stage: int) -> None:
        if not 0 <= stage < self.stages:
            raise ValueError(f"stage {stage} is outside 0..{self.stages - 1}")

    def stage_of(self, rank: int) -> int:
        """Pipeline stage that ``rank`` runs."""
        self._check_rank(rank)
        return rank // self.dp

    def dp_rank_of(self, rank: int) -> int:
        """Data-parallel replica of ``rank``: it decides which samples the rank's pipeline draws."""
        self._check_rank(rank)
        return rank % self.dp

    def rank_of(self, stage: int, dp_rank: int) -> int:
        """Global rank of one (stage, replica) cell."""
        self._check_stage(stage)
        if not 0 <= dp_rank < self.dp:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{self.dp - 1}")
        return stage * self.dp + dp_rank

    def ranks_of_stage(self, stage: int) -> list[int]:
        """Ranks holding the same layers; ZeRO-1 shards their optimizer states among them."""
        self._check_stage(stage)
        return list(range(stage * self.dp, (stage + 1) * self.dp))

    def is_first_stage(self, rank: int) -> bool:
        """First-stage ranks read the images from the data iterator."""
        return self.stage_of(rank) == 0

    def is_last_stage(self, rank: int) -> bool:
        """Last-stage ranks read the labels and compute the loss."""
        return self.stage_of(rank) == self.stages - 1

    def in_flight(self, stage: int) -> int:
        """Micro-batches whose activations ``stage`` holds at its peak (see the module-level ``in_flight``)."""
        self._check_stage(stage)
        return in_flight(stage, self.stages, self.grad_accum)

    def to_deepspeed(self) -> "PipeDataParallelTopology":
        """The same layout as DeepSpeed's topology object, for ``PipelineModule(topology=...)``."""
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        return PipeDataParallelTopology(num_pp=self.stages, num_dp=self.dp)

    def describe(self) -> str:
        """A text table of every rank's role, for logs and ``plan`` output."""
        lines = [
            f"world_size={self.world_size}  stages={self.stages}  dp={self.dp}  "
            f"micro_batch={self.micro_batch}  grad_accum={self.grad_accum}  train_batch={self.train_batch}",
            f"{'rank':>4}  {'stage':>5}  {'dp_rank':>7}  {'in_flight':>9}  role",
        ]
        for rank in range(self.world_size):
            stage = self.stage_of(rank)
            roles = []
            if self.is_first_stage(rank):
                roles.append("images")
            if self.is_last_stage(rank):
                roles.append("labels+loss")
            role = ", ".join(roles) if roles else "-"
            lines.append(
                f"{rank:>4}  {stage:>5}  {self.dp_rank_of(rank):>7}  {self.in_flight(stage):>9}  {role}"
            )
        return "\n".join(lines)
