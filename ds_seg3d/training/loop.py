"""The training job behind ``deepspeed [--num_gpus N | --hostfile H] --module ds_seg3d.train --data SHARDS --out RUN``.

config -> data -> layers -> PipelineModule -> engine -> loop (train_batch, validate, checkpoint) -> curve.
The first and last pipeline stages draw the same patch sequence (images on the first, labels on the
last), seeded by (seed, data-parallel rank, epoch, index); middle stages draw nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ds_seg3d import checkpoint as ckpt
from ds_seg3d.config import PLANNED, ExperimentConfig, apply_plan, load_config, resolve_partition
from ds_seg3d.data.augment import AugmentConfig, NnUNetAugment
from ds_seg3d.data.reader import ShardReader, ShardReadError
from ds_seg3d.data.sampler import PatchSampler
from ds_seg3d.inference import postprocess
from ds_seg3d.models import build_layers, check_patch
from ds_seg3d.parallel import divergence, preemption, watchdog
from ds_seg3d.parallel.ds_config import check_ds_config, fill_batch_fields, load_ds_config, topology_for
from ds_seg3d.parallel.engines import init_distributed, initialize_pipeline, peer_gone
from ds_seg3d.parallel.pipeline import build_pipeline
from ds_seg3d.parallel.topology import Topology
from ds_seg3d.planning.plans import PLANS_NAME, NetworkPlan, Plans
from ds_seg3d.training.adversarial import AdversarialTraining, with_images_for_last_stage
from ds_seg3d.training.checkpointing import SaveError, resume_tag, save
from ds_seg3d.training.losses import DeepSupervisionLoss, DiceCELoss
from ds_seg3d.training.run_log import MetricsLog, plot_training_curve
from ds_seg3d.training.validate import validate


def experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    overrides = [f"data.shards={args.data}"] + list(args.set)
    if args.stages is not None:
        overrides.append(f"train.stages={args.stages}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.adversarial:
        overrides.append("adversarial.enabled=true")
    if args.adversarial_weight is not None:
        overrides.append(f"adversarial.weight={args.adversarial_weight}")
    return load_config(args.config, overrides)


def planned_config(cfg: ExperimentConfig) -> tuple[ExperimentConfig, NetworkPlan | None]:
    """The config with a planned model made concrete from the shards' plans.json (and that plan)."""
    if cfg.model.name != PLANNED:
        if cfg.data.patch is None:
            raise ValueError(f"data.patch: required when model.name names a network ({cfg.model.name!r}); "
                             "only a planned model takes the plan's patch")
        return cfg, None
    plan = Plans.load(cfg.data.shards).configurations.get(cfg.model.plan)
    if plan is None:
        raise ValueError(f"{Path(cfg.data.shards) / PLANS_NAME}: no {cfg.model.plan!r} network planned")
    return apply_plan(cfg, plan), plan


def plan_budget_gb(cfg: ExperimentConfig, plan: NetworkPlan | None) -> float | None:
    """The memory per rank a planned model was sized for (plans.json's target), None for a named network."""
    if plan is None:
        return None
    budget = Plans.load(cfg.data.shards).target.get("budget_gb")
    return float(budget) if budget else None


def augmentation(cfg: ExperimentConfig) -> AugmentConfig | NnUNetAugment | None:
    """The training patches' augmentation; nnU-Net's rotates a slice-wise network's patches in-plane only."""
    if cfg.data.augment == "nnunet":
        return NnUNetAugment(cfg.data.patch, slices=cfg.model.name == "cnn2d",
                             spatial_prob=cfg.data.spatial_prob)
    return AugmentConfig() if cfg.data.augment == "light" else None


