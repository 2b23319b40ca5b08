"""``ds-seg3d check-run RUN``: every checkpoint of a run folder checked against its manifest.

Prints one line per tag (files, bytes, intact or what is damaged, which one ``latest`` names) and exits
0 when ``latest`` names an intact checkpoint, 1 when it does not (the line names the newest intact one
to ``--resume-from`` or ``predict --tag``), 2 when RUN is not a run folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ds_seg3d import checkpoint as ckpt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder (the --out of training)")


def run(args: argparse.Namespace) -> int:
    root = ckpt.checkpoint_root(args.run)
    if not root.is_dir():
        print(f"error: {root}: missing; {args.run} is not a run folder with checkpoints", file=sys.stderr)
        return 2
    latest = ckpt.latest_tag(args.run)
    for tag in ckpt.tags(args.run):
        manifest = root / tag / ckpt.MANIFEST
        if not manifest.is_file():
            state = "no manifest: unfinished, or written before manifests (not checked)"
            files = size = "-"
        else:
            problem = ckpt.damage(args.run, tag)
            state = "intact" if problem is None else f"DAMAGED: {problem}"
            try:
                records = json.loads(manifest.read_text()).values()
                files, size = str(len(records)), f"{sum(r['size'] for r in records):,}"
            except (ValueError, KeyError, TypeError, AttributeError):
                files = size = "?"
        mark = "  <- latest" if tag == latest else ""
        print(f"{tag}  {files:>4} files  {size:>15} bytes  {state}{mark}")
    if latest is None:
        print(f"error: {root / ckpt.LATEST}: names no saved checkpoint; newest intact: "
              f"{ckpt.newest_intact(args.run) or 'none'}", file=sys.stderr)
        return 1
    if ckpt.damage(args.run, latest) is not None:
        print(f"error: latest ({latest}) is damaged; newest intact checkpoint: "
              f"{ckpt.newest_intact(args.run, before=latest) or 'none'}", file=sys.stderr)
        return 1
    return 0
