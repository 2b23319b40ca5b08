"""The shipped example hostfile is one DeepSpeed's own launcher parses."""
from __future__ import annotations

from deepspeed.launcher.runner import fetch_hostfile

from tests.launch import REPO_ROOT


def test_hostfile_parses_with_deepspeed() -> None:
    hosts = fetch_hostfile(str(REPO_ROOT / "hostfile"))
    assert hosts is not None and len(hosts) >= 2
    assert all(isinstance(slots, int) and slots >= 1 for slots in hosts.values())
