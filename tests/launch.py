"""Run a script on several real ranks with the ``deepspeed`` launcher, as users do.

Multi-rank tests call ``run_deepspeed(script, args, num_ranks=2)``: it picks a free master port,
forces ``OMP_NUM_THREADS=1`` (ranks share a few CPU cores), puts the repository root on
``PYTHONPATH`` so rank scripts import ``ds_seg3d``, captures stdout and stderr together, and kills
the whole process group if the run exceeds its timeout. Ranks receive ``--local_rank=N`` from the
launcher, so rank scripts must accept it.
"""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from ds_seg3d.parallel.launch import deepspeed_launcher, free_port  # noqa: F401 (free_port: for the tests)

REPO_ROOT = Path(__file__).resolve().parents[1]
RANKS_DIR = Path(__file__).resolve().parent / "ranks"


def tail(text: str, lines: int = 60) -> str:
    """The end of a long log, for assertion messages."""
    return "\n".join(text.splitlines()[-lines:])


def run_deepspeed(
    script: str | Path,
    args: Sequence[str] = (),
    *,
    num_ranks: int = 2,
    timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    module: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``deepspeed --num_gpus N --master_port P <script> args`` from the repository root.

    Returns the completed process (``stdout`` holds stdout and stderr interleaved). With
    ``check`` a non-zero exit or a timeout raises ``AssertionError`` carrying the log's tail.
    """
    script = Path(script)
    if module:  # ``deepspeed --module pkg.mod``, the way users launch training
        target = ["--module", str(script)]
    elif not script.is_absolute():
        target = [str(RANKS_DIR / script if (RANKS_DIR / script).exists() else REPO_ROOT / script)]
    else:
        target = [str(script)]
    run_env = dict(os.environ)
    run_env.update(env or {})
    run_env["OMP_NUM_THREADS"] = "1"
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), run_env.get("PYTHONPATH", "")) if p)
    port = free_port()
    cmd = [
        deepspeed_launcher(), "--num_gpus", str(num_ranks), "--master_port", str(port),
        *target, *map(str, args),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: a timeout takes the ranks down with the launcher
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        if check:
            raise AssertionError(f"{' '.join(cmd)} timed out after {timeout:.0f} s:\n{tail(out)}") from None
        return subprocess.CompletedProcess(cmd, -signal.SIGKILL, out, None)
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, None)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {result.returncode}:\n{tail(out)}")
    leaked = leftover_shm(port)
    for path in leaked:
        path.unlink(missing_ok=True)
    if check and leaked:
        raise AssertionError(f"the job left DeepSpeed's shared-memory workspaces behind: {[p.name for p in leaked]}")
    return result


def leftover_shm(port: int) -> list[Path]:
    """DeepSpeed CPU all-reduce workspaces of the job on ``port`` still named in /dev/shm."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
