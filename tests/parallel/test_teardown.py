"""A rank destroys its process groups before the interpreter is torn down, and skips finalization.

Left to interpreter finalization, gloo's worker threads can abort a rank whose work is done
("terminate called without an active exception", SIGABRT), which the launcher reports as a failed
job. ``init_distributed`` registers the teardown with ``atexit``; an exit handler registered before
it runs after it (``atexit`` is last in, first out) and reports what it finds. ``exit_rank``, which
ends the launched entry points, runs those handlers, flushes, and never finalizes the interpreter.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import atexit
    import torch
    import torch.distributed as dist

    atexit.register(lambda: print("after teardown: initialized", dist.is_initialized(), flush=True))

    from ds_seg3d.parallel.engines import init_distributed

    init_distributed()
    t = torch.ones(3)
    dist.all_reduce(t)
    print("during run: initialized", dist.is_initialized(), "sum", float(t.sum()), flush=True)
""")


def test_process_group_is_destroyed_at_exit(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "during run: initialized True sum 3.0" in lines, proc.stdout
    assert "after teardown: initialized False" in lines, proc.stdout
    assert "terminate called" not in proc.stderr


EXIT_SCRIPT = textwrap.dedent("""
    import atexit
    import sys

    def last_handler():  # registered before anything imports logging, so it runs after logging's flush
        import torch.distributed as dist
        sys.stdout.write(f"at exit: initialized {dist.is_initialized()}")  # no newline: still buffered

    atexit.register(last_handler)

    import torch
    import torch.distributed as dist

    from ds_seg3d.parallel.engines import init_distributed
    from ds_seg3d.parallel.teardown import exit_rank

    class Finalized:
        def __del__(self):
            print("finalized", flush=True)

    kept = Finalized()  # a module global: only interpreter finalization would delete it
    init_distributed()
    dist.all_reduce(torch.ones(1))
    sys.stderr.write("unflushed err")
    exit_rank(int(sys.argv[1]) if len(sys.argv) > 1 else None)
    print("after exit_rank", flush=True)
""")


@pytest.mark.parametrize(("arg", "code"), [((), 0), (("7",), 7)])
def test_exit_rank_runs_exit_handlers_flushes_and_skips_finalization(tmp_path, arg, code) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.pop("PYTHONUNBUFFERED", None)  # stdout to a pipe is then block-buffered: exit_rank must flush it
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, *arg], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
    # the first-registered exit handler ran last, after the teardown had destroyed the process groups,
    # and what it wrote was flushed
    assert proc.stdout.endswith("at exit: initialized False"), proc.stdout[-2000:]
    assert proc.stderr.endswith("unflushed err"), proc.stderr[-2000:]
    assert "finalized" not in proc.stdout and "after exit_rank" not in proc.stdout
