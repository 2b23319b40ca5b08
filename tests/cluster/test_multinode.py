"""The multi-node path for real, on two simulated nodes (``tests/cluster/cluster.py``).

``deepspeed --hostfile hostfile --module ds_seg3d.train`` runs from node1 with ``node1 slots=2`` and
``node2 slots=2``: the runner's ssh check, ``hostname -I`` for the master address, pdsh starting one
launcher per node, gloo across the veth pair. Stage 0 lives on node1 and stage 1 on node2, so every
pipeline send crosses the nodes; ZeRO-1 reduces within each node's stage.

A reference run trains uninterrupted. A second run folder then goes through a killed rank, a killed
node, a hung (SIGSTOPped) rank and a SIGTERM to one node's launcher (a preemption: every rank saves),
each launch resuming from what the failure before it left; each failure must end the job non-zero
within 60 s. A last ``--resume``, with a half-written checkpoint
lying beyond ``latest``, must finish the run with exactly the reference run's losses. The failure
tests share that folder and run in file order.

Needs root (network namespaces), sshd and pdsh (``make cluster-deps``).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest

from ds_seg3d import checkpoint as ckpt
from ds_seg3d.parallel import watchdog
from ds_seg3d.training.run_log import read_metrics
from tests.cluster import cluster as simcluster
from tests.cluster.jobs import Job, process_state, rank_pids, wait_until
from tests.launch import REPO_ROOT

pytestmark = pytest.mark.multinode

STEPS, EVERY = 24, 2
JOB_TIMEOUT = 480.0     # one launch; most of it is start-up of 4 ranks on a small, shared machine
FAIL_WITHIN = 60.0      # a failure must end the job this fast
WATCHDOG_S = 15
# DeepSpeed's launcher gives a rank 30 s to obey SIGTERM before SIGKILL, and a stopped rank cannot
# obey: the node holding the hung rank ends about 30 s after the watchdog fired on its peers.
HANG_WITHIN = WATCHDOG_S + 30.0 + 30.0
EXPERIMENT = f"""
[data]
patch = [32, 32, 16]
oversample_foreground = 0.5
[model]
name = "unet3d"
params = {{ levels = 3, base_width = 4, max_width = 16, convs_per_level = 1 }}
[train]
stages = 2
val_every = 0
val_max_cases = 1
checkpoint_every = {EVERY}
log_every = 1
"""
_names = itertools.count()


class SimCluster:
    """A started cluster plus the jobs launched on it, all stopped at teardown whatever happened."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.c = simcluster.up(folder, name=f"dss{os.getpid()}n{next(_names)}")
        self.jobs: list[Job] = []

    def launch(self, args: list[str], log: Path, launcher_args: Sequence[str] = ()) -> Job:
        job = Job(self.c, args, log, launcher_args)
        self.jobs.append(job)
        return job

    def close(self) -> None:
        for job in self.jobs:
            job.stop()
        simcluster.down(self.folder)


def _start(tmp_path_factory: pytest.TempPathFactory) -> SimCluster:
    if os.geteuid() != 0:
        pytest.skip("the simulated cluster needs root (network and PID namespaces)")
    return SimCluster(tmp_path_factory.mktemp("cluster"))


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimCluster]:
    sim = _start(tmp_path_factory)
    try:
        yield sim
    finally:
        sim.close()


