"""The progress watchdog ends a process whose main thread stops making progress, and only then.

Each case runs in a child process (the watchdog ends its process with ``os._exit``). The last case
blocks the main thread inside a real gloo all-reduce whose peer is stopped with SIGSTOP: the
situation the watchdog exists for, where no collective timeout fires for 30 minutes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ds_seg3d.parallel import watchdog
from tests.launch import REPO_ROOT, free_port


def _python(code: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=run_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_no_progress_ends_the_process_with_where_it_waited_and_one_clear_line() -> None:
    start = time.monotonic()
    proc = _python("""
        import time
        from ds_seg3d.parallel import watchdog
        def deeper(n):
            if n:
                return deeper(n - 1)
            time.sleep(60)
        watchdog.Watchdog(0.5, rank=3).start()
        deeper(20)
        print("not reached")
    """)
    out, err = proc.communicate(timeout=30)
    elapsed = time.monotonic() - start
    assert proc.returncode == watchdog.EXIT_CODE, err
    lines = err.strip().splitlines()
    assert lines[-1] == watchdog.message(3, 0.5)  # the error is the last line
    assert "rank 3 made no progress for 0.5 s (a peer rank hung or died); aborting" in err
    # above it, the innermost frames of the main thread: the sleep at the bottom of the recursion (the script's
    # 7th line) last, not the script's outermost frame, and not the watchdog's own thread
    assert lines[0] == "rank 3 was waiting in (most recent call last):"
    assert lines[-2] == '  File "<string>", line 7, in deeper', lines
    assert lines[1] == '  File "<string>", line 6, in deeper', lines
    assert "<module>" not in err and "_watch" not in err
    assert out == "" and elapsed < 15


def test_regular_pets_keep_the_process_alive_and_stop_ends_the_thread() -> None:
    proc = _python("""
        import threading, time
        from ds_seg3d.parallel import watchdog
        dog = watchdog.Watchdog(0.5, rank=0).start()
        for _ in range(15):          # 1.5 s of progress, three times the bound
            time.sleep(0.1)
            dog.pet()
        dog.stop()
        time.sleep(1.0)              # twice the bound without pets: no longer watched
        print(threading.active_count())
    """)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.strip() == "1" and "no progress" not in err


def test_zero_bound_disables_and_bad_bounds_are_refused() -> None:
    dog = watchdog.Watchdog(0, rank=0).start()
    assert not dog.enabled and dog._thread is None
    dog.stop()
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="seconds >= 0"):
            watchdog.Watchdog(bad, rank=0)


def test_bound_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(watchdog.ENV, raising=False)
    assert watchdog.default_bound_s() == watchdog.DEFAULT_BOUND_S <= 300
    monkeypatch.setenv(watchdog.ENV, "20")
    assert watchdog.default_bound_s() == 20.0
    dog = watchdog.start(None, rank=0)
    try:
        assert dog.bound_s == 20.0 and dog.enabled
    finally:
        dog.stop()  # a forgotten thread would end this test process 20 s later
    for bad in ("soon", "-5"):
        monkeypatch.setenv(watchdog.ENV, bad)
        with pytest.raises(ValueError, match=watchdog.ENV):
            watchdog.default_bound_s()


RANK = """
    import os, signal, sys, time
    import torch, torch.distributed as dist
    from ds_seg3d.parallel import watchdog
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    dist.all_reduce(torch.ones(4))             # both ranks are up and connected
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)   # hung, sockets open: no error reaches rank 0
    dog = watchdog.Watchdog(1.0, rank=rank).start()
    print("collective", flush=True)
    dist.all_reduce(torch.ones(4))             # rank 0 blocks here in C++
    print("not reached", flush=True)
"""


def test_a_rank_blocked_in_a_gloo_collective_on_a_stopped_peer_is_ended() -> None:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "GLOO_SOCKET_IFNAME": "lo"}
    ranks = [_python(RANK, {**env, "RANK": str(r)}) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while ranks[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        out, err = ranks[0].communicate(timeout=5)
        assert ranks[0].returncode == watchdog.EXIT_CODE, err[-2000:]
        assert out.splitlines() == ["collective"]
        assert err.strip().splitlines()[-1] == watchdog.message(0, 1.0)
        stack = err[err.index("rank 0 was waiting in"):]
        assert "in all_reduce" in stack and "distributed_c10d.py" in stack  # names the collective it hung in
        assert len([line for line in stack.splitlines() if line.lstrip().startswith("File ")]) <= watchdog.STACK_FRAMES
        with open(f"/proc/{ranks[1].pid}/stat") as fh:
            assert fh.read().rsplit(")", 1)[1].split()[0] == "T"  # the peer really was stopped
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.communicate()
