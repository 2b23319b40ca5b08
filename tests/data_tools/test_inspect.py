"""inspect / verify on real shard folders, each damaged in one way; the CLI exit code tells good from bad."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from data_tools.build_shards import build_shards
from data_tools.inspect_shards import case_table, verify
from data_tools.phantoms import write_msd_dataset
from ds_seg3d.data import shard_format as sf

REPO = Path(__file__).resolve().parents[2]


def cli(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "data_tools", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("inspect")
    src = write_msd_dataset(tmp / "msd", "kidney", 4, 3, (32, 32, 16))
    return build_shards(src, tmp / "out", cases_per_shard=2, workers=1).parent


@pytest.fixture
def folder(pristine: Path, tmp_path: Path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "shards"))


def manifest(folder: Path) -> dict[str, Any]:
    return sf.load_manifest(folder)


def save_manifest(folder: Path, m: dict[str, Any], resum: bool = True) -> None:
    """Rewrite the manifest; with ``resum`` the shard checksums follow the files, isolating other checks."""
    if resum:
        for s in m["shards"]:
            s["sha256"], s["bytes"] = sf.sha256_file(folder / s["file"]), (folder / s["file"]).stat().st_size
    sf.write_manifest(folder, {k: v for k, v in m.items() if k != "schema_version"})


def h5py_file(path: Path) -> h5py.File:
    return h5py.File(path, "r+")


def first_case(folder: Path) -> tuple[str, Path]:
    m = manifest(folder)
    cid = m["shards"][0]["cases"][0]
    return cid, folder / m["cases"][cid]["shard"]


def test_clean_folder_passes_and_prints_the_table(folder: Path) -> None:
    assert verify(folder) == []
    proc = cli("inspect", folder)
    assert proc.returncode == 0, proc.stderr
    m = manifest(folder)
    for cid, e in m["cases"].items():
        row = next(line for line in proc.stdout.splitlines() if line.startswith(cid))
        assert e["shard"] in row and f"{e['volume_ml']['kidney']:.2f}" in row
    assert "kidney (mL)" in case_table(m).splitlines()[0]


def test_changed_shard_fails_its_checksum(folder: Path) -> None:
    cid, shard = first_case(folder)
    with h5py_file(shard) as f:
        image = sf.case_group(f, cid)[sf.IMAGE]
        image[0, 0, 0] = image[0, 0, 0] + 1.0  # a silent change, still a valid shard
    proc = cli("inspect", folder)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines and all(shard.name in line for line in lines), proc.stderr
    assert any("sha256" in line for line in lines)


def test_label_value_outside_the_declared_labels(folder: Path) -> None:
    cid, shard = first_case(folder)
    with h5py_file(shard) as f:
        label = sf.case_group(f, cid)[sf.LABEL]
        data = label[()]
        x, y, z = np.argwhere(data == 0)[0]
        label[x, y, z] = 9
    save_manifest(folder, manifest(folder))
    problems = verify(folder)
    assert len(problems) == 1 and cid in problems[0] and "[9]" in problems[0], problems


def test_case_missing_from_its_shard_and_stray_case(folder: Path) -> None:
    cid, shard = first_case(folder)
    m = manifest(folder)
    with h5py_file(shard) as f:
        f.copy(sf.case_group(f, cid), f[sf.CASES], name="stray")
        del f[sf.CASES][cid]
    save_manifest(folder, m)
    problems = verify(folder)
    assert any(cid in p and "missing from the shard" in p for p in problems), problems
    assert any(p.startswith("stray") and "not in manifest.json" in p for p in problems), problems
    assert len(problems) == 2


def test_case_listed_but_shard_file_missing(folder: Path) -> None:
    m = manifest(folder)
    gone = folder / m["shards"][1]["file"]
    gone.unlink()
    problems = verify(folder)
    assert problems == [f"{gone}: shard file missing"]


def test_shape_that_disagrees_with_the_manifest(folder: Path) -> None:
    cid, _ = first_case(folder)
    m = manifest(folder)
    m["cases"][cid]["shape"][0] += 1
    save_manifest(folder, m)
    problems = verify(folder)
    assert len(problems) == 1 and cid in problems[0] and "shape" in problems[0]


def test_non_finite_image_and_foreground_off_its_label(folder: Path) -> None:
    cid, shard = first_case(folder)
    with h5py_file(shard) as f:
        g = sf.case_group(f, cid)
        g[sf.IMAGE][1, 1, 1] = np.nan
        coords = g[sf.FOREGROUND]["1"][()]
        label = g[sf.LABEL][()]
        bg = np.argwhere(label == 0)[:2]
        out_of_bounds = np.array([label.shape], dtype=np.int32)
        del g[sf.FOREGROUND]["1"]
        g[sf.FOREGROUND]["1"] = np.concatenate([coords, bg, out_of_bounds]).astype(np.int32)
    save_manifest(folder, manifest(folder))
    problems = [p for p in verify(folder) if cid in p]
    assert any("1 non-finite" in p for p in problems), problems
    assert any("1 coordinates outside" in p for p in problems), problems
    assert any("2 coordinates not on voxels of label 1" in p for p in problems), problems


def test_schema_version_of_a_shard(folder: Path) -> None:
    _, shard = first_case(folder)
    with h5py_file(shard) as f:
        f.attrs["schema_version"] = sf.SCHEMA_VERSION + 1
    save_manifest(folder, manifest(folder))
    problems = verify(folder)
    assert len(problems) == 1 and str(shard) in problems[0] and "schema version" in problems[0]


def test_splits_naming_unknown_or_shared_cases(folder: Path) -> None:
    m = manifest(folder)
    m["splits"]["val"] = m["splits"]["val"] + ["ghost"] + m["splits"]["train"][:1]
    save_manifest(folder, m)
    problems = verify(folder)
    assert any("ghost" in p for p in problems) and any("'train' and 'val'" in p for p in problems)


def test_left_over_shard_is_reported(folder: Path) -> None:
    (folder / sf.SHARD_PATTERN.format(9)).write_bytes(b"")
    problems = verify(folder)
    assert len(problems) == 1 and sf.SHARD_PATTERN.format(9) in problems[0]


def test_folder_without_manifest_is_one_line_error(tmp_path: Path) -> None:
    proc = cli("inspect", tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / sf.MANIFEST_NAME) in lines[0] and lines[0].startswith("error: ")
