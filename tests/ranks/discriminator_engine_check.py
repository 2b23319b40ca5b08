"""A discriminator engine on the last stage of a 2-stage x 2-replica pipeline, beside the segmenter.

Launched by tests/test_discriminator_engine.py with 4 ranks. The segmenter (a tiny U-Net pipeline)
trains one batch; every rank then calls ``build_discriminator_engine``; the last-stage ranks train
the discriminator for a few steps on data that differ per replica; the segmenter trains another
batch. Each rank writes what it saw to ``rank<N>.json``; the pytest side compares the ranks.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from deepspeed import comm as dist
from deepspeed.utils import groups

from ds_seg3d.models import build_layers
from ds_seg3d.models.discriminator import Discriminator3D, DiscriminatorConfig, one_hot_labels
from ds_seg3d.models.unet3d import UNet3DConfig
from ds_seg3d.parallel import (
    Topology,
    build_pipeline,
    fill_batch_fields,
    init_distributed,
    initialize_pipeline,
    load_ds_config,
)
from ds_seg3d.parallel.discriminator_engine import build_discriminator_engine

PATCH = (8, 8, 8)
NUM_CLASSES = 3
SEGMENTER = UNet3DConfig(levels=2, base_width=4, convs_per_level=1, num_classes=NUM_CLASSES)
DISCRIMINATOR = DiscriminatorConfig(in_channels=1, num_classes=NUM_CLASSES, width=4, depth=2)
REPO_ROOT = Path(__file__).resolve().parents[2]


def quiet(cfg: dict) -> dict:
    """No monitor files under the repository from a test run."""
    cfg["csv_monitor"] = {"enabled": False}
    return cfg


def batches(topology: Topology, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Segmenter micro-batches; both ends of one pipeline draw the same ones (seeded by dp rank)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (topology.micro_batch, 1, *PATCH)
    return [
        (torch.randn(shape, generator=gen), torch.randint(0, NUM_CLASSES, (shape[0], *PATCH), generator=gen))
        for _ in range(topology.grad_accum)
    ]


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in params])


def discriminator_steps(engine, topology: Topology, dp_rank: int, steps: int) -> list[float]:
    """Real (one-hot labels) vs fake (random probabilities) BCE; different data on every replica."""
    losses = []
    for step in range(steps):
        for micro in range(topology.grad_accum):
            gen = torch.Generator().manual_seed(1000 * dp_rank + 10 * step + micro)
            shape = (topology.micro_batch, 1, *PATCH)
            image = torch.randn(shape, generator=gen)
            labels = torch.randint(0, NUM_CLASSES, (shape[0], *PATCH), generator=gen)
            fake = torch.softmax(torch.randn((shape[0], NUM_CLASSES, *PATCH), generator=gen), dim=1)
            real_logits = engine(image, one_hot_labels(labels, NUM_CLASSES))
            fake_logits = engine(image, fake)
            loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits)) + \
                F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--d-steps", type=int, default=3)
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = parser.parse_args()

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    topology = Topology(world_size=world, stages=2, micro_batch=1, grad_accum=2)
    dp_rank = topology.dp_rank_of(rank)

    seg_cfg = quiet(fill_batch_fields(load_ds_config(REPO_ROOT / "ds_configs" / "pipeline_zero1_cpu_fp32.json"), topology))
    module = build_pipeline(build_layers("unet3d", SEGMENTER), topology, F.cross_entropy, seed=11, topology=topology)
    segmenter = initialize_pipeline(module, seg_cfg)
    seg_mpu = groups.mpu
    seg_loss_before = float(segmenter.train_batch(iter(batches(topology, seed=dp_rank))))

    d_cfg = quiet(load_ds_config(REPO_ROOT / "ds_configs" / "discriminator_cpu_fp32.json"))
    d_cfg_before = json.dumps(d_cfg, sort_keys=True)
    torch.manual_seed(100 + rank)  # replicas start different: DeepSpeed's broadcast must align them
    model = Discriminator3D(DISCRIMINATOR)
    seeded = flat(model.parameters()).tolist()
    engine = build_discriminator_engine(model, d_cfg, topology, rank)

    result: dict = {
        "rank": rank,
        "stage": topology.stage_of(rank),
        "has_engine": engine is not None,
        "mpu_restored_after_build": groups.mpu is seg_mpu,
        "config_untouched": json.dumps(d_cfg, sort_keys=True) == d_cfg_before,
        "seg_loss_before": seg_loss_before,
        "d_seeded": seeded,
    }
    if engine is not None:
        result["d_initial"] = flat(engine.module.parameters()).tolist()
        result["d_dp_world_size"] = engine.dp_world_size
        result["d_group_ranks"] = engine.mpu.get_data_parallel_group_ranks()
        result["d_uses_its_group"] = engine.data_parallel_group is engine.mpu.get_data_parallel_group()
        result["d_train_batch"] = engine.train_batch_size()
        result["d_losses"] = discriminator_steps(engine, topology, dp_rank, args.d_steps)
        result["d_global_steps"] = engine.global_steps
        result["mpu_restored_after_steps"] = groups.mpu is seg_mpu
        result["d_final"] = flat(engine.module.parameters()).tolist()
        try:
            engine.save_checkpoint(str(args.out / "ckpt"))
            result["save_checkpoint_refused"] = False
        except RuntimeError:
            result["save_checkpoint_refused"] = True

    result["seg_loss_after"] = float(segmenter.train_batch(iter(batches(topology, seed=100 + dp_rank))))
    result["seg_global_steps"] = segmenter.global_steps
    result["seg_stage_params"] = flat(module.parameters()).tolist()

    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.rename(args.out / f"rank{rank}.json")
    dist.barrier()


if __name__ == "__main__":
    from ds_seg3d.parallel.teardown import exit_rank

    exit_rank(main())  # skips interpreter finalization, where gloo state could abort the finished rank
