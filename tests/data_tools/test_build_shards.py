"""build-shards end to end on real NIfTI files: phantoms and the real CT, good input and bad."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_tools.build_shards import build_shards
from data_tools.fingerprint import median_spacing
from data_tools.inspect_shards import verify
from data_tools.layouts import detect_layout
from data_tools.phantoms import write_msd_dataset
from data_tools.splits import make_splits
from ds_seg3d.data import shard_format as sf
from ds_seg3d.data.errors import DataError
from ds_seg3d.paths import SAMPLE_CT

REPO = Path(__file__).resolve().parents[2]
REAL = SAMPLE_CT
SHAPE = (32, 32, 16)
# TotalSegmentator numbering of the structures the real-CT tests use.
STRUCTURES = {"kidney_right": 2, "kidney_left": 3, "iliopsoas_left": 88, "iliopsoas_right": 89}


def cli(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "data_tools", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, names: object) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and str(names) in lines[0], lines[0]


def phantoms(tmp: Path, name: str, cases: int, task: str = "kidney", seed: int = 0) -> Path:
    return write_msd_dataset(tmp / name, task, cases, seed, SHAPE)


def source_volume_ml(label_path: Path, values: list[int]) -> tuple[int, float]:
    """Voxel count and volume of some source label values, straight from the NIfTI file."""
    img = nib.load(str(label_path))
    n = int(np.isin(np.asarray(img.dataobj), values).sum())
    return n, n * abs(np.linalg.det(img.affine[:3, :3])) / 1000.0


def own_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("built")
    src = phantoms(tmp, "msd", 5)
    return src, build_shards(src, tmp / "out", cases_per_shard=2, workers=1, seed=4).parent


def test_manifest_is_complete(built: tuple[Path, Path]) -> None:
    src, out = built
    m = sf.load_manifest(out)
    source = detect_layout(src)
    ids = sorted(c.case_id for c in source.cases)
    assert m["name"] == source.name and m["source_layout"] == "msd" and m["modality"] == "CT"
    assert m["labels"] == {"background": 0, "kidney": 1}
    assert m["codec"] == sf.DEFAULT_CODEC and m["chunk"] == sf.DEFAULT_CHUNK
    assert m["target_spacing"] == pytest.approx(median_spacing(source.cases))
    norm, fp = m["normalisation"], m["dataset_fingerprint"]
    assert norm["modality"] == "CT" and norm["method"] == "dataset"
    assert norm["clip_low"] == fp["foreground_intensity"]["percentile_00_5"] < norm["clip_high"]
    assert fp["cases"] == sorted(set(ids) - set(m["splits"]["test"]))
    assert sorted(m["cases"]) == ids and m["fingerprint"]["cases"] == ids
    assert [len(s["cases"]) for s in m["shards"]] == [2, 2, 1]
    assert sorted(c for s in m["shards"] for c in s["cases"]) == ids
    for s in m["shards"]:
        assert s["sha256"] == sf.sha256_file(out / s["file"]) and s["bytes"] == (out / s["file"]).stat().st_size
    spec = {c.case_id: c for c in source.cases}
    for cid, e in m["cases"].items():
        assert {"shard", "shape", "spacing", "original_shape", "original_spacing", "original_axcodes", "voxels",
                "volume_ml", "image", "label"} <= set(e)
        assert cid in next(s for s in m["shards"] if s["file"] == e["shard"])["cases"]
        assert e["spacing"] == pytest.approx(m["target_spacing"])
        n, ml = source_volume_ml(spec[cid].label, [1])
        assert e["voxels"]["kidney"] == n > 0 and e["volume_ml"]["kidney"] == pytest.approx(ml, rel=1e-9)
        assert e["original_shape"] == list(nib.load(str(spec[cid].image)).shape)
        with sf.open_shard(out / e["shard"]) as f:
            g = sf.case_group(f, cid)
            assert list(g[sf.IMAGE].shape) == e["shape"] == list(g[sf.LABEL].shape)
            assert set(np.unique(g[sf.LABEL][()])) <= {0, 1}
    assert verify(out) == []
    assert not [p for p in own_files(out) if p.endswith(".tmp")]


def test_splits_are_disjoint_covering_and_seeded(built: tuple[Path, Path]) -> None:
    _, out = built
    m = sf.load_manifest(out)
    s = m["splits"]
    parts = [set(s["train"]), set(s["val"]), set(s["test"])]
    assert sum(len(p) for p in parts) == len(m["cases"]) and set().union(*parts) == set(m["cases"])
    assert all(parts)
    assert s == make_splits(list(m["cases"]), seed=4, val_fraction=0.2, test_fraction=0.2)


def test_rebuild_in_place_reproduces_the_dataset(built: tuple[Path, Path], tmp_path: Path) -> None:
    src, first = built
    out = tmp_path / "again"
    shutil.copytree(first, out)
    (out / sf.SHARD_PATTERN.format(77)).write_bytes(b"left over")  # a stale shard of this tool
    build_shards(src, out, cases_per_shard=2, workers=2, seed=4)
    a, b = sf.load_manifest(first), sf.load_manifest(out)
    assert a["splits"] == b["splits"] and a["cases"] == b["cases"]
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]  # workers change nothing
    assert sf.SHARD_PATTERN.format(77) not in own_files(out)


def test_twenty_cases_with_two_workers_through_the_cli(tmp_path: Path) -> None:
    src = phantoms(tmp_path, "msd20", 20, task="psoas", seed=1)
    proc = cli("build-shards", src, tmp_path / "out", "--workers", 2, "--cases-per-shard", 8, "--folds", 4,
               "--test-fraction", 0.1, "--codec", "zstd", "--chunk", 16)
    assert proc.returncode == 0, proc.stderr
    m = sf.load_manifest(tmp_path / "out")
    assert len(m["cases"]) == 20 and [len(s["cases"]) for s in m["shards"]] == [8, 8, 4]
    assert m["codec"] == "zstd" and m["chunk"] == 16 and m["labels"] == {"background": 0, "psoas": 1}
    s = m["splits"]
    assert s["method"] == "kfold" and len(s["folds"]) == 4 and len(s["test"]) == 2
    vals = [c for f in s["folds"] for c in f["val"]]
    assert sorted(vals + s["test"]) == sorted(m["cases"])
    with sf.open_shard(tmp_path / "out" / m["shards"][0]["file"]) as f:
        assert max(sf.case_group(f, m["shards"][0]["cases"][0])[sf.IMAGE].chunks) <= 16
    assert cli("inspect", tmp_path / "out").returncode == 0


def _real_label_spec() -> str:
    return "kidney=2,3;psoas=88,89"


def test_real_ct_from_csv_volumes_match_the_source(tmp_path: Path) -> None:
    csv = tmp_path / "cases.csv"
    csv.write_text(f"case_id,image,label\nct01,{REAL / 'example_ct_sm.nii.gz'},{REAL / 'example_seg.nii.gz'}\n")
    proc = cli("build-shards", csv, tmp_path / "out", "--labels", _real_label_spec(), "--margin-mm", 5)
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "too small" in proc.stderr  # one case: all in train, and said so
    m = sf.load_manifest(tmp_path / "out")
    assert m["labels"] == {"background": 0, "kidney": 1, "psoas": 2} and m["source_layout"] == "csv"
    assert m["splits"]["train"] == ["ct01"] and "note" in m["splits"]
    e = m["cases"]["ct01"]
    for name, values in (("kidney", [2, 3]), ("psoas", [88, 89])):
        n, ml = source_volume_ml(REAL / "example_seg.nii.gz", values)
        assert e["voxels"][name] == n > 0
        assert e["volume_ml"][name] == pytest.approx(ml, rel=1e-9)
    assert e["original_axcodes"] == "".join(nib.aff2axcodes(nib.load(str(REAL / "example_ct_sm.nii.gz")).affine))
    assert verify(tmp_path / "out") == []


def _totalseg_folder(root: Path) -> Path:
    """The real CT as a TotalSegmentator case: ct.nii.gz + one binary mask per structure."""
    case = root / "ts" / "ct01"
    (case / "segmentations").mkdir(parents=True)
    shutil.copy(REAL / "example_ct_sm.nii.gz", case / "ct.nii.gz")
    seg = nib.load(str(REAL / "example_seg.nii.gz"))
    values = np.asarray(seg.dataobj)
    for name, v in {**STRUCTURES, "spleen": 1}.items():  # spleen: present but not asked for
        nib.save(nib.Nifti1Image((values == v).astype(np.uint8), seg.affine, seg.header),
                 case / "segmentations" / f"{name}.nii.gz")
    return root / "ts"


def test_real_ct_as_totalsegmentator_folder_gives_the_same_volumes(tmp_path: Path) -> None:
    csv = tmp_path / "cases.csv"
    csv.write_text(f"case_id,image,label\nct01,{REAL / 'example_ct_sm.nii.gz'},{REAL / 'example_seg.nii.gz'}\n")
    by_csv = build_shards(csv, tmp_path / "csv_out", labels=_real_label_spec(), workers=1).parent
    src = _totalseg_folder(tmp_path)
    by_ts = build_shards(src, tmp_path / "ts_out", workers=1,
                         labels="kidney=kidney_right,kidney_left;psoas=iliopsoas_left,iliopsoas_right").parent
    a, b = sf.load_manifest(by_csv)["cases"]["ct01"], sf.load_manifest(by_ts)["cases"]["ct01"]
    assert sf.load_manifest(by_ts)["source_layout"] == "totalseg"
    assert b["label"] is None and set(b["label_parts"]) == {*STRUCTURES, "spleen"}
    assert a["voxels"] == b["voxels"] and a["volume_ml"] == pytest.approx(b["volume_ml"], rel=1e-12)
    assert a["shape"] == b["shape"]
    with sf.open_shard(by_csv / a["shard"]) as fa, sf.open_shard(by_ts / b["shard"]) as fb:
        la, lb = sf.case_group(fa, "ct01")[sf.LABEL][()], sf.case_group(fb, "ct01")[sf.LABEL][()]
        assert np.array_equal(la, lb) and set(np.unique(la)) == {0, 1, 2}


# ---- bad input: one line naming the file, exit status 2, nothing half-written --------------------------

def test_case_listed_but_missing(tmp_path: Path) -> None:
    src = phantoms(tmp_path, "msd", 3)
    missing = src / "labelsTr" / "kidney_001.nii.gz"
    missing.unlink()
    proc = cli("build-shards", src, tmp_path / "out")
    assert_one_line_error(proc, missing)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="kidney_001"):
        build_shards(src, tmp_path / "out")


def test_output_folder_holding_a_different_dataset(built: tuple[Path, Path], tmp_path: Path) -> None:
    src, first = built
    out = tmp_path / "out"
    shutil.copytree(first, out)
    before = (out / sf.MANIFEST_NAME).read_text()
    other = phantoms(tmp_path, "psoas", 3, task="psoas")
    assert_one_line_error(cli("build-shards", other, out), out)
    proc = cli("build-shards", src, out, "--cases-per-shard", 2, "--seed", 4, "--codec", "gzip")
    assert_one_line_error(proc, out)
    assert "codec" in proc.stderr  # same cases, other options: says which
    assert (out / sf.MANIFEST_NAME).read_text() == before and verify(out) == []

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert_one_line_error(cli("build-shards", src, foreign), foreign)
    assert own_files(foreign) == ["notes.txt"]


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_rebuild_leaves_no_manifest_and_no_partial_shard(tmp_path: Path, workers: int) -> None:
    src = phantoms(tmp_path, "msd", 6)
    out = tmp_path / "out"
    args = ("build-shards", src, out, "--cases-per-shard", 2, "--workers", workers)
    assert cli(*args).returncode == 0 and (out / sf.MANIFEST_NAME).exists()
    bad = src / "imagesTr" / "kidney_003.nii.gz"  # in the middle: two shards are complete by then
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # the header still reads, the voxels do not
    assert_one_line_error(cli(*args), bad)
    assert own_files(out) == []  # no manifest, no *.tmp, no complete-looking shard


def test_label_value_outside_the_declared_labels(tmp_path: Path) -> None:
    src = phantoms(tmp_path, "msd", 3)
    path = src / "labelsTr" / "kidney_002.nii.gz"
    img = nib.load(str(path))
    label = np.asarray(img.dataobj).copy()
    label[0, 0, 0] = 7  # dataset.json declares 0 and 1 only
    nib.save(nib.Nifti1Image(label, img.affine, img.header), path)
    proc = cli("build-shards", src, tmp_path / "out", "--workers", 1)
    assert_one_line_error(proc, path)
    assert "7" in proc.stderr
    assert own_files(tmp_path / "out") == []


def test_bad_option_values_are_refused_before_any_work(tmp_path: Path) -> None:
    src = phantoms(tmp_path, "msd", 3)
    assert cli("build-shards", src, tmp_path / "out", "--val-fraction", 1.5).returncode == 2
    assert cli("build-shards", src, tmp_path / "out", "--codec", "snappy").returncode == 2
    with pytest.raises(ValueError, match="codec"):
        build_shards(src, tmp_path / "out", codec="snappy")
    assert not (tmp_path / "out").exists()


def test_unreadable_header_is_refused_before_out_is_touched(tmp_path: Path) -> None:
    src = phantoms(tmp_path, "msd", 4)
    bad = src / "imagesTr" / "kidney_003.nii.gz"
    with gzip.open(bad, "rb") as fh:
        raw = fh.read()
    with gzip.open(bad, "wb") as fh:
        fh.write(raw[:200])  # not even a complete NIfTI header
    with pytest.raises(DataError, match="kidney_003"):
        build_shards(src, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()
