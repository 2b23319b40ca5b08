"""``python -m ds_seg3d <command>`` (console script ``ds-seg3d``).

Training runs under the DeepSpeed launcher: ``deepspeed --module ds_seg3d.train ...``.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from ds_seg3d import evaluate, predict

    parser = argparse.ArgumentParser(prog="ds-seg3d", description="Pipelined 3D CNN segmentation with DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="label NIfTI files with a trained run (sliding windows)")
    predict.add_arguments(p)
    p.set_defaults(func=predict.run)
    e = sub.add_parser("evaluate", help="Dice and volume agreement of label NIfTIs against reference labels")
    evaluate.add_arguments(e)
    e.set_defaults(func=evaluate.run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
