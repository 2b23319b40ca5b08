"""PatchSampler on real shards: determinism, data-parallel split, foreground oversampling, resume."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_seg3d.data import shard_format as sf
from ds_seg3d.data.augment import AugmentConfig, NnUNetAugment
from ds_seg3d.data.reader import ShardReader
from ds_seg3d.data.sampler import PatchSampler

SHAPE = (40, 36, 32)
PATCH = (8, 8, 8)
N_CASES = 10


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def make_blob_shards(folder: Path, n_cases: int = N_CASES, seed: int = 0) -> list[str]:
    """Cases with one or two small balls (classes 1 and 2): random patches rarely see foreground."""
    rng = np.random.default_rng(seed)
    ids = [f"case_{i:02d}" for i in range(n_cases)]
    affine = np.eye(4)
    cases = {}
    name = sf.SHARD_PATTERN.format(0)
    with sf.ShardWriter(folder / name, dataset="blobs", chunk=16) as w:
        for i, case in enumerate(ids):
            label = np.zeros(SHAPE, dtype=np.uint8)
            for value in (1, 2) if i % 2 else (1,):
                label[_ball(SHAPE, rng.integers(3, np.asarray(SHAPE) - 3), 2)] = value
            image = rng.normal(0.0, 0.1, SHAPE).astype(np.float32) + 3.0 * label
            geometry = sf.CaseGeometry(affine, SHAPE, "RAS", (1.0,) * 3, (1.0,) * 3, SHAPE, (0, 0, 0), SHAPE, affine)
            fg = {v: np.argwhere(label == v).astype(np.int32) for v in (1, 2) if (label == v).any()}
            w.write_case(sf.CaseRecord(case, image, label, geometry, {"mean": 0.0, "std": 1.0}, fg))
            cases[case] = {"shard": name, "shape": list(SHAPE)}
    sf.write_manifest(folder, {"labels": {"background": 0, "kidney": 1, "tumour": 2},
                               "shards": [{"file": name, "sha256": sf.sha256_file(folder / name), "cases": ids}],
                               "cases": cases, "splits": {"train": ids, "val": [], "test": []}})
    return ids


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("blobs")
    make_blob_shards(path)
    return path


def _sampler(folder: Path, **kw) -> PatchSampler:
    reader = ShardReader(folder)
    return PatchSampler(reader, reader.case_ids("train"), kw.pop("patch_size", PATCH), **kw)


@pytest.mark.parametrize("nnunet", [False, True], ids=["light", "nnunet"])
def test_two_instances_draw_the_same_sequence(folder, nnunet):
    # the first and the last pipeline stage each build a sampler: their augmented patches must agree
    aug = NnUNetAugment(PATCH) if nnunet else AugmentConfig()
    a = _sampler(folder, seed=7, dp_rank=1, dp_size=2, augment=aug)
    b = _sampler(folder, seed=7, dp_rank=1, dp_size=2, augment=NnUNetAugment(PATCH) if nnunet else aug)
    other = _sampler(folder, seed=8, dp_rank=1, dp_size=2, augment=aug)
    differs = False
    for epoch in (0, 3):
        for index in range(8):
            ia, la = a.sample(epoch, index)
            ib, lb = b.sample(epoch, index)
            assert ia.shape == (1, *PATCH) and ia.dtype == np.float32
            assert la.shape == PATCH and la.dtype == np.int64
            np.testing.assert_array_equal(ia, ib)
            np.testing.assert_array_equal(la, lb)
            differs |= not np.array_equal(ia, other.sample(epoch, index)[0])
    assert differs
    # Order of requests does not matter: a fresh instance asked for one sample alone agrees.
    fresh = _sampler(folder, seed=7, dp_rank=1, dp_size=2, augment=aug)
    np.testing.assert_array_equal(fresh.sample(3, 6)[0], a.sample(3, 6)[0])


@pytest.mark.parametrize("dp_size", [1, 3, 5])
def test_ranks_split_each_epoch_disjointly_and_reshuffle(folder, dp_size):
    samplers = [_sampler(folder, dp_rank=r, dp_size=dp_size, seed=1) for r in range(dp_size)]
    all_cases = samplers[0].case_ids
    orders = []
    for epoch in range(4):
        per_rank = [s.rank_cases(epoch) for s in samplers]
        flat = [c for cases in per_rank for c in cases]
        assert len(flat) == len(set(flat)) == len(all_cases)  # disjoint, and together they cover all
        assert set(flat) == set(all_cases)
        assert all(s.epoch_length == math.ceil(len(all_cases) / dp_size) for s in samplers)
        for r, s in enumerate(samplers):
            assert [s.plan(epoch, i).case for i in range(len(per_rank[r]))] == per_rank[r]
        orders.append(tuple(flat))
    assert len(set(orders)) == len(orders)  # every epoch has its own shuffle


def test_fewer_cases_than_ranks_wraps_around(tmp_path):
    ids = make_blob_shards(tmp_path, n_cases=2)
    reader = ShardReader(tmp_path)
    with pytest.warns(UserWarning, match="2 training case"):
        samplers = [PatchSampler(reader, ids, PATCH, dp_rank=r, dp_size=4) for r in range(4)]
    for epoch in range(3):
        per_rank = [s.rank_cases(epoch) for s in samplers]
        assert all(len(c) == 1 for c in per_rank)
        assert {c[0] for c in per_rank} == set(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single = PatchSampler(reader, ids[:1], PATCH)
    image, label = next(iter(single))
    assert image.shape == (1, 1, *PATCH) and label.shape == (1, *PATCH)
    assert single.rank_cases(5) == ids[:1]


def test_foreground_oversampling_ratio_and_centring(folder):
    ratio, n = 0.33, 400
    s = _sampler(folder, oversample_foreground=ratio, patches_per_epoch=50, seed=3)
    size = np.asarray(PATCH)
    with_fg = forced = 0
    for k in range(n):
        epoch, index = divmod(k, s.epoch_length)
        plan = s.plan(epoch, index)
        _, label = s.sample(epoch, index)
        with_fg += bool(label.any())
        if plan.foreground_class is None:
            slack = np.asarray(SHAPE) - size
            assert np.all(np.asarray(plan.start) >= 0) and np.all(np.asarray(plan.start) <= slack)
            continue
        forced += 1
        # The chosen voxel lies within a quarter patch of the centre and carries the chosen class.
        offset = np.asarray(plan.centre) - np.asarray(plan.start)
        assert np.all(np.abs(offset - size // 2) <= size // 4)
        assert label[tuple(offset)] == plan.foreground_class
    sd = math.sqrt(ratio * (1 - ratio) / n)
    assert abs(forced / n - ratio) < 3.5 * sd
    assert with_fg / n >= ratio - 3 * sd
    assert with_fg > forced  # random patches do see foreground sometimes, but not always
    assert with_fg < n


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_oversampling_extremes(folder, ratio):
    s = _sampler(folder, oversample_foreground=ratio, seed=5)
    plans = [s.plan(0, i) for i in range(30)]
    classes = {p.foreground_class for p in plans}
    if ratio == 0.0:
        assert classes == {None}
    else:
        assert classes == {1, 2}  # both classes drawn where present
        assert all(s.sample(0, i)[1].any() for i in range(30))


def test_state_dict_resume_gives_the_same_next_batches(folder):
    kw = dict(seed=11, dp_rank=0, dp_size=2, patches_per_epoch=5, augment=AugmentConfig())
    a = _sampler(folder, **kw)
    stream = a.batches(3)
    for _ in range(3):
        next(stream)
    state = a.state_dict()
    assert (state["epoch"], state["index"]) == divmod(9, 5)
    expected = [next(stream) for _ in range(2)]

    b = _sampler(folder, **kw)
    b.load_state_dict(state)
    resumed = b.batches(3)
    c = _sampler(folder, **kw).batches(3, start=(state["epoch"], state["index"]))
    for (ei, el), (bi, bl), (ci, cl) in zip(expected, (next(resumed) for _ in range(2)), (next(c) for _ in range(2))):
        assert ei.shape == (3, 1, *PATCH) and ei.dtype == torch.float32
        assert el.shape == (3, *PATCH) and el.dtype == torch.int64
        assert torch.equal(ei, bi) and torch.equal(el, bl)
        assert torch.equal(ei, ci) and torch.equal(el, cl)
    assert b.state_dict() == a.state_dict() == {"epoch": 3, "index": 0, "seed": 11}
    # Batches are the individual samples, in order, across the epoch boundary.
    first = next(_sampler(folder, **kw).batches(7))
    for k in range(7):
        image, label = a.sample(*divmod(k, 5))
        assert torch.equal(first[0][k], torch.from_numpy(image)) and torch.equal(first[1][k], torch.from_numpy(label))


def test_bad_arguments_are_refused(folder):
    reader = ShardReader(folder)
    ids = reader.case_ids()
    with pytest.raises(ValueError, match="no training cases"):
        PatchSampler(reader, [], PATCH)
    with pytest.raises(ValueError, match="dp_rank 2"):
        PatchSampler(reader, ids, PATCH, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="patch_size"):
        PatchSampler(reader, ids, (8, 8))
    s = PatchSampler(reader, ids, 8, seed=1)
    assert s.patch_size == (8, 8, 8)
    with pytest.raises(ValueError, match="seed 2"):
        s.load_state_dict({"epoch": 0, "index": 0, "seed": 2})
    with pytest.raises(ValueError, match="outside an epoch"):
        s.load_state_dict({"epoch": 0, "index": s.epoch_length})
