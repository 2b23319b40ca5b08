"""The planner's memory model: each rank's peak during a training step, before anything is launched.

A rank's peak is the larger of two moments of the step:

- **backward**: the stage's activation peak (held micro-batches, pipe buffers and the backward
  working set, from ``calibration.StageCalibrator``) + model states + the ZeRO gradient bucket;
- **gradient reduction**: what the stage keeps between steps + model states + two ZeRO buckets
  (DeepSpeed's pipeline engine appends a second reduce buffer in ``reduce_gradients``), which
  wins over the first moment when the bucket is large (DeepSpeed's default is 5e8 elements).

Model states follow DeepSpeed 0.19.8's allocations (``runtime/zero/stage_1_and_2.py``,
``stage3.py``): the flat parameter buffer; an fp32 master partition (a clone even in fp32) and
Adam's two moments, divided over the data-parallel replicas from ZeRO-1 on; gradients, whole
during backward up to ZeRO-1, partitioned from ZeRO-2 on; ZeRO-3 also partitions the parameters
and keeps one bucket allocated between steps. The stage boundaries are the ones
``build_pipeline`` will compute (``stage_profile`` + ``profile_partition``, or DeepSpeed's own
methods), and the partition's per-micro-batch activation figure (stage input + saved tensors) is
shown beside the calibrated total. ``best_split`` runs the same minimax search as the partition over
the planner's own stage peaks, to show how far a split chosen from the profile alone is from the best.
"""
from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ds_seg3d.memory.calibration import StageCalibrator
from ds_seg3d.memory.measurement import PeakTracker
from ds_seg3d.memory.replay import StageKey
from ds_seg3d.memory.spec import RunSpec
from ds_seg3d.models import CNN2DConfig, DeepCNNConfig, UNet3DConfig, count_parameters
from ds_seg3d.parallel.layer_profile import LayerProfile, stage_profile
from ds_seg3d.parallel.partition import check_boundaries, minimax_split, profile_partition
from ds_seg3d.parallel.topology import in_flight

WEIGHT_BYTES = {"fp32": 4, "bf16": 2}
MASTER_BYTES, ADAM_BYTES = 4, 8


@dataclass(frozen=True)
class StatesBytes:
    """Model-state bytes of one rank under its ZeRO stage."""

    params: int
    grads: int
    optimizer: int
    """fp32 master partition + Adam moments."""
    bucket: int
    """One ZeRO gradient bucket."""
    buckets_backward: int
    """Buckets alive during the backward pass."""
    buckets_reduce: int
    """Buckets alive during gradient reduction."""

    @property
    def persistent(self) -> int:
        return self.params + self.optimizer


def states_bytes(param_count: int, spec: RunSpec) -> StatesBytes:
    """Parameters, gradients, optimizer states and ZeRO buckets of a stage with ``param_count`` weights."""
    p, dp, z, w = param_count, spec.dp, spec.zero, WEIGHT_BYTES[spec.precision]
    part = math.ceil(p / dp)
    master = MASTER_BYTES * part if (z >= 1 or w != MASTER_BYTES) else 0
    adam = ADAM_BYTES * (part if z >= 1 else p)
    params = w * (part if z == 3 else p)
    grads = w * (part if z >= 2 else p)
    bucket = w * spec.bucket_elements if z >= 1 else 0
    if z == 3:  # one flat reduce bucket, allocated at start-up and kept
        backward, reduce = 1, 1
    elif z >= 1:  # the pipeline engine appends a second buffer in reduce_gradients()
        backward, reduce = 1, (1 if spec.plain else 2)
    else:
        backward, reduce = 0, 0
    if z == 0 and spec.dp > 1:  # ZeRO-0 all-reduces flattened copies of the gradients
        grads += w * p
    return StatesBytes(params, grads, master + adam, bucket, backward * bucket, reduce * bucket)


@dataclass(frozen=True)
class StagePrediction:
    """One stage's predicted peak and what it is made of (bytes)."""

    stage: int
    start: int
    stop: int
    in_flight: int
    activation_per_micro: int
    """The partition's cost model, in the run's precision: stage input + saved activations of one
    micro-batch."""
    held: int
    """Activations x in-flight, or with checkpointing the checkpoint boundaries x in-flight."""
    pipe_buffers: int
    """Kept between steps: DeepSpeed's receive/gradient buffers, loaded inputs and labels,
    the last stage's retained outputs."""
    working: int
    """The rest of the activation peak: backward working set, recomputation, engine copies."""
    states: StatesBytes
    profile_leftover: int
    """Tensors the partition profile leaves alive on ranks that ran it (rank 0, or all for "memory")."""
    phase: str
    """"backward" or "gradient reduction": which moment sets the peak."""
    peak: int
    param_count: int

    @property
    def activation_peak(self) -> int:
        return self.held + self.pipe_buffers + self.working


