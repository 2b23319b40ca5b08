"""The planner's memory model: ZeRO state arithmetic, stage replay (real, traced, on slabs), composition."""
from __future__ import annotations

import pytest
import torch
from deepspeed.runtime.utils import partition_balanced

from ds_seg3d.memory.calibration import StageCalibrator
from ds_seg3d.memory.prediction import MemoryModel, states_bytes, z_step
from ds_seg3d.memory.replay import StageKey, replay_peak
from ds_seg3d.memory.spec import DEEPSPEED_BUCKET, RunSpec
from ds_seg3d.models import count_parameters
from ds_seg3d.parallel.partition import predicted_stage_bytes, profile_partition
from ds_seg3d.parallel.pipeline import stage_profile

TINY = RunSpec(model="unet3d", params={"levels": 2, "base_width": 4, "max_width": 8}, patch=(32, 32, 8))
F32 = torch.float32


# ---------------------------------------------------------------- model states


@pytest.mark.parametrize("zero,dp,plain,params,grads,optimizer,backward,reduce", [
    (0, 1, False, 4, 4, 8, 0, 0),        # fp32 weights, gradients and Adam moments, no buckets
    (1, 1, False, 4, 4, 12, 1, 2),       # + fp32 master clone; the pipeline adds a second reduce buffer
    (1, 2, False, 4, 4, 6, 1, 2),        # master and moments split over 2 replicas
    (2, 2, True, 4, 2, 6, 1, 1),         # gradients partitioned too
    (3, 2, True, 2, 2, 6, 1, 1),         # parameters partitioned too
])
def test_zero_states_per_parameter(zero, dp, plain, params, grads, optimizer, backward, reduce):
    spec = RunSpec(model="unet3d", params={"levels": 2, "base_width": 4}, patch=(32, 32, 8), ranks=dp,
                   stages=1, plain=plain, zero=zero)
    n = 1000
    st = states_bytes(n, spec)
    assert (st.params, st.grads, st.optimizer) == (params * n, grads * n, optimizer * n)
    assert st.buckets_backward == backward * 4 * spec.bucket_elements
    assert st.buckets_reduce == reduce * 4 * spec.bucket_elements


def test_bf16_halves_weights_but_keeps_fp32_master_and_moments():
    spec = TINY.with_(precision="bf16")
    st, st32 = states_bytes(1000, spec), states_bytes(1000, TINY)
    assert st.params == st32.params // 2 and st.grads == st32.grads // 2 and st.optimizer == st32.optimizer
    assert st.bucket == st32.bucket // 2


# ---------------------------------------------------------------- replay and slabs


@pytest.mark.parametrize("dtype,tolerance", [(F32, 0.01), (torch.bfloat16, 0.04)])
def test_traced_stages_match_real_replays_at_the_full_patch(dtype, tolerance):
    """The CPU planner traces each stage on the meta device at the full patch and adds kernel workspaces
    measured on two slabs; it must give what replaying the stage with real kernels measures. (On this
    tiny network two things the trace does not see show: the two RNG states DeepSpeed's checkpoint keeps
    per chunk, 10 KB, made outside any op, and bf16 kernels' curvature at small Z.)"""
    defs = TINY.layer_defs()
    shape = (1, 1, 32, 32, 16)
    cal = StageCalibrator(defs, shape, z_step(TINY), dtype, 3)
    assert cal.traced and max(cal.slabs) < 16
    for key in (StageKey(0, 2, 2, 0, 2, 0), StageKey(2, 4, 2, 1, 2, 0), StageKey(1, 3, 4, 1, 3, 0),
                StageKey(0, 3, 2, 0, 3, 1), StageKey(0, 4, 1, 0, 1, 0, plain=True, zero3=True)):
        peak, rest = cal(key, 16)
        real = replay_peak(defs, key, shape, dtype, 3)
        assert peak == pytest.approx(real[0], rel=tolerance) and rest == pytest.approx(real[1], rel=tolerance), key


def test_slab_replays_extrapolate_to_the_full_patch():
    """The GPU planner's method: real replays on two slabs, a line in Z (fp32 on a CPU is linear too)."""
    defs = TINY.layer_defs()
    shape = (1, 1, 32, 32, 16)
    cal = StageCalibrator(defs, shape, z_step(TINY), F32, 3, slab_steps=(1, 2), traced=False)
    assert cal.slabs == (2, 4)
    for stage, (a, b) in enumerate([(0, 2), (2, 4)]):
        key = StageKey(a, b, 2, stage, 2, 0)
        full = replay_peak(defs, key, shape, F32, 3)
        peak, rest = cal(key, 16)
        assert peak == pytest.approx(full[0], rel=0.005) and rest == pytest.approx(full[1], rel=0.005)


def test_bf16_calibrates_on_thicker_slabs_than_fp32():
    """CPU bf16 kernels curve at small Z: their line is drawn through two and three Z steps, not one and two."""
    defs, step = TINY.layer_defs(), z_step(TINY)
    shape = (1, 1, 32, 32, 16)
    assert StageCalibrator(defs, shape, step, F32, 3).slabs == (step, 2 * step)
    assert StageCalibrator(defs, shape, step, torch.bfloat16, 3).slabs == (2 * step, 3 * step)
    assert MemoryModel(TINY.with_(precision="bf16")).calibrator.slabs == (2 * step, 3 * step)


