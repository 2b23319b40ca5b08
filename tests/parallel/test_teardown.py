"""A rank destroys its process groups before the interpreter is torn down.

Left to interpreter finalization, gloo's worker threads can abort a rank whose work is done
("terminate called without an active exception", SIGABRT), which the launcher reports as a failed
job. ``init_distributed`` registers the teardown with ``atexit``; an exit handler registered before
it runs after it (``atexit`` is last in, first out) and reports what it finds.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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
