"""Integrity checks of a shard folder: everything the sampler and trainer assume about a manifest and its shards.

Run after a build, after copying a dataset to another file system, or before a long training run:
a silently damaged shard otherwise surfaces hours later as a NaN loss or a crash in a data worker.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from data_tools.build_shards import is_shard_name
from ds_seg3d.data.shard_format import (
    FOREGROUND,
    IMAGE,
    LABEL,
    MANIFEST_NAME,
    case_group,
    case_ids,
    load_manifest,
    open_shard,
    sha256_file,
)


def verify(folder: str | os.PathLike) -> list[str]:
    """Every problem of a shard folder, one line each, naming the shard or case; empty when all checks pass.

    A folder without a readable manifest raises ValueError (from ``load_manifest``): nothing else can be
    checked without it.
    """
    folder = Path(folder)
    manifest = load_manifest(folder)
    problems: list[str] = []
    label_values = {int(v) for v in manifest["labels"].values()}
    cases: dict[str, Any] = manifest["cases"]
    listed: dict[str, str] = {}  # case -> shard, as the shard list says
    for shard in manifest["shards"]:
        for cid in shard["cases"]:
            if cid in listed:
                problems.append(f"{cid}: listed in both {listed[cid]} and {shard['file']}")
            listed[cid] = shard["file"]
    for cid, entry in cases.items():
        if listed.get(cid) != entry["shard"]:
            problems.append(f"{cid}: the manifest puts it in {entry['shard']} but the shard list in {listed.get(cid)}")
    for cid in sorted(set(listed) - set(cases)):
        problems.append(f"{cid} ({listed[cid]}): in the shard list but has no case entry in {MANIFEST_NAME}")
    problems += _check_splits(manifest.get("splits", {}), set(cases))
    known = {s["file"] for s in manifest["shards"]}
    for p in sorted(folder.iterdir()):
        if p.name not in known and (is_shard_name(p.name) or p.name.endswith(".tmp")):
            problems.append(f"{p}: not listed in {MANIFEST_NAME} (left over from another build?)")

    with tqdm(total=len(cases), desc="inspect", unit="case", disable=None) as bar:
        for shard in manifest["shards"]:
            problems += _check_shard(folder, shard, cases, label_values, bar)
    return problems


def _check_splits(splits: dict[str, Any], cases: set[str]) -> list[str]:
    groups = {k: splits.get(k, []) for k in ("train", "val", "test")}
    for i, fold in enumerate(splits.get("folds", [])):
        groups[f"fold {i} val"] = fold["val"]
        groups[f"fold {i} train"] = fold["train"]
    out = [f"{MANIFEST_NAME}: split {name!r} names unknown case {c}"
           for name, ids in groups.items() for c in ids if c not in cases]
    sets = {k: set(v) for k, v in groups.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if sets[a] & sets[b]:
            out.append(f"{MANIFEST_NAME}: splits {a!r} and {b!r} share cases {sorted(sets[a] & sets[b])[:3]}")
    for i, fold in enumerate(splits.get("folds", [])):
        if (set(fold["val"]) & set(fold["train"])) or (set(fold["val"]) | set(fold["train"])) & sets["test"]:
            out.append(f"{MANIFEST_NAME}: fold {i} overlaps its own train/val or the test split")
    return out


def _check_shard(folder: Path, shard: dict[str, Any], cases: dict[str, Any], label_values: set[int],
                 bar: tqdm) -> list[str]:
    path = folder / shard["file"]
    members = [cid for cid, e in cases.items() if e["shard"] == shard["file"]]
    if not path.is_file():
        bar.update(len(members))
        return [f"{path}: shard file missing"]
    problems = []
    size = path.stat().st_size
    if size != shard["bytes"]:
        problems.append(f"{path}: {size} bytes, the manifest says {shard['bytes']}")
    if sha256_file(path) != shard["sha256"]:
        problems.append(f"{path}: sha256 does not match the manifest (file changed or damaged)")
    try:
        f = open_shard(path)
    except (OSError, ValueError) as e:
        bar.update(len(members))
        return problems + [f"{path}: cannot be opened as a shard ({str(e).splitlines()[0]})"]
    with f:
        try:
            present = set(case_ids(f))
        except (KeyError, OSError) as e:
            bar.update(len(members))
            return problems + [f"{path}: no readable case group ({e})"]
        for cid in sorted(present - set(members)):
            problems.append(f"{cid} ({path.name}): in the shard but not in {MANIFEST_NAME}")
        for cid in members:
            if cid not in present:
                problems.append(f"{cid} ({path.name}): listed in {MANIFEST_NAME} but missing from the shard")
            else:
                try:
                    problems += [f"{cid} ({path.name}): {p}"
                                 for p in _check_case(case_group(f, cid), cases[cid], label_values)]
                except (KeyError, OSError, ValueError) as e:
                    problems.append(f"{cid} ({path.name}): unreadable ({str(e).splitlines()[0]})")
            bar.update(1)
    return problems


def _check_case(g: h5py.Group, entry: dict[str, Any], label_values: set[int]) -> list[str]:
    problems = []
    image, label = g[IMAGE][()], g[LABEL][()]
    shape = list(entry["shape"])
    if list(image.shape) != shape or list(label.shape) != shape:
        problems.append(f"image {list(image.shape)} and label {list(label.shape)} shapes, the manifest says {shape}")
    if not np.isfinite(image).all():
        problems.append(f"{int((~np.isfinite(image)).sum())} non-finite image values")
    undeclared = sorted(set(np.unique(label).tolist()) - label_values)
    if undeclared:
        problems.append(f"label values {undeclared} are not declared labels {sorted(label_values)}")
    for key, ds in g[FOREGROUND].items():
        value, coords = int(key), ds[()]
        if value not in label_values:
            problems.append(f"foreground coordinates for undeclared label {value}")
        if coords.size == 0:
            continue
        if coords.ndim != 2 or coords.shape[1] != 3:
            problems.append(f"foreground/{key} has shape {coords.shape}, expected (N, 3)")
            continue
        inside = ((coords >= 0) & (coords < np.array(label.shape))).all(axis=1)
        if not inside.all():
            problems.append(f"foreground/{key}: {int((~inside).sum())} coordinates outside {list(label.shape)}")
        c = coords[inside]
        off = int((label[c[:, 0], c[:, 1], c[:, 2]] != value).sum())
        if off:
            problems.append(f"foreground/{key}: {off} coordinates not on voxels of label {value}")
    return problems


def case_table(manifest: dict[str, Any]) -> str:
    """One row per case: where it lives, its grid, and the volume of each label in mL."""
    names = [n for n, v in manifest["labels"].items() if int(v) != 0]
    head = ["case", "shard", "shape", "spacing (mm)"] + [f"{n} (mL)" for n in names]
    rows = [head]
    for cid, e in manifest["cases"].items():
        rows.append([cid, e["shard"], "x".join(str(s) for s in e["shape"]),
                     "x".join(f"{s:g}" for s in e["spacing"])]
                    + [f"{e['volume_ml'].get(n, 0.0):.2f}" for n in names])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def register(subparsers: Any) -> None:
    """Add the ``inspect`` subcommand."""
    p = subparsers.add_parser("inspect", help="verify a shard folder; exit 0 only when every check passes",
                              description=verify.__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="shard folder holding manifest.json")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    problems = verify(args.folder)
    manifest = load_manifest(args.folder)
    print(case_table(manifest))
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    n_cases, n_shards = len(manifest["cases"]), len(manifest["shards"])
    if problems:
        print(f"{args.folder}: {len(problems)} problems in {n_cases} cases / {n_shards} shards")
        return 1
    print(f"{args.folder}: ok, {n_cases} cases in {n_shards} shards verified")
    return 0