@dataclass(frozen=True)
class Prediction:
    spec: RunSpec
    boundaries: list[int]
    stages: list[StagePrediction]

    def rank_peak(self, rank: int) -> int:
        """The peak of one rank: its stage's, minus the profile's leftovers on ranks that never profiled."""
        stage = self.stages[self.spec.topology().stage_of(rank)]
        if self.spec.partition == "memory" or rank == 0 or stage.profile_leftover == 0:
            return stage.peak
        return stage.peak - stage.profile_leftover

    @property
    def max_peak(self) -> int:
        return max(self.rank_peak(r) for r in range(self.spec.ranks))


def z_step(spec: RunSpec) -> int:
    """The smallest Z increment the network accepts."""
    cfg = spec.model_config()
    if isinstance(cfg, UNet3DConfig):
        return cfg.divisor()[2]
    if isinstance(cfg, DeepCNNConfig):
        return cfg.downsample
    if isinstance(cfg, CNN2DConfig):
        return 1  # slices are independent: any Z
    raise ValueError(f"no Z step known for {type(cfg).__name__}")


class MemoryModel:
    """Predicts every stage's peak for specs that share a network, X, Y, micro-batch and precision.

    Calibration (``StageCalibrator``: kernel workspaces measured once on two slabs, then every stage
    traced at the full patch on a CPU, or replayed on slabs on a GPU) is shared by every Z, stage
    count, micro-batch count and ZeRO stage asked of it.
    """

    def __init__(self, spec: RunSpec, device: str | torch.device = "cpu", traced: bool | None = None) -> None:
        self.base = spec
        self.device = torch.device(device)
        self.defs = spec.layer_defs()
        self.param_counts = [count_parameters([d]) for d in self.defs]
        self.step = z_step(spec)
        self.calibrator = StageCalibrator(self.defs, spec.sample_shape, self.step, spec.dtype, spec.classes,
                                          self.device, traced=traced)
        self._profiles: dict[tuple[int, ...], tuple[list[LayerProfile], int]] = {}
        self._held_profiles: dict[tuple, list[LayerProfile]] = {}

    def _compatible(self, spec: RunSpec) -> None:
        b = self.base
        if (spec.model, spec.params, spec.patch[:2], spec.micro_batch, spec.precision, spec.classes) != (
                b.model, b.params, b.patch[:2], b.micro_batch, b.precision, b.classes):
            raise ValueError(f"{spec.label()} needs its own MemoryModel (network, X, Y, micro-batch or precision differ)")

    def profile(self, spec: RunSpec) -> tuple[list[LayerProfile], int]:
        """(per-layer profile at the spec's patch, bytes the profiling run leaves alive).

        It is the profile ``build_pipeline`` computes (``stage_profile``), measured with the same
        tracker as a training step so that tensors it fails to free are seen and counted.
        """
        shape = spec.sample_shape
        if shape not in self._profiles:
            gc.collect()
            tracker = PeakTracker(self.device).start()
            with tracker.window("profile"):
                profile = stage_profile(self.defs, shape)
            tracker.stop()
            gc.collect()
            self._profiles[shape] = (profile, max(0, tracker.result("profile").end - tracker.result("profile").start))
        return self._profiles[shape]

    def held_profile(self, spec: RunSpec) -> list[LayerProfile]:
        """The per-layer profile in the run's precision, for the *held* figure: ``build_pipeline``
        partitions on an fp32 profile (its proportions are what a split needs), but a bf16 stage
        holds bf16 activations."""
        if spec.dtype == torch.float32:
            return self.profile(spec)[0]
        key = (*spec.sample_shape, str(spec.dtype))
        if key not in self._held_profiles:
            self._held_profiles[key] = stage_profile(self.defs, spec.sample_shape, dtype=spec.dtype)
        return self._held_profiles[key]

    def boundaries(self, spec: RunSpec) -> list[int]:
        """The split ``build_pipeline`` will use for ``spec``."""
        if spec.plain or spec.stages == 1:
            return [0, len(self.defs)]
        if spec.partition == "memory":
            return profile_partition(self.profile(spec)[0], spec.stages, spec.micro_batches)
        from deepspeed.runtime.utils import partition_balanced, partition_uniform

        if spec.partition == "parameters":
            return [int(b) for b in partition_balanced(self.param_counts, spec.stages)]
        return [int(b) for b in partition_uniform(len(self.defs), spec.stages)]

    def predict(self, spec: RunSpec, boundaries: Sequence[int] | None = None) -> Prediction:
        """Every stage's peak for ``spec`` (``boundaries`` overrides the partition's own split)."""
        self._compatible(spec)
        parts = list(boundaries) if boundaries is not None else self.boundaries(spec)
        check_boundaries(parts, len(self.defs), len(parts) - 1)
        return Prediction(spec, parts, [self.predict_stage(spec, a, b, s)
                                        for s, (a, b) in enumerate(zip(parts, parts[1:]))])

    def predict_stage(self, spec: RunSpec, start: int, stop: int, stage: int) -> StagePrediction:
        """One stage's peak: it depends on its own layers and position only, not on the other cuts."""
        self._compatible(spec)
        leftover = self.profile(spec)[1]
        profile = self.held_profile(spec)
        if spec.plain:
            leftover = 0
        n = 1 if spec.plain else in_flight(stage, spec.stages, spec.micro_batches)
        key = StageKey(start, stop, spec.stages, stage, spec.micro_batches, spec.checkpoint, spec.plain,
                       spec.plain and spec.zero == 3)
        peak_act, rest = self.calibrator(key, spec.patch[-1])
        per_micro = profile[start].input_bytes + sum(p.saved_bytes for p in profile[start:stop])
        held = n * (self._checkpoint_boundaries(profile, start, stop, spec.checkpoint)
                    if spec.checkpoint else per_micro)
        count = sum(self.param_counts[start:stop])
        st = states_bytes(count, spec)
        backward = peak_act + st.persistent + st.grads + st.buckets_backward
        reduce = rest + st.persistent + st.grads + st.buckets_reduce
        phase, peak = ("backward", backward) if backward >= reduce else ("gradient reduction", reduce)
        return StagePrediction(
            stage=stage, start=start, stop=stop, in_flight=n, activation_per_micro=per_micro, held=held,
            pipe_buffers=rest, working=peak_act - rest - held, states=st, profile_leftover=leftover,
            phase=phase, peak=peak + leftover, param_count=count)

    @staticmethod
    def _checkpoint_boundaries(profile: Sequence[LayerProfile], start: int, stop: int, interval: int) -> int:
        """Bytes the non-reentrant checkpoint keeps per micro-batch: each chunk's input."""
        return sum(profile[a].input_bytes for a in range(start, stop, interval))

    def largest_z(self, spec: RunSpec, budget: int, z_max: int = 256, step: int | None = None) -> int | None:
        """The largest Z on a grid of ``step`` (default: the network's step) whose every rank fits ``budget``.

        Every grid point is tried, not only up to the first miss: a patch whose reduced shapes the
        network rejects makes ``build_pipeline`` profile at full size, and that profile's leftover
        tensors can push one Z over the budget while a larger one fits. The scan ends once the peak
        without those leftovers is over the budget.
        """
        step = step or self.step
        if step % self.step:
            raise ValueError(f"step {step} is not a multiple of the network's Z step {self.step}")
        best = None
        for z in range(step, z_max + 1, step):
            pred = self.predict(spec.with_(patch=(*spec.patch[:2], z)))
            if pred.max_peak <= budget:
                best = z
            elif max(st.peak - st.profile_leftover for st in pred.stages) > budget:
                break
        return best


