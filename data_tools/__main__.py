"""``python -m data_tools`` / ``data-tools``: offline dataset tools (phantoms, build-shards, inspect, halves,
regrid, export-nnunet).

Bad input ends with one line, ``error: <path>: <problem>``, on stderr and exit status 2, never a traceback:
the person fixing it needs the file and the reason, not the call stack.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from data_tools import build_shards, export_nnunet, halves, inspect_shards, phantoms, regrid
from ds_seg3d.data.errors import DataError


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data-tools", description="Offline dataset tools: phantoms, build-shards, inspect, halves, regrid, export-nnunet.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    phantoms.register(sub)
    build_shards.register(sub)
    inspect_shards.register(sub)
    halves.register(sub)
    regrid.register(sub)
    export_nnunet.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DataError, ValueError) as e:
        print("error: " + str(e).replace("\r", " ").replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
