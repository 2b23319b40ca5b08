"""Train with ``ds_seg3d.train`` on real ranks, then record what the pytest side checks.

Every rank writes ``<out>/rank<N>.json`` with its stage, data-parallel rank and a checksum of its
stage's parameters after training, so the test can compare data-parallel replicas of each stage.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ds_seg3d.train import train


def main() -> int:
    argv = sys.argv[1:]
    out = Path(argv[argv.index("--check-out") + 1])
    del argv[argv.index("--check-out"):argv.index("--check-out") + 2]
    code, engine, _ = train(argv)
    if engine is None:
        return code
    params = [p.detach().double().flatten() for p in engine.module.parameters()]
    flat = torch.cat(params)
    record = {"rank": dist.get_rank(), "stage": engine.stage_id, "dp_rank": engine.grid.data_parallel_id,
              "num_params": int(flat.numel()), "sum": float(flat.sum()), "sum_sq": float((flat * flat).sum()),
              "first": [float(v) for v in flat[:16]]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    from ds_seg3d.parallel.teardown import exit_rank

    exit_rank(main())  # skips interpreter finalization, where gloo state could abort the finished rank
