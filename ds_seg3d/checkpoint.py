"""The run folder and its checkpoints: what training writes and what ``predict`` and ``--resume`` read.

A run folder holds::

    run.json                 the resolved experiment config, model config, labels and the dataset's
                             preprocessing settings (everything ``predict`` needs besides weights)
    checkpoints/<tag>/       DeepSpeed's files: one ``layer_NN-model_states.pt`` per pipeline layer
                             (independent of the stage count), engine and optimizer states
    checkpoints/<tag>/manifest.json   size and sha256 of every file of the tag (and of its discriminator
                             state), written after every rank saved and before ``latest``
    checkpoints/latest       the newest complete tag (written after every rank saved)
    metrics.jsonl, monitor/, *.png

Layer files are indexed by the global layer index, so a checkpoint trained with any number of stages
loads into the single-device ``nn.Sequential`` of the same layer list.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

RUN_INFO = "run.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"


def checkpoint_root(run: str | Path) -> Path:
    return Path(run) / CHECKPOINTS


def step_tag(step: int) -> str:
    return f"step{step:07d}"


def latest_tag(run: str | Path) -> str | None:
    """The tag in ``checkpoints/latest`` if it names an existing folder, else None."""
    path = checkpoint_root(run) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if tag and (checkpoint_root(run) / tag).is_dir() else None


def read_run_info(run: str | Path) -> dict[str, Any]:
    path = Path(run) / RUN_INFO
    if not path.is_file():
        raise ValueError(f"{path}: missing; {run} is not a ds-seg3d run folder")
    return json.loads(path.read_text())


def layer_file(tag_dir: Path, index: int) -> Path:
    return tag_dir / f"layer_{index:02d}-model_states.pt"


def load_layers(model: nn.Sequential, run: str | Path, tag: str | None = None) -> str:
    """Load a pipeline checkpoint's per-layer states into the single-device model; returns the tag.

    Raises a one-line ValueError when the checkpoint is missing, was made by a different model or holds
    non-finite weights.
    """
    tag = tag or latest_tag(run)
    if tag is None:
        raise ValueError(f"{checkpoint_root(run)}: no complete checkpoint (no 'latest' naming a saved tag)")
    tag_dir = checkpoint_root(run) / tag
    if not tag_dir.is_dir():
        raise ValueError(f"{tag_dir}: no such checkpoint")
    check_intact(run, tag, [layer_file(tag_dir, i) for i in range(len(model))])
    # DeepSpeed writes a file for every layer, also for layers without weights (an empty state).
    known = {layer_file(tag_dir, i).name for i in range(len(model))}
    foreign = sorted(p for p in tag_dir.glob("layer_*-model_states.pt") if p.name not in known)
    if foreign:
        raise ValueError(f"{foreign[0]}: the model has only {len(model)} layers: checkpoint from a different model")
    states = {}
    for i, layer in enumerate(model):
        path, own = layer_file(tag_dir, i), layer.state_dict()
        if not path.is_file():
            if own:
                raise ValueError(f"{path}: missing layer file: checkpoint from a different model")
            continue
        state = torch.load(path, map_location="cpu", weights_only=True)
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise ValueError(f"{path}: layer {i} does not match the model (different architecture or width)")
        if any(v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in state.values()):
            raise ValueError(f"{path}: layer {i} holds non-finite weights (NaN or inf): the run diverged "
                             f"before {tag} was saved")
        states[i] = state
    # Every file is checked before any is loaded, so a mismatch leaves the model untouched.
    for i, state in states.items():
        model[i].load_state_dict(state)
    return tag


MANIFEST = "manifest.json"


def tag_files(run: str | Path, tag: str) -> list[Path]:
    """Every file a checkpoint tag consists of (its folder and its discriminator state), sorted."""
    tag_dir = checkpoint_root(run) / tag
    files = [p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST]
    if discriminator_file(run, tag).is_file():
        files.append(discriminator_file(run, tag))
    return sorted(files)


def file_record(run: str | Path, path: Path) -> tuple[str, dict]:
    """(path relative to the run folder, its size and sha256)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return path.relative_to(run).as_posix(), {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(run: str | Path, tag: str, records: dict[str, dict]) -> None:
    path = checkpoint_root(run) / tag / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(dict(sorted(records.items())), indent=1))
    tmp.replace(path)


