"""ShardReader against real HDF5 shards written by ShardWriter."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_seg3d.data import shard_format as sf
from ds_seg3d.data.reader import ShardReader

# case id -> (shard index, shape, norm_pad or None)
CASES = {
    "a": (0, (20, 17, 13), -2.5),
    "b": (0, (9, 12, 10), None),
    "c": (1, (15, 15, 15), None),
}
LABELS = {"background": 0, "kidney": 1, "tumour": 2, "cyst": 3}


def _geometry(shape: tuple[int, int, int]) -> sf.CaseGeometry:
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    return sf.CaseGeometry(original_affine=np.eye(4), original_shape=shape, original_axcodes="LPS",
                           original_spacing=(1.0, 1.0, 1.0), spacing=(1.5, 1.5, 2.0), resampled_shape=shape,
                           crop_start=(0, 0, 0), crop_stop=shape, affine=affine)


def make_shard_folder(folder: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write two small shards (8^3 chunks, so patches cross chunk borders) and their manifest."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    shards: dict[int, list[str]] = {}
    for case, (shard, shape, _) in CASES.items():
        image = rng.standard_normal(shape).astype(np.float32)
        label = rng.integers(0, 3, size=shape).astype(np.uint8)  # values 1 and 2 present, 3 absent
        arrays[case] = (image, label)
        shards.setdefault(shard, []).append(case)
    manifest_shards, manifest_cases = [], {}
    for shard, cases in shards.items():
        name = sf.SHARD_PATTERN.format(shard)
        with sf.ShardWriter(folder / name, dataset="synthetic", chunk=8) as w:
            for case in cases:
                image, label = arrays[case]
                pad = CASES[case][2]
                norm = {"mean": 0.0, "std": 1.0} | ({"pad": pad} if pad is not None else {})
                fg = {v: np.argwhere(label == v).astype(np.int32) for v in (1, 2, 3)}
                w.write_case(sf.CaseRecord(case, image, label, _geometry(image.shape), norm, fg))
                manifest_cases[case] = {"shard": name, "shape": list(image.shape)}
        manifest_shards.append({"file": name, "sha256": sf.sha256_file(folder / name), "cases": cases})
    sf.write_manifest(folder, {"labels": LABELS, "shards": manifest_shards, "cases": manifest_cases,
                               "splits": {"train": ["a", "c"], "val": ["b"], "test": []}})
    return arrays


def reference_patch(image: np.ndarray, label: np.ndarray, start, size, pad: float):
    """The expected patch, by padding the full arrays generously and slicing (no hyperslab logic)."""
    m = int(max(np.max(np.abs(start)), 0) + max(size) + max(image.shape))
    big_i = np.pad(image, m, constant_values=pad)
    big_l = np.pad(label, m, constant_values=0)
    sl = tuple(slice(s + m, s + m + n) for s, n in zip(start, size))
    return big_i[sl], big_l[sl]


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return folder, make_shard_folder(folder)


def test_manifest_accessors(shard_folder):
    folder, arrays = shard_folder
    with ShardReader(folder) as r:
        assert r.case_ids() == ["a", "b", "c"]
        assert r.case_ids("train") == ["a", "c"] and r.case_ids("val") == ["b"] and r.case_ids("test") == []
        assert r.labels == LABELS
        for case, (image, _) in arrays.items():
            assert r.shape(case) == image.shape
        g = r.geometry("a")
        assert g.original_axcodes == "LPS" and g.crop_stop == arrays["a"][0].shape
        np.testing.assert_array_equal(g.affine, np.diag([1.5, 1.5, 2.0, 1.0]))
        assert r.normalisation("a")["pad"] == -2.5
        with pytest.raises(ValueError, match=r"manifest\.json: no split 'holdout'"):
            r.case_ids("holdout")
        with pytest.raises(ValueError, match=r"manifest\.json: no case 'zzz'"):
            r.read_case("zzz")


def test_read_case_returns_the_written_arrays(shard_folder):
    folder, arrays = shard_folder
    with ShardReader(folder) as r:
        for case, (image, label) in arrays.items():
            got_i, got_l = r.read_case(case)
            assert got_i.dtype == np.float32 and got_l.dtype == np.uint8
            np.testing.assert_array_equal(got_i, image)
            np.testing.assert_array_equal(got_l, label)


@pytest.mark.parametrize("case,start,size", [
    ("a", (3, 2, 1), (8, 8, 8)),          # interior, crosses chunk borders
    ("a", (-4, 5, -2), (10, 6, 7)),       # across the low borders
    ("a", (15, 12, 9), (9, 9, 9)),        # across the high borders
    ("b", (-3, -3, -3), (16, 18, 16)),    # volume inside the patch, padded on every side
    ("c", (0, 0, 0), (15, 15, 15)),       # exactly the volume
    ("c", (-20, 2, 2), (6, 6, 6)),        # fully outside (low)
    ("a", (5, 40, 5), (4, 4, 4)),         # fully outside (high)
])
def test_read_patch_equals_padded_slicing(shard_folder, case, start, size):
    folder, arrays = shard_folder
    image, label = arrays[case]
    pad = CASES[case][2] or 0.0
    with ShardReader(folder) as r:
        got_i, got_l = r.read_patch(case, start, size)
    exp_i, exp_l = reference_patch(image, label, start, size, pad)
    assert got_i.shape == tuple(size) and got_l.shape == tuple(size)
    assert got_i.dtype == np.float32 and got_l.dtype == np.uint8
    np.testing.assert_array_equal(got_i, exp_i)
    np.testing.assert_array_equal(got_l, exp_l)


def test_padding_values(shard_folder):
    folder, _ = shard_folder
    with ShardReader(folder) as r:
        assert r.pad_value("a") == -2.5 and r.pad_value("b") == 0.0
        img_a, lbl_a = r.read_patch("a", (-10, -10, -10), (5, 5, 5))
        assert np.all(img_a == -2.5) and not lbl_a.any()
        img_b, lbl_b = r.read_patch("b", (9, 0, 0), (3, 4, 5))  # starts exactly at the x end
        assert np.all(img_b == 0.0) and not lbl_b.any()
        img, _ = r.read_patch("a", (-1, 0, 0), (3, 3, 3))
        assert np.all(img[0] == -2.5) and not np.any(img[1:] == -2.5)


def test_bad_patch_request_names_the_case(shard_folder):
    folder, _ = shard_folder
    with ShardReader(folder) as r, pytest.raises(ValueError, match="case 'a': bad patch"):
        r.read_patch("a", (0, 0, 0), (4, 0, 4))


def test_foreground_drops_empty_classes_and_is_cached(shard_folder):
    folder, arrays = shard_folder
    with ShardReader(folder) as r:
        fg = r.foreground("b")
        assert sorted(fg) == [1, 2]  # class 3 was written with no coordinates
        label = arrays["b"][1]
        for value, coords in fg.items():
            assert coords.shape[1] == 3 and len(coords) == int((label == value).sum())
            assert np.all(label[tuple(coords.T)] == value)
        assert r.foreground("b") is fg


class _PatchDataset(torch.utils.data.Dataset):
    """Reads one patch per item through a reader created in the parent process."""

    def __init__(self, reader: ShardReader, requests):
        self.reader, self.requests = reader, requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i):
        case, start, size = self.requests[i]
        image, label = self.reader.read_patch(case, start, size)
        return os.getpid(), self.reader.owner_pid, image, label


def test_forked_workers_reopen_their_own_handles(shard_folder):
    folder, arrays = shard_folder
    parent = os.getpid()
    reader = ShardReader(folder)
    reader.read_patch("a", (0, 0, 0), (4, 4, 4))  # open the handles before forking
    assert reader.owner_pid == parent
    requests = [(c, (i - 2, 1, i), (7, 6, 5)) for i in range(6) for c in ("a", "c")]
    loader = torch.utils.data.DataLoader(_PatchDataset(reader, requests), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    workers = set()
    for (case, start, size), (pid, owner, image, label) in zip(requests, loader):
        assert pid != parent and owner == pid
        workers.add(pid)
        exp_i, exp_l = reference_patch(*arrays[case], start, size, CASES[case][2] or 0.0)
        np.testing.assert_array_equal(image.numpy(), exp_i)
        np.testing.assert_array_equal(label.numpy(), exp_l)
    assert len(workers) == 2
    # The parent's handles survived the workers.
    assert reader.owner_pid == parent
    np.testing.assert_array_equal(reader.read_case("c")[0], arrays["c"][0])
    reader.close()
    assert reader.owner_pid is None


def test_pickle_round_trip_drops_handles(shard_folder):
    folder, arrays = shard_folder
    reader = ShardReader(folder)
    reader.read_patch("b", (1, 1, 1), (3, 3, 3))
    reader.foreground("b")
    clone = pickle.loads(pickle.dumps(reader))
    reader.close()
    assert clone.owner_pid is None and clone.case_ids("train") == ["a", "c"]
    got_i, got_l = clone.read_patch("b", (-2, 4, 3), (6, 6, 9))
    exp_i, exp_l = reference_patch(*arrays["b"], (-2, 4, 3), (6, 6, 9), 0.0)
    np.testing.assert_array_equal(got_i, exp_i)
    np.testing.assert_array_equal(got_l, exp_l)
    assert clone.owner_pid == os.getpid()
    clone.close()


def test_missing_shard_and_bad_manifest_are_named(tmp_path):
    make_shard_folder(tmp_path)
    (tmp_path / sf.SHARD_PATTERN.format(1)).unlink()
    with ShardReader(tmp_path) as r:
        r.read_case("a")  # shard 0 is intact
        with pytest.raises(ValueError, match=r"shard_00001\.h5: shard listed in manifest\.json is missing"):
            r.read_case("c")
    sf.write_manifest(tmp_path, {"labels": LABELS, "cases": {}})
    with pytest.raises(ValueError, match=r"manifest\.json: missing key\(s\) shards, splits"):
        ShardReader(tmp_path)
    with pytest.raises(ValueError, match="no manifest"):
        ShardReader(tmp_path / "nowhere")