@pytest.fixture(scope="module")
def setup(kidney_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("multinode")
    (tmp / "exp.toml").write_text(EXPERIMENT)
    cfg = json.loads((REPO_ROOT / "ds_configs" / "pipeline_zero1_cpu_fp32.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 3e-3
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 3e-3, "warmup_max_lr": 3e-3,
                                                         "warmup_num_steps": 1}}
    (tmp / "ds.json").write_text(json.dumps(cfg))
    return {"tmp": tmp, "shards": kidney_shards, "failing": tmp / "failing"}


def _train_args(setup: dict, run: Path) -> list[str]:
    return ["--module", "ds_seg3d.train", "--data", str(setup["shards"]), "--out", str(run),
            "--config", str(setup["tmp"] / "exp.toml"), "--deepspeed_config", str(setup["tmp"] / "ds.json"),
            "--steps", str(STEPS)]


@pytest.fixture(scope="module")
def reference(setup: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run; the master address comes from ``hostname -I`` on node1, as by default."""
    sim = _start(tmp_path_factory)
    try:
        run = setup["tmp"] / "reference"
        job = sim.launch(_train_args(setup, run), setup["tmp"] / "reference.log")
        code = job.wait(JOB_TIMEOUT)
        return {"run": run, "code": code, "log": job.text(), "addr": sim.c.head.addr,
                "seconds": time.monotonic() - job.started}
    finally:
        sim.close()


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _step(tag: str | None) -> int:
    """The step a checkpoint tag was saved at (0 for none)."""
    return int(tag.removeprefix(ckpt.step_tag(0).rstrip("0"))) if tag else 0


def _tag_files(run: Path, tag: str) -> set[str]:
    return {p.name for p in (ckpt.checkpoint_root(run) / tag).iterdir()}


def test_cluster_nodes_are_separate_hosts_and_down_is_clean(cluster: SimCluster) -> None:
    """Each node has its own name and address, and its processes see none of the machine's."""
    c = cluster.c
    marker = f"ds-seg3d-cluster-probe-{os.getpid()}"
    outside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", marker])  # someone else's
    pattern = marker.replace("probe", "[p]robe")  # matches the marker, not the remote shell running pkill
    try:
        for node in c.nodes:
            r = subprocess.run(c.on_head([str(c.bin / "ssh"), node.name, f"hostname; hostname -I; pkill -f '{pattern}'; "
                                          "echo $?"]), capture_output=True, text=True, timeout=30)
            name, addr, pkill_rc = r.stdout.split()
            assert (name, addr, pkill_rc) == (node.name, node.addr, "1"), r  # pkill found nothing to kill
        assert outside.poll() is None, "a pkill inside a node reached a process outside it"
    finally:
        outside.kill()
        outside.wait()
    assert simcluster.down(cluster.folder) and not simcluster.down(cluster.folder)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n.netns in netns for n in c.nodes)
    assert not any(simcluster.node_running(c, n) for n in c.nodes)


def test_train_across_two_nodes(reference: dict) -> None:
    run, log = reference["run"], reference["log"]
    assert reference["code"] == 0, log[-4000:]
    assert f"Using IP address of {reference['addr']} for node node1" in log  # `hostname -I` over ssh
    for node in ("node1", "node2"):  # one launcher per node, two ranks each
        assert sum(f"{node}: " in line and "spawned with command" in line for line in log.splitlines()) == 2
    losses = _losses(read_metrics(run))
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)])
    assert last < first, f"loss did not fall: {losses}"
    assert ckpt.latest_tag(run) == ckpt.step_tag(STEPS)
    names = _tag_files(run, ckpt.step_tag(STEPS))
    assert {f"layer_{i:02d}-model_states.pt" for i in range(6)} <= names
    assert {f"zero_pp_rank_{d}_mp_rank_{s:02d}_optim_states.pt" for d in (0, 1) for s in (0, 1)} <= names