def best_split(model: MemoryModel, spec: RunSpec, max_stage_keys: int = 80) -> tuple[list[int], int, bool]:
    """(boundaries, largest stage peak, exact) of the split that minimises the planner's largest peak.

    Exact when at most ``max_stage_keys`` distinct stages need calibrating (each is a replay of the
    stage); otherwise a lower bound no split can beat: the cheapest first stage and the cheapest
    last stage, each on its own (boundaries then name the cheapest last stage's start).
    """
    n, p = len(model.defs), spec.stages
    keys = sum(1 for s in range(p) for a in range(s, n) for b in range(a + 1, n + 1)
               if (s == 0) == (a == 0) and (s == p - 1) == (b == n) and b - a <= n - p + 1)
    peak = lambda s, a, b: model.predict_stage(spec, a, b, s).peak
    if p == 1:
        return [0, n], peak(0, 0, n), True
    if keys <= max_stage_keys:
        parts = minimax_split(n, p, peak)
        return parts, max(peak(s, a, b) for s, (a, b) in enumerate(zip(parts, parts[1:]))), True
    first = min(peak(0, 0, b) for b in range(1, n - p + 2))
    last_start = min(range(p - 1, n), key=lambda a: peak(p - 1, a, n))
    return [0, last_start, n], max(first, peak(p - 1, last_start, n)), False
