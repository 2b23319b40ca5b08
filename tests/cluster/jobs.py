"""Jobs on the simulated cluster: launch ``deepspeed --hostfile`` from node1, find ranks, time exits.

The launcher runs in node1's network namespace with the launch folder (hostfile, .deepspeed_env) as
its working directory, as a user logged into node1 would run it. It gets its own process group and
a job-level timeout: past it, the launcher gets SIGTERM (DeepSpeed's runner then runs ``pkill`` on
every node over pdsh, which the nodes' PID namespaces confine), then the group gets SIGKILL; the
cluster's teardown ends whatever still runs inside the nodes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.cluster.cluster import Cluster, Node


def deepspeed_launcher() -> str:
    beside = Path(sys.executable).with_name("deepspeed")
    return str(beside) if beside.exists() else "deepspeed"


class Job:
    """One ``deepspeed --hostfile hostfile ...`` launch; stdout and stderr go to ``log``."""

    def __init__(self, cluster: Cluster, args: Sequence[str], log: Path, launcher_args: Sequence[str] = ()):
        self.log = log
        self.cmd = cluster.on_head([deepspeed_launcher(), "--hostfile", str(cluster.hostfile),
                                    *launcher_args, *map(str, args)])
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(self.cmd, cwd=cluster.dir, env=cluster.env(), stdin=subprocess.DEVNULL,
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def wait(self, timeout: float) -> int:
        """The launcher's exit status; past ``timeout`` the job is stopped and AssertionError raised."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"job timed out after {timeout:.0f} s: {' '.join(self.cmd)}\n{self.tail()}") from None

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # the runner's own clean-up: pdsh pkill on each node
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def rank_pids(cluster: Cluster, node: Node, module: str = "ds_seg3d.train") -> dict[int, int]:
    """{global rank: pid} of the ranks running inside ``node`` (and nowhere else on the machine)."""
    ns = cluster.pid_namespace(node)
    found: dict[int, int] = {}
    if ns is None:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != ns:
                continue
        except OSError:
            continue
        cmd = _read(f"/proc/{entry}/cmdline").split(b"\0")
        if module.encode() not in cmd or not any(a.startswith(b"--local_rank=") for a in cmd):
            continue
        env = dict(kv.split(b"=", 1) for kv in _read(f"/proc/{entry}/environ").split(b"\0") if b"=" in kv)
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry)
    return found


def wait_until(what: str, predicate: Callable[[], object], job: Job, timeout: float, poll: float = 0.1) -> object:
    """Poll ``predicate`` while the job runs; fail with the job's log if it ends or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if job.proc.poll() is not None:
            raise AssertionError(f"job ended ({job.proc.returncode}) before {what}:\n{job.tail()}")
        time.sleep(poll)
    job.stop()
    raise AssertionError(f"no {what} within {timeout:.0f} s:\n{job.tail()}")


def process_state(pid: int) -> str:
    """The one-letter state in /proc (``T`` stopped, ``Z`` zombie), or '' once the process is gone."""
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    return stat.rsplit(")", 1)[1].split()[0] if ")" in stat else ""