def test_predict_from_the_multinode_checkpoint_on_one_process(reference: dict, setup: dict) -> None:
    assert reference["code"] == 0
    manifest = json.loads((setup["shards"] / "manifest.json").read_text())
    image = Path(manifest["cases"][manifest["splits"]["test"][0]]["image"])
    out = setup["tmp"] / "predicted"
    r = subprocess.run([sys.executable, "-m", "ds_seg3d", "predict", "--checkpoint", str(reference["run"]),
                        "--out", str(out), "--overlap", "0", str(image)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    pred, src = nib.load(out / image.name), nib.load(image)
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}
    assert (out / "volumes.csv").read_text().splitlines()[0] == "case,kidney_ml"


def _launch_failing(cluster: SimCluster, setup: dict, name: str, extra: Sequence[str] = ()) -> tuple[Job, int]:
    """Start (or resume) the shared failing run; returns the job and the step it starts after."""
    run = setup["failing"]
    start = _step(ckpt.latest_tag(run))
    args = _train_args(setup, run) + (["--resume"] if start else []) + list(extra)
    job = cluster.launch(args, setup["tmp"] / f"{name}.log", ["--master_addr", cluster.c.head.addr])
    return job, start


def _wait_for_new_checkpoint(job: Job, run: Path, start: int) -> int:
    """Block until this launch has saved a checkpoint of its own; returns its step."""
    return wait_until("a new checkpoint", lambda: _step(ckpt.latest_tag(run)) >= start + EVERY and
                      _step(ckpt.latest_tag(run)), job, JOB_TIMEOUT)


def _ranks_on(cluster: SimCluster, job: Job) -> dict[str, dict[int, int]]:
    """{node: {rank: pid}} once both ranks of every node run."""
    def both(n: simcluster.Node) -> dict[int, int]:
        found = rank_pids(cluster.c, n)
        return found if len(found) == 2 else {}
    return {n.name: wait_until(f"both ranks on {n.name}", lambda n=n: both(n), job, JOB_TIMEOUT)
            for n in cluster.c.nodes}


def _assert_fails_fast(job: Job, t0: float, within: float = FAIL_WITHIN) -> float:
    code = job.wait(within + 30)
    elapsed = time.monotonic() - t0
    assert code != 0, job.tail()
    assert elapsed < within, f"the job took {elapsed:.1f} s to end:\n{job.tail()}"
    return elapsed


def _assert_resumed_after(run: Path, seen: int, start: int) -> None:
    """The launch's first step is the one after the last complete checkpoint it found."""
    new = [r for r in read_metrics(run)[seen:] if r["kind"] == "train"]
    assert new and new[0]["step"] == start + 1, (start, new[:2])


def test_a_killed_rank_ends_the_job_fast(cluster: SimCluster, setup: dict) -> None:
    """The ranks see the closed connections of the killed one and end. Once in many runs node2's two ranks
    saw none within 90 s (cause not found); the watchdog, which the job always runs, is the backstop for
    that, here at 15 s instead of the default 5 min, and its stack (where they waited) is reported."""
    run = setup["failing"]
    seen = len(read_metrics(run))
    job, start = _launch_failing(cluster, setup, "killed_rank", ["--watchdog-s", str(WATCHDOG_S)])
    ranks = _ranks_on(cluster, job)
    saved = _wait_for_new_checkpoint(job, run, start)
    victim = ranks["node1"][1]  # stage 0 on the head node, next to the launcher that pdsh started there
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    elapsed = _assert_fails_fast(job, t0)
    print(f"killed rank: job ended {elapsed:.1f} s after SIGKILL")
    if "made no progress" in job.text():
        warnings.warn(f"killed rank: the watchdog ended ranks that saw no closed connection:\n{job.tail()}")
    if start:
        _assert_resumed_after(run, seen, start)
    assert _step(ckpt.latest_tag(run)) >= saved
    assert all(not rank_pids(cluster.c, n) for n in cluster.c.nodes)


def test_a_killed_node_ends_the_job_fast(cluster: SimCluster, setup: dict) -> None:
    run = setup["failing"]
    seen = len(read_metrics(run))
    job, start = _launch_failing(cluster, setup, "killed_node")
    _ranks_on(cluster, job)
    saved = _wait_for_new_checkpoint(job, run, start)
    node2 = cluster.c.nodes[1]
    t0 = time.monotonic()
    simcluster.kill_node(cluster.c, node2)  # sshd (PID 1 there), its sessions, launcher and ranks
    elapsed = _assert_fails_fast(job, t0)
    print(f"killed node: job ended {elapsed:.1f} s after the node went down")
    assert "node2: ssh exited with exit code 255" in job.text()  # pdsh lost the node's session
    if start:
        _assert_resumed_after(run, seen, start)
    assert _step(ckpt.latest_tag(run)) >= saved
    assert not rank_pids(cluster.c, cluster.c.head)


def test_a_hung_rank_is_ended_by_the_watchdog(cluster: SimCluster, setup: dict) -> None:
    run = setup["failing"]
    seen = len(read_metrics(run))
    job, start = _launch_failing(cluster, setup, "hung_rank", ["--watchdog-s", str(WATCHDOG_S)])
    ranks = _ranks_on(cluster, job)
    _wait_for_new_checkpoint(job, run, start)
    victim = ranks["node2"][2]  # stage 1 on the far node: its peers wait on it in p2p and all-reduce
    t0 = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    try:
        elapsed = _assert_fails_fast(job, t0, HANG_WITHIN)
    finally:
        if process_state(victim) == "T":
            os.kill(victim, signal.SIGKILL)
    print(f"hung rank: job ended {elapsed:.1f} s after SIGSTOP (watchdog {WATCHDOG_S} s)")
    assert elapsed >= WATCHDOG_S, "ended before the watchdog bound: not by the watchdog"
    text = job.text()
    fired = [line for line in text.splitlines() if "made no progress" in line]
    assert fired, job.tail()
    assert any(line.endswith(watchdog.message(r, WATCHDOG_S)) for line in fired for r in (0, 1, 3)), fired
    if start:
        _assert_resumed_after(run, seen, start)
    assert all(not rank_pids(cluster.c, n) for n in cluster.c.nodes)


def test_sigterm_to_one_nodes_launcher_saves_on_every_rank(cluster: SimCluster, setup: dict) -> None:
    """Node2's launcher forwards SIGTERM to its two ranks; all four agree to stop after the same step, save
    it together (manifest, then ``latest``) and end; the resume below continues from that checkpoint."""
    run = setup["failing"]
    seen = len(read_metrics(run))
    job, start = _launch_failing(cluster, setup, "preempted")
    ranks = _ranks_on(cluster, job)
    _wait_for_new_checkpoint(job, run, start)
    launcher = psutil.Process(ranks["node2"][2]).parent()
    assert "deepspeed.launcher.launch" in " ".join(launcher.cmdline())
    t0 = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    elapsed = _assert_fails_fast(job, t0)
    print(f"preempted: job ended {elapsed:.1f} s after SIGTERM to node2's launcher")
    lines = [line for line in job.text().splitlines() if "preempted: SIGTERM on rank" in line]
    assert len(lines) == 1, job.tail()
    step = int(lines[0].split("stopped after step ")[1].split()[0])
    assert f"saved checkpoint {ckpt.step_tag(step)}" in lines[0]
    assert ckpt.latest_tag(run) == ckpt.step_tag(step) and ckpt.damage(run, ckpt.step_tag(step)) is None
    assert max(r["step"] for r in read_metrics(run)[seen:] if r["kind"] == "train") == step
    if start:
        _assert_resumed_after(run, seen, start)
    assert all(not rank_pids(cluster.c, n) for n in cluster.c.nodes)


def test_resume_after_the_failures_skips_a_partial_checkpoint_and_matches(
        cluster: SimCluster, setup: dict, reference: dict) -> None:
    run = setup["failing"]
    latest = ckpt.latest_tag(run)
    assert latest is not None, "the failure tests above left no complete checkpoint"
    start = _step(latest)
    assert start < STEPS, "the failures came too late to leave work for the resume"
    # A save that died half-way: a tag folder beyond `latest` with some files, one cut short.
    beyond = (start // EVERY + 1) * EVERY  # the next periodic checkpoint (a preemption saves at any step)
    partial = ckpt.checkpoint_root(run) / ckpt.step_tag(beyond)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for i in range(3):
        src = ckpt.checkpoint_root(reference["run"]) / ckpt.step_tag(beyond) / f"layer_{i:02d}-model_states.pt"
        data = src.read_bytes()
        (partial / src.name).write_bytes(data if i else data[: len(data) // 2])
    assert ckpt.latest_tag(run) == latest

    seen = len(read_metrics(run))
    job, _ = _launch_failing(cluster, setup, "resume")
    assert job.wait(JOB_TIMEOUT) == 0, job.tail()
    _assert_resumed_after(run, seen, start)
    assert ckpt.latest_tag(run) == ckpt.step_tag(STEPS)
    want = _losses(read_metrics(reference["run"]))
    records = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert {r["step"] for r in records} == set(range(1, STEPS + 1))
    for r in records:  # every launch, killed or not, followed the uninterrupted run's trajectory
        assert r["loss"] == pytest.approx(want[r["step"]], rel=1e-5, abs=1e-6), (r, want[r["step"]])
    # The half-written folder was saved over when the run reached that step again.
    assert _tag_files(run, partial.name) == _tag_files(reference["run"], partial.name)
