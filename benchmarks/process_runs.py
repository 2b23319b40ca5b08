"""Commands of a benchmark run in their own process group: output to a log, wall clock, peak memory, nothing left behind."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Largest sum of proportional set sizes over a process and its descendants, sampled every ``period`` s."""

    def __init__(self, pid: int, period: float = 1.0):
        self.pid, self.period, self.peak = pid, period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_full_info().pss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self._sample())

    def __enter__(self) -> PeakMemory:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT) -> dict:
    """Run ``cmd`` in its own process group, output to ``log``; raises with the log's tail on failure.

    Returns wall seconds and peak memory (bytes). An interrupt or error stops the whole group, so that no
    nnU-Net worker or DeepSpeed rank outlives the benchmark.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with PeakMemory(proc.pid) as mem:
                rc = proc.wait()
        finally:
            _stop_group(proc)
    wall = time.perf_counter() - start
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{shlex.join(cmd[:3])} ... exited with {rc} (log {log}):\n{tail}")
    return {"wall_s": wall, "peak_bytes": mem.peak}


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; stragglers of its group (workers) get the next signal
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


def tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not path:
        raise SystemExit(f"error: {name} not found: install the bench extra (pip install -e '.[bench]')")
    return path
