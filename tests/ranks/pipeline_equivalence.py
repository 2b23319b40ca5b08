"""One training step of a tiny U-Net as a 2-stage DeepSpeed pipeline, checked against one device.

Launched by tests/test_pipeline_equivalence.py through the deepspeed launcher. Every rank also
builds the whole network as an ``nn.Sequential`` with the same seed, runs the same micro-batches
with the same loss and SGD step by hand, and writes, for the layers its stage owns, how far the
pipelined initial weights and weight updates are from the single-device ones. The pytest side
asserts on the JSON files (one per rank).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from deepspeed import comm as dist

from ds_seg3d.models import build_layers
from ds_seg3d.models.layers import build_sequential
from ds_seg3d.models.unet3d import UNet3DConfig
from ds_seg3d.parallel import (
    Topology,
    build_pipeline,
    fill_batch_fields,
    init_distributed,
    initialize_pipeline,
    load_ds_config,
)
from ds_seg3d.training.losses import DeepSupervisionLoss

SEED = 4321
LR = 0.5
PATCH = (16, 16, 16)
NUM_CLASSES = 3
MODEL = UNet3DConfig(levels=3, base_width=4, convs_per_level=1, num_classes=NUM_CLASSES)
# Deep supervision: level 1's logits are made by dec1 (layer 5) and ride to the head past a boundary at 6.
SUPERVISED = UNet3DConfig(levels=4, base_width=4, convs_per_level=1, num_classes=NUM_CLASSES, deep_supervision=True,
                          strides=((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)))
REPO_ROOT = Path(__file__).resolve().parents[2]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


loss_fn = DeepSupervisionLoss(cross_entropy)


def sgd_config(topology: Topology) -> dict:
    """The shipped CPU config with plain SGD, so one step is a checkable ``w -= lr * grad``."""
    cfg = fill_batch_fields(load_ds_config(REPO_ROOT / "ds_configs" / "pipeline_zero1_cpu_fp32.json"), topology)
    cfg["optimizer"] = {"type": "SGD", "params": {"lr": LR}}
    cfg["zero_allow_untested_optimizer"] = True
    cfg.pop("scheduler", None)
    cfg["gradient_clipping"] = 0.0
    cfg["csv_monitor"] = {"enabled": False}
    return cfg


def batches(topology: Topology) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same fixed micro-batches on every rank (first stage uses images, last uses labels)."""
    gen = torch.Generator().manual_seed(7)
    shape = (topology.micro_batch, 1, *PATCH)
    return [
        (torch.randn(shape, generator=gen), torch.randint(0, NUM_CLASSES, (shape[0], *PATCH), generator=gen))
        for _ in range(topology.grad_accum)
    ]


def reference_step(defs, data) -> tuple[torch.nn.Sequential, dict[int, dict[str, torch.Tensor]], float]:
    """Single-device step with DeepSpeed's semantics: mean of micro-batch losses, then SGD."""
    ref = build_sequential(defs, seed=SEED)
    initial = {i: copy.deepcopy(layer.state_dict()) for i, layer in enumerate(ref)}
    total = 0.0
    for images, labels in data:
        loss = loss_fn(ref(images), labels)
        (loss / len(data)).backward()
        total += loss.item()
    torch.optim.SGD(ref.parameters(), lr=LR).step()
    return ref, initial, total / len(data)


def crossing_tensors(ref: torch.nn.Sequential, boundary: int, images: torch.Tensor) -> int:
    """How many tensors the first stage sends to the second (U-Net skips ride along)."""
    x = images
    with torch.no_grad():
        for layer in list(ref)[:boundary]:
            x = layer(x)
    return len(x) if isinstance(x, tuple) else 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--partition", default="memory")
    parser.add_argument("--ckpt-interval", type=int, default=0)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--deep-supervision", action="store_true", help="the SUPERVISED network, split at --boundary")
    parser.add_argument("--boundary", type=int, default=None, help="explicit 2-stage split after this many layers")
    parser.add_argument("--memory-budget", type=float, default=None, help="bytes per rank (--partition balanced)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = parser.parse_args()

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    topology = Topology(world_size=world, stages=2, micro_batch=1, grad_accum=args.grad_accum)
    defs = build_layers("unet3d", SUPERVISED if args.deep_supervision else MODEL)
    module = build_pipeline(
        defs, topology.stages, loss_fn,
        partition_method=args.partition,
        sample_shape=(topology.micro_batch, 1, *PATCH),
        activation_checkpoint_interval=args.ckpt_interval,
        seed=SEED,
        topology=topology,
        boundaries=None if args.boundary is None else [0, args.boundary, len(defs)],
        memory_budget=args.memory_budget,
    )
    start = module._local_start
    local = {start + i: layer for i, layer in enumerate(module.forward_funcs)}
    pipe_initial = {i: copy.deepcopy(layer.state_dict()) for i, layer in local.items()}
    walks = [0]  # backward passes through this stage's first layer (stage 0: the encoder every skip shares)
    local[start].register_full_backward_hook(lambda *_: walks.__setitem__(0, walks[0] + 1))
    on_stored = []  # per forward pass: does the stage run on the tensors the engine stored (no clone)?
    holder: list = []

    def same(a, b) -> bool:
        return a is b or (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
                          and all(x is y for x, y in zip(a, b)))

    local[start].register_forward_pre_hook(lambda _, args: on_stored.append(
        any(same(args[0], buf) for buf in holder[0].pipe_buffers["inputs"])))

    engine = initialize_pipeline(module, sgd_config(topology))
    holder.append(engine)
    data = batches(topology)
    loss = float(engine.train_batch(iter(data)))

    ref, ref_initial, ref_loss = reference_step(defs, data)
    layers = {}
    for i, layer in local.items():
        after = layer.state_dict()
        ref_after = ref[i].state_dict()
        rows = {}
        for key in after:
            pipe_update = after[key].detach().float() - pipe_initial[i][key].float()
            ref_update = ref_after[key].detach().float() - ref_initial[i][key].float()
            rows[key] = {
                "init_diff": float((pipe_initial[i][key] - ref_initial[i][key]).abs().max()),
                "update_diff": float((pipe_update - ref_update).abs().max()),
                "update_max": float(ref_update.abs().max()),
            }
        layers[str(i)] = rows

    result = {
        "rank": rank,
        "stage": topology.stage_of(rank),
        "boundaries": [int(b) for b in module.parts],
        "crossing_tensors": crossing_tensors(ref, int(module.parts[1]), data[0][0]),
        "loss": loss,
        "ref_loss": ref_loss,
        "layers": layers,
        "first_layer_backward_walks": walks[0],
        "forward_on_stored_inputs": on_stored,
        "receive_pool_bytes": sum(t.numel() * t.element_size() for t in engine._grad_layer_buf),
        "micro_batches": topology.grad_accum,
        "updates": {i: {k: (layer.state_dict()[k].float() - pipe_initial[i][k].float()).flatten()[:64].tolist()
                        for k in layer.state_dict()} for i, layer in local.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(args.out / f"rank{rank}.json")
    dist.barrier()


if __name__ == "__main__":
    from ds_seg3d.parallel.teardown import exit_rank

    exit_rank(main())  # skips interpreter finalization, where gloo state could abort the finished rank
