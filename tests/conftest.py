"""Shared fixtures: a small phantom dataset built into real shards once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # plain `pytest` as well as `python -m pytest`
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def kidney_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 small kidney phantoms (about 64x64x32) -> shards at 1.5 x 1.5 x 3 mm; splits 4/2/2."""
    from data_tools.build_shards import build_shards
    from data_tools.phantoms import write_msd_dataset

    root = tmp_path_factory.mktemp("kidney")
    src = write_msd_dataset(root / "phantoms", "kidney", 8, seed=3, shape=(64, 64, 32))
    build_shards(src, root / "shards", spacing=(1.5, 1.5, 3.0), workers=1, seed=0,
                 val_fraction=0.25, test_fraction=0.25)
    return root / "shards"
