"""Saving and resuming a training run's checkpoints on every rank together.

``save`` writes a tag the way ``--resume`` and ``predict`` expect it (DeepSpeed's files, the client
state, the discriminator's state, then the manifest and ``latest``) and turns a file system that
cannot take it into one ``SaveError`` on every rank; ``resume_tag`` checks the tag a resume would
load. Both are collectives: every rank calls them.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ds_seg3d import checkpoint as ckpt
from ds_seg3d.data.sampler import PatchSampler
from ds_seg3d.training.adversarial import AdversarialTraining


class SaveError(Exception):
    """A checkpoint could not be written (on any rank); ``latest`` still names the previous tag."""


def _agree(problem: str | None) -> str | None:
    """The first rank's problem, the same on every rank (a collective)."""
    problems: list = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)


def _write_problem(e: BaseException, where: Path) -> str:
    """One line: the path and the problem, with the free space left (torch.save reports a full disk only
    as an iostream error)."""
    if isinstance(e, OSError) and e.filename:
        path, what = e.filename, e.strerror or str(e)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return f"{path}: {what}"
    else:
        path, what = where, (str(e).splitlines()[0] if str(e) else type(e).__name__)
    try:
        free = f"; {shutil.disk_usage(where if where.exists() else where.parent).free:,} bytes free there"
    except OSError:
        free = ""
    return f"{path}: {what}{free}"


def save(engine, run: Path, step: int, sampler: PatchSampler, adv: AdversarialTraining | None) -> None:
    """Save on every rank; once every rank has finished its files, they hash the tag's files between them
    (a share each), rank 0 writes the manifest and then ``latest``.

    A rank that cannot write (a read-only or full file system) does not leave the others waiting: every
    rank first checks that it can create the tag's folder, and every rank's outcome of the save is shared
    before the manifest; on any failure all ranks raise ``SaveError`` naming the path, rank 0 removes the
    half-written tag, and ``latest`` keeps naming the previous complete one."""
    tag = ckpt.step_tag(step)
    tag_dir = ckpt.checkpoint_root(run) / tag
    problem = None
    try:  # DeepSpeed's own save holds collectives that a rank failing before them would leave hanging
        tag_dir.mkdir(parents=True, exist_ok=True)
        probe = tag_dir / f".probe.{dist.get_rank()}"
        probe.write_bytes(b"\0")
        probe.unlink()
    except OSError as e:
        problem = _write_problem(e, tag_dir)
    if (problem := _agree(problem)) is None:
        state = {"step": step, "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state()}
        try:
            engine.save_checkpoint(str(ckpt.checkpoint_root(run)), tag=tag, client_state=state, save_latest=False)
            if adv is not None:
                adv.save(run, tag)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            problem = _write_problem(e, tag_dir)
        problem = _agree(problem)
    rank, world = dist.get_rank(), dist.get_world_size()
    if problem is not None:
        if rank == 0 and ckpt.latest_tag(run) != tag:
            shutil.rmtree(tag_dir, ignore_errors=True)  # half-written: never named, and its space back
        raise SaveError(f"step {step}: checkpoint {tag} not saved: {problem}; latest checkpoint: "
                        f"{ckpt.latest_tag(run) or 'none'}")
    share = [ckpt.file_record(run, p) for p in ckpt.tag_files(run, tag)[rank::world]]
    shares: list = [None] * world
    dist.all_gather_object(shares, share)
    if rank == 0:
        try:
            ckpt.write_manifest(run, tag, dict(record for part in shares for record in part))
            ckpt.write_latest(run, tag)
        except OSError as e:
            problem = _write_problem(e, tag_dir)
    if (problem := _agree(problem)) is not None:
        raise SaveError(f"step {step}: checkpoint {tag} not saved: {problem}; latest checkpoint: "
                        f"{ckpt.latest_tag(run) or 'none'}")


def resume_tag(run: Path, wanted: str | None) -> str:
    """The tag ``--resume`` loads (``--resume-from`` or ``latest``), checked whole against its manifest on
    rank 0; a one-line ValueError on every rank when it is missing or damaged."""
    problem = None
    if dist.get_rank() == 0:
        tag = wanted or ckpt.latest_tag(run)
        if tag is None:
            problem = f"{ckpt.checkpoint_root(run)}: --resume but no complete checkpoint"
        elif not (ckpt.checkpoint_root(run) / tag).is_dir():
            problem = f"{ckpt.checkpoint_root(run) / tag}: no such checkpoint"
        else:
            try:
                ckpt.check_intact(run, tag)
            except ValueError as e:
                problem = str(e)
        verdict = [problem, tag]
    else:
        verdict = [None, None]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise ValueError(verdict[0])
    return verdict[1]
