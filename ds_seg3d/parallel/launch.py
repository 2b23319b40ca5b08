"""Starting ``deepspeed`` launches from Python: the launcher, a rendezvous port and the ranks' environment.

Experiments and memory sweeps start real multi-rank jobs with the same launcher users type; these
helpers are the one place that finds it, picks a free port (another job on the machine may hold
DeepSpeed's default 29500) and sets what every rank needs.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

from ds_seg3d.paths import IMPORT_ROOT


def free_port() -> int:
    """A TCP port nobody listens on right now (the launcher's rendezvous port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> str:
    """The ``deepspeed`` launcher of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).with_name("deepspeed")
    if beside.exists():
        return str(beside)
    found = shutil.which("deepspeed")
    if found is None:
        raise ValueError(f"{beside}: the deepspeed launcher is installed neither next to python nor on PATH")
    return found


def launch_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a launch from here: one thread per rank (ranks share the cores) and this
    copy of ``ds_seg3d`` first on ``PYTHONPATH``, so that every rank imports the code that started it."""
    env = dict(os.environ if base is None else base)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(IMPORT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env
