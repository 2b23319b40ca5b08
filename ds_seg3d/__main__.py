"""``python -m ds_seg3d <command>`` (console script ``ds-seg3d``).

Training runs under the DeepSpeed launcher: ``deepspeed --module ds_seg3d.train ...``.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from ds_seg3d import evaluate, experiment, predict

    parser = argparse.ArgumentParser(prog="ds-seg3d", description="Pipelined 3D CNN segmentation with DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="label NIfTI files with a trained run (sliding windows)")
    predict.add_arguments(p)
    p.set_defaults(func=predict.run)
    e = sub.add_parser("evaluate", help="Dice, HD95 and volume agreement of label NIfTIs with reference labels (CSV, summary, Bland-Altman PNG)")
    evaluate.add_arguments(e)
    e.set_defaults(func=evaluate.run)
    from ds_seg3d.bench import plan, sweep

    pl = sub.add_parser("plan", help="stages, micro-batches, checkpointing and ZeRO that fit a memory budget")
    plan.add_arguments(pl)
    pl.set_defaults(func=plan.run)
    b = sub.add_parser("bench", help="measured benchmarks")
    bench = b.add_subparsers(dest="bench_command", required=True)
    bm = bench.add_parser("memory", help="per-rank peak memory over a sweep, predicted beside measured")
    sweep.add_arguments(bm)
    bm.set_defaults(func=sweep.run)
    x = sub.add_parser("experiment", help="a named comparison end to end: phantoms, shards, training per arm, scores")
    experiment.add_arguments(x)
    x.set_defaults(func=experiment.run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