def test_bf16_held_activations_are_counted_in_bf16_but_split_like_fp32():
    spec = TINY.with_(stages=2, ranks=2, micro_batches=2)
    fp32 = MemoryModel(spec).predict(spec)
    bf16 = MemoryModel(spec.with_(precision="bf16")).predict(spec.with_(precision="bf16"))
    assert bf16.boundaries == fp32.boundaries  # build_pipeline partitions on the fp32 profile
    for a, b in zip(fp32.stages, bf16.stages):
        assert b.held == pytest.approx(a.held / 2, rel=0.05) and b.working >= 0


def test_stage_zero_holds_one_more_micro_batch_per_extra_in_flight():
    defs = TINY.layer_defs()
    shape = (1, 1, 32, 32, 8)
    profile = stage_profile(defs, shape)
    (row0, _) = predicted_stage_bytes(profile, [0, 2, 4], 1)
    one = replay_peak(defs, StageKey(0, 2, 2, 0, 1, 0), shape, F32, 3)[0]
    two = replay_peak(defs, StageKey(0, 2, 2, 0, 2, 0), shape, F32, 3)[0]
    # the second in-flight micro-batch costs its saved activations (the partition's figure) and the
    # engine's copies of the stage input; a stage's working set is not repeated
    assert row0.activation_bytes * 0.9 <= two - one <= row0.activation_bytes * 2


def test_checkpointing_lowers_what_in_flight_micro_batches_hold():
    defs = TINY.layer_defs()
    shape = (1, 1, 32, 32, 8)
    plain = replay_peak(defs, StageKey(0, 3, 2, 0, 2, 0), shape, F32, 3)[0]
    ckpt = replay_peak(defs, StageKey(0, 3, 2, 0, 2, 1), shape, F32, 3)[0]
    assert ckpt < plain


def test_last_stage_keeps_its_outputs_between_steps():
    """DeepSpeed's last-stage backward returns before clearing its output buffers (2 of them)."""
    defs = TINY.layer_defs()
    shape = (1, 1, 32, 32, 8)
    _, rest = replay_peak(defs, StageKey(2, 4, 2, 1, 2, 0), shape, F32, 3)
    logits = 3 * 32 * 32 * 8 * 4
    assert rest >= 2 * logits


def test_zero3_hooks_replace_view_buffers_of_inplace_activations():
    # the sweep's U-Net on a slab: 8 channels x 128 x 128 > 20480 selects oneDNN kernels, whose small
    # working set leaves the in-place activation's view buffers at the peak
    defs = RunSpec(model="unet3d", params={"levels": 3, "base_width": 8, "max_width": 32}).layer_defs()
    shape = (1, 1, 128, 128, 4)
    without = replay_peak(defs, StageKey(0, 6, 1, 0, 1, 0, plain=True), shape, F32, 3)[0]
    with_hooks = replay_peak(defs, StageKey(0, 6, 1, 0, 1, 0, plain=True, zero3=True), shape, F32, 3)[0]
    assert with_hooks < without


# ---------------------------------------------------------------- composition


def test_prediction_is_the_sum_of_its_parts_and_uses_build_pipelines_split():
    model = MemoryModel(TINY.with_(patch=(32, 32, 16)))
    spec = TINY.with_(patch=(32, 32, 16), stages=2, ranks=2, micro_batches=2)
    pred = model.predict(spec)
    assert pred.boundaries == profile_partition(stage_profile(spec.layer_defs(), spec.sample_shape), 2, 2)
    for st in pred.stages:
        assert st.phase == "backward"
        s = st.states
        assert st.peak == (st.held + st.pipe_buffers + st.working + s.params + s.grads + s.optimizer
                           + s.buckets_backward + st.profile_leftover)
        assert st.in_flight == min(2 - st.stage, 2)
    counts = [count_parameters([d]) for d in spec.layer_defs()]
    params = model.predict(spec.with_(partition="parameters"))
    assert params.boundaries == [int(b) for b in partition_balanced(counts, 2)]


def test_deepspeeds_default_bucket_moves_the_peak_to_gradient_reduction():
    model = MemoryModel(TINY)
    spec = TINY.with_(stages=2, ranks=2, micro_batches=2, bucket=None)
    pred = model.predict(spec)
    for st in pred.stages:
        assert st.phase == "gradient reduction"
        assert st.peak >= 2 * 4 * DEEPSPEED_BUCKET
    small = model.predict(spec.with_(bucket=1 << 16))
    assert pred.max_peak - small.max_peak > 4 * DEEPSPEED_BUCKET


def test_bucket_term_follows_the_runs_deepspeed_config():
    from ds_seg3d.memory.spec import config_bucket

    for bucket in (1 << 16, 1 << 20, None):
        spec = TINY.with_(stages=2, ranks=2, bucket=bucket)
        elements = config_bucket(spec.ds_config())
        assert elements == (DEEPSPEED_BUCKET if bucket is None else bucket)
        assert states_bytes(1000, spec).bucket == 4 * elements


def test_largest_patch_grows_when_the_budget_does():
    model = MemoryModel(TINY)
    spec = TINY.with_(stages=2, ranks=2)
    z_small = model.largest_z(spec, 24 * 2**20, z_max=64)
    z_large = model.largest_z(spec, 48 * 2**20, z_max=64)
    assert z_small is not None and z_large is not None and z_large > z_small
    assert model.predict(spec.with_(patch=(32, 32, z_large))).max_peak <= 48 * 2**20
    assert model.largest_z(spec, 1024) is None


def test_the_2d_baseline_takes_any_slab_and_is_planned() -> None:
    spec = RunSpec(model="cnn2d", params=(("base_width", 4), ("max_width", 16), ("levels", 3)), patch=(32, 32, 6))
    assert z_step(spec) == 1
    pred = MemoryModel(spec).predict(spec)
    assert pred.max_peak > 0 and [s.stage for s in pred.stages] == [0]