def record_postprocessing(run: Path, decision: dict) -> None:
    """Add the post-processing decision to run.json (temp name, then rename), for ``predict``."""
    info = json.loads((run / ckpt.RUN_INFO).read_text())
    info[postprocess.KEY] = decision
    tmp = run / (ckpt.RUN_INFO + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(run / ckpt.RUN_INFO)


def run_info(cfg: ExperimentConfig, model_cfg, reader: ShardReader, ds_cfg: dict, topo: Topology,
             plan: NetworkPlan | None = None, boundaries: list[int] | None = None) -> dict:
    """What ``predict`` needs besides the weights: the model, labels and the dataset's preprocessing; and the
    stage boundaries, which a resumed run reuses (its ZeRO states are per stage)."""
    m = reader.manifest
    return {
        "experiment": cfg.to_dict(),
        "plan": plan.to_json() if plan is not None else None,
        "model": {"name": cfg.model.name, "config": _jsonable(model_cfg.__dict__)},
        "labels": reader.labels,
        "preprocessing": {k: m.get(k) for k in ("modality", "target_spacing", "normalisation")},
        "manifest_name": m.get("name"),
        "deepspeed_config": ds_cfg,
        "topology": {"world_size": topo.world_size, "stages": topo.stages, "dp": topo.dp,
                     "boundaries": [int(b) for b in boundaries] if boundaries is not None else None},
    }


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _data_error(e: ShardReadError, rank: int, bar: tqdm, dog: watchdog.Watchdog) -> int:
    """One line naming the shard and case, from the rank that met it; the exit status."""
    bar.close()
    print(f"error: rank {rank}: {e}", file=sys.stderr, flush=True)
    dog.stop()
    return 2


def run(args: argparse.Namespace):
    """Run the training job (``ds_seg3d.train`` parses ``args``); returns (exit code, segmenter engine,
    AdversarialTraining or None), the engines being None when the job stopped before building them (so
    that checks can inspect them)."""
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        cfg = experiment_config(args)
        reader = ShardReader(cfg.data.shards)  # a missing or damaged shard folder is named before its plans
        cfg, plan = planned_config(cfg)
        file_cfg = load_ds_config(args.deepspeed_config)
        topo = topology_for(file_cfg, world, cfg.train.stages, args.micro_batch, args.grad_accum).validate()
        if args.micro_batch is None and args.grad_accum is None:
            check_ds_config(file_cfg, topo, pipeline=True)  # a train_batch_size in the file must agree
        ds_cfg = fill_batch_fields(file_cfg, topo)
        bound_s = watchdog.default_bound_s() if args.watchdog_s is None else watchdog.check_bound(args.watchdog_s)
        stop_signals = preemption.parse_signals(args.preempt_signals)
        check_ds_config(ds_cfg, topo, pipeline=True)
        d_cfg = load_ds_config(args.discriminator_config) if cfg.adversarial.enabled else None
        model_cfg = cfg.model.build_config(in_channels=1, num_classes=len(reader.labels))
        method, budget_gb, why = resolve_partition(cfg.train.partition, cfg.train.memory_budget_gb,
                                                   plan_budget_gb(cfg, plan))
        check_patch(model_cfg, cfg.data.patch)
        train_cases = reader.case_ids(cfg.data.train_split)
        if not train_cases:
            raise ValueError(f"{cfg.data.shards}: split {cfg.data.train_split!r} has no cases")
    except ValueError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2, None, None
    run = Path(args.out)
    tag = None
    if args.resume:
        try:
            tag = resume_tag(run, args.resume_from)
        except ValueError as e:
            if rank == 0:
                print(f"error: {e}", file=sys.stderr)
            return 2, None, None
    run.mkdir(parents=True, exist_ok=True)
    sched = ds_cfg.get("scheduler", {}).get("params", {})
    for key in ("total_num_steps", "total_iters"):  # cosine, decay and poly schedules end with the run
        if key in sched:
            sched[key] = cfg.train.steps
    monitor = {"output_path": str(run / "monitor"), "job_name": "train"}
    ds_cfg.setdefault("csv_monitor", {"enabled": True}).update(monitor)
    if "tensorboard" in ds_cfg or importlib.util.find_spec("tensorboard") is not None:
        ds_cfg.setdefault("tensorboard", {"enabled": True}).update(monitor)

    dp_rank = topo.dp_rank_of(rank)
    defs = build_layers(cfg.model.name, model_cfg)
    seg_loss = DeepSupervisionLoss(DiceCELoss(cfg.train.dice_weight, cfg.train.ce_weight))
    adv = AdversarialTraining(seg_loss, len(reader.labels), cfg.adversarial) if cfg.adversarial.enabled else None
    # a resumed run keeps its stages: its optimizer states are per stage, and "time" / "balanced" would re-time
    kept = (ckpt.read_run_info(run).get("topology", {}).get("boundaries")
            if tag is not None and (run / ckpt.RUN_INFO).is_file() else None)
    kept = kept if kept is not None and len(kept) == topo.stages + 1 else None
    if rank == 0:
        print(f"pipeline partition: {why}" if kept is None else
              f"pipeline partition: the run's own boundaries {kept} (resumed)", flush=True)
    module = build_pipeline(defs, topo, adv.loss if adv else seg_loss,
                            partition_method=method,
                            memory_budget=budget_gb * 2**30 or None,
                            sample_shape=(topo.micro_batch, 1, *cfg.data.patch),
                            activation_checkpoint_interval=cfg.train.activation_checkpoint_interval,
                            seed=cfg.train.seed, boundaries=kept)
    engine = initialize_pipeline(module, ds_cfg)
    if adv is not None:
        adv.attach(d_cfg, topo, rank, seed=cfg.train.seed, device=args.discriminator_device)

    sampler = PatchSampler(reader, train_cases, cfg.data.patch, dp_rank=dp_rank, dp_size=topo.dp,
                           seed=cfg.train.seed, oversample_foreground=cfg.data.oversample_foreground,
                           patches_per_epoch=math.ceil(len(train_cases) / topo.dp),
                           augment=augmentation(cfg))
    start = 0
    if tag is not None:
        _, state = engine.load_checkpoint(str(ckpt.checkpoint_root(run)), tag=tag, load_module_only=False)
        start = int(state["step"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if adv is not None:
            adv.load(run, tag)
    elif rank == 0:
        (run / ckpt.RUN_INFO).write_text(json.dumps(run_info(cfg, model_cfg, reader, ds_cfg, topo, plan,
                                                             list(module.parts)), indent=1))
    data_iter = None
    if engine.is_first_stage() or engine.is_last_stage():
        data_iter = sampler.batches(topo.micro_batch)
        if adv is not None:
            data_iter = with_images_for_last_stage(data_iter)

    val_cases = reader.case_ids(cfg.data.val_split) if cfg.data.val_split else []
    if cfg.train.val_max_cases:
        val_cases = val_cases[: cfg.train.val_max_cases]
    log = MetricsLog(run) if rank == 0 else None
    if rank == 0:
        if plan is not None:
            print(f"plan ({Path(cfg.data.shards) / PLANS_NAME}): {plan.describe()}; as trained: "
                  f"{cfg.model.name} {json.dumps(cfg.model.params)}, patch {'x'.join(map(str, cfg.data.patch))}",
                  flush=True)
        print(topo.describe(), flush=True)
    dog = watchdog.Watchdog(bound_s, rank).start()
    pre = preemption.Preemption(stop_signals, args.preempt_exit_code).install()
    skipped = divergence.SkippedSteps(cfg.train.max_skipped_steps, engine.skipped_steps)
    bar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", disable=rank != 0)
    for step in range(start + 1, cfg.train.steps + 1):
        if adv is not None:
            adv.loss.step = step
        try:
            loss = float(engine.train_batch(data_iter))
        except ShardReadError as e:  # this rank stops; the launcher then ends the others
            return _data_error(e, rank, bar, dog), engine, adv
        except RuntimeError as e:
            if not peer_gone(e):
                raise
            bar.close()  # one line instead of a traceback: the peer's own line says why it ended
            print(f"error: rank {rank}: a peer rank ended during step {step} (its own error says why)",
                  file=sys.stderr, flush=True)
            dog.stop()
            return 2, engine, adv
        adv_metrics = adv.after_batch(step) if adv is not None else {}
        bad = divergence.first_problem(engine, rank, world, engine.is_last_stage())
        stop = pre.agreed(rank, world)  # a signal to any rank: save after this step and exit
        dog.pet()
        if bad is not None:  # stop before this state is validated or saved
            bar.close()
            if rank == 0:
                print(divergence.message(step, *bad, topo.stage_of(bad[0]), ckpt.latest_tag(run)),
                      file=sys.stderr, flush=True)
            dog.stop()
            return divergence.EXIT_CODE, engine, adv
        if skipped.update(engine.skipped_steps):  # fp16 only; the same count on every rank
            bar.close()
            if rank == 0:
                scale = getattr(engine.optimizer, "loss_scale", None)
                print(divergence.skipped_message(step, skipped.in_a_row, scale, ckpt.latest_tag(run)),
                      file=sys.stderr, flush=True)
            dog.stop()
            return divergence.EXIT_CODE, engine, adv
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        last = step == cfg.train.steps
        if log and (step % cfg.train.log_every == 0 or last or step == start + 1):
            log.write("train", step, loss=loss, lr=engine.get_lr()[0], **adv_metrics)
        if stop is None and val_cases and (last or (cfg.train.val_every and step % cfg.train.val_every == 0)):
            try:
                dice, largest = validate(engine, reader, val_cases, dp_rank=dp_rank, dp_size=topo.dp,
                                         roi=cfg.data.patch, micro_batch=topo.micro_batch,
                                         overlap=cfg.train.val_overlap, on_progress=dog.pet)
            except ShardReadError as e:
                return _data_error(e, rank, bar, dog), engine, adv
            dog.pet()
            if log:
                log.write("val", step, dice=dice, dice_largest_component=largest)
                bar.write(f"step {step}: validation Dice " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))
            if last and rank == 0:  # nnU-Net's post-processing, decided on the final validation
                record_postprocessing(run, postprocess.decide(dice, largest, reader.labels,
                                                              postprocess.training_components(reader.manifest)))
        if stop is not None or last or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
            began = time.monotonic()
            if stop is not None:
                pre.saving()  # a second signal from now on ends the rank at once
            try:
                save(engine, run, step, sampler, adv)
            except SaveError as e:  # every rank raises it, after the same collectives
                bar.close()
                if rank == 0:
                    print(f"error: {e}", file=sys.stderr, flush=True)
                dog.stop()
                return 2, engine, adv
            pre.done()
            dog.pet()
        if stop is not None:
            bar.close()
            if rank == 0:
                print(preemption.message(*stop, step, ckpt.step_tag(step), time.monotonic() - began,
                                         args.preempt_exit_code), file=sys.stderr, flush=True)
            dog.stop()
            return args.preempt_exit_code, engine, adv
    bar.close()
    if rank == 0:
        curve = plot_training_curve(run)
        print(f"run folder: {run} (checkpoint {ckpt.latest_tag(run)}, curve {curve})", flush=True)
    dist.barrier()
    dog.stop()
    return 0, engine, adv
