"""Adversarial training on real ranks, then the checks the pytest side asserts on.

After ``ds_seg3d.train`` finishes (adversarial mode), each rank records: a checksum of the
discriminator's parameters (last stage), and what one extra segmenter ``train_batch`` with ONLY the
adversarial term in its loss does: the discriminator must stay unchanged with no gradient, and the
first stage's parameters must change (the adversarial gradient crosses the pipe).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ds_seg3d.train import train


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in module.parameters()])


def main() -> int:
    argv = sys.argv[1:]
    out = Path(argv[argv.index("--check-out") + 1])
    patch = [int(v) for v in argv[argv.index("--check-patch") + 1].split(",")]
    for flag in ("--check-out", "--check-patch"):
        i = argv.index(flag)
        del argv[i:i + 2]
    code, engine, adv = train(argv)
    if engine is None:
        return code
    rank = dist.get_rank()
    record = {"rank": rank, "stage": engine.stage_id, "last": engine.is_last_stage()}
    d = adv.engine.module if adv.engine is not None else None
    if d is not None:
        flat = _flat(d)
        record["d_sum"], record["d_sum_sq"], record["d_first"] = float(flat.sum()), float((flat ** 2).sum()), \
            [float(v) for v in flat[:8]]

    # One more segmenter step whose loss is the adversarial term alone.
    adv.loss.step = 10**9
    adv.loss.seg_loss = lambda logits, labels: logits.sum() * 0.0
    g = torch.Generator().manual_seed(0)
    micro = engine.train_micro_batch_size_per_gpu()
    batches = []
    for _ in range(engine.gradient_accumulation_steps()):
        images = torch.randn((micro, 1, *patch), generator=g)
        labels = torch.randint(0, 2, (micro, *patch), generator=g)
        batches.append((images, (labels, images)))
    seg_before = _flat(engine.module)
    d_before = _flat(d) if d is not None else None
    engine.train_batch(iter(batches))
    record["seg_changed"] = bool((_flat(engine.module) - seg_before).abs().max() > 0)
    if d is not None:
        record["d_unchanged"] = bool(torch.equal(_flat(d), d_before))
        record["d_grad_free"] = all(p.grad is None or not p.grad.any() for p in d.parameters())
    adv.loss.take_stash()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    from ds_seg3d.parallel.teardown import exit_rank

    exit_rank(main())  # skips interpreter finalization, where gloo state could abort the finished rank