def damage(run: str | Path, tag: str, files: Iterable[Path] | None = None) -> str | None:
    """What is wrong with a tag's files (all of them, or ``files``) against its manifest, as
    ``"<file>: <problem>"``; None when they are intact. A tag without a manifest (one written before
    manifests were) cannot be checked and counts as intact."""
    run = Path(run)
    manifest = checkpoint_root(run) / tag / MANIFEST
    if not manifest.is_file():
        return None
    try:
        records = json.loads(manifest.read_text())
    except ValueError:
        return f"{manifest}: damaged (not JSON)"
    names = records if files is None else [Path(p).relative_to(run).as_posix() for p in files]
    for name in names:
        path, want = run / name, records.get(name)
        if want is None:
            if path.is_file():
                return f"{path}: not in the checkpoint's manifest ({manifest})"
            continue  # a layer without a file (no weights), as DeepSpeed may save it
        if not path.is_file():
            return f"{path}: missing (listed in {manifest})"
        if path.stat().st_size != want["size"]:
            return f"{path}: truncated or damaged ({path.stat().st_size} bytes, the manifest says {want['size']})"
        if file_record(run, path)[1]["sha256"] != want["sha256"]:
            return f"{path}: damaged (its sha256 differs from the manifest's)"
    return None


def tags(run: str | Path) -> list[str]:
    """Every checkpoint tag folder of a run, oldest first."""
    root = checkpoint_root(run)
    return sorted(p.name for p in root.glob("step*") if p.is_dir()) if root.is_dir() else []


def newest_intact(run: str | Path, before: str | None = None) -> str | None:
    """The newest tag (older than ``before``) with a manifest and every file intact."""
    for tag in reversed(tags(run)):
        if before is not None and tag >= before:
            continue
        if (checkpoint_root(run) / tag / MANIFEST).is_file() and damage(run, tag) is None:
            return tag
    return None


def check_intact(run: str | Path, tag: str, files: Iterable[Path] | None = None) -> None:
    """Raise a one-line ValueError naming the first damaged file of a tag and the newest intact tag."""
    problem = damage(run, tag, files)
    if problem is not None:
        raise ValueError(f"{problem}; newest intact checkpoint: {newest_intact(run, before=tag) or 'none'}")


def write_latest(run: str | Path, tag: str) -> None:
    """Point ``latest`` at a tag whose files every rank has finished writing (temp name, then rename)."""
    root = checkpoint_root(run)
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(tag)
    tmp.replace(root / LATEST)


DISCRIMINATOR = "discriminator"


def discriminator_file(run: str | Path, tag: str) -> Path:
    """The discriminator's state for a segmenter tag, kept apart from the segmenter's checkpoints."""
    return Path(run) / DISCRIMINATOR / f"{tag}.pt"


def save_discriminator(engine, run: str | Path, tag: str) -> None:
    """Module, optimizer and scheduler state of the discriminator engine (temp name, then rename).

    The discriminator runs ZeRO-0, so every replica holds the whole state and one writer suffices.
    DeepSpeed's own ``save_checkpoint`` is not used: it holds whole-world barriers that ranks
    without a discriminator would have to mirror.
    """
    path = discriminator_file(run, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"module": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict(),
             "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
             "global_steps": engine.global_steps, "global_samples": engine.global_samples}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_discriminator(engine, run: str | Path, tag: str) -> None:
    path = discriminator_file(run, tag)
    if not path.is_file():
        raise ValueError(f"{path}: missing; the checkpoint {tag} has no discriminator state")
    state = torch.load(path, map_location="cpu", weights_only=False)
    engine.module.load_state_dict(state["module"])
    engine.optimizer.load_state_dict(state["optimizer"])
    if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    engine.global_steps = state["global_steps"]
    engine.global_samples = state["global_samples"]
