"""``python -m ds_seg3d <command>`` (console script ``ds-seg3d``): one table dispatches every command.

Each command is a module with ``add_arguments(parser)`` and ``run(args) -> exit status``, imported only
when chosen, so ``ds-seg3d plan`` never pays for DeepSpeed. Training runs under the DeepSpeed
launcher instead: ``deepspeed --module ds_seg3d.train ...``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("ds_seg3d.inference.predict", "label NIfTI files with a trained run (sliding windows)"),
    "evaluate": ("ds_seg3d.evaluation.evaluate", "Dice, HD95 and volume agreement of label NIfTIs with "
                                                 "reference labels (CSV, summary, Bland-Altman PNG)"),
    "plan": ("ds_seg3d.memory.planner", "stages, micro-batches, checkpointing and ZeRO that fit a memory budget"),
    "bench memory": ("ds_seg3d.memory.sweep", "per-rank peak memory over a sweep, predicted beside measured"),
    "check-run": ("ds_seg3d.training.check_run", "verify every checkpoint of a run folder against its manifest"),
    "experiment": ("ds_seg3d.experiment.run", "a named comparison end to end: data, shards, training per arm, scores"),
}
"""Command (``"group name"`` for a sub-command) -> (module, help)."""


def make_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with the arguments of the one command that ``argv`` names (the others stay unloaded)."""
    parser = argparse.ArgumentParser(prog="ds-seg3d", description="Pipelined 3D CNN segmentation with DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (module, help_text) in COMMANDS.items():
        *group, leaf = name.split()
        where = sub
        if group:
            if group[0] not in groups:
                g = sub.add_parser(group[0], help=f"{group[0]} commands")
                groups[group[0]] = g.add_subparsers(dest=f"{group[0]}_command", required=True)
            where = groups[group[0]]
        p = where.add_parser(leaf, help=help_text)
        chosen = argv[:len(group) + 1] == [*group, leaf]
        if chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser(argv).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
