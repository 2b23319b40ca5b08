"""Splits: disjoint, covering, seeded, independent of input order; tiny datasets still build."""
from __future__ import annotations

import random

import pytest

from data_tools.splits import make_splits, train_val

IDS = [f"case_{i:03d}" for i in range(23)]


def test_holdout_is_disjoint_covering_and_sized() -> None:
    s = make_splits(IDS, seed=3, val_fraction=0.2, test_fraction=0.1)
    train, val, test = set(s["train"]), set(s["val"]), set(s["test"])
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(IDS)
    assert len(val) == round(23 * 0.2) and len(test) == round(23 * 0.1)
    assert "note" not in s
    assert train_val(s) == (s["train"], s["val"])


def test_same_seed_same_split_whatever_the_input_order() -> None:
    shuffled = IDS[:]
    random.Random(7).shuffle(shuffled)
    assert make_splits(IDS, seed=5) == make_splits(shuffled, seed=5)


def test_other_seed_other_split() -> None:
    a, b = make_splits(IDS, seed=0), make_splits(IDS, seed=1)
    assert (a["val"], a["test"]) != (b["val"], b["test"])


def test_kfold_vals_partition_the_non_test_cases() -> None:
    s = make_splits(IDS, seed=2, test_fraction=0.2, folds=4)
    test = set(s["test"])
    assert len(s["folds"]) == 4 and len(test) == round(23 * 0.2)
    vals = [set(f["val"]) for f in s["folds"]]
    pool = set(IDS) - test
    assert set().union(*vals) == pool
    assert sum(len(v) for v in vals) == len(pool)  # disjoint
    assert max(len(v) for v in vals) - min(len(v) for v in vals) <= 1
    for i, fold in enumerate(s["folds"]):
        assert set(fold["train"]) == pool - vals[i]
        assert train_val(s, i) == (fold["train"], fold["val"])
    with pytest.raises(ValueError):
        train_val(s)  # a k-fold split needs a fold number


def test_kfold_without_test_share_uses_every_case() -> None:
    s = make_splits(IDS[:10], seed=0, test_fraction=0.0, folds=5)
    assert s["test"] == []
    assert sorted(c for f in s["folds"] for c in f["val"]) == sorted(IDS[:10])


@pytest.mark.parametrize("n, folds", [(1, None), (2, None), (1, 3), (3, 3)])
def test_too_small_puts_everything_in_train_with_a_note(n: int, folds: int | None) -> None:
    ids = IDS[:n]
    s = make_splits(ids, seed=0, val_fraction=0.2, test_fraction=0.2, folds=folds)
    assert s["train"] == sorted(ids) and s["val"] == [] and s["test"] == []
    assert "too small" in s["note"]
    assert train_val(s, 0 if folds else None) == (sorted(ids), [])


def test_smallest_real_split_has_one_case_each() -> None:
    s = make_splits(IDS[:3], seed=0, val_fraction=0.2, test_fraction=0.2)
    assert "note" not in s
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (1, 1, 1)


@pytest.mark.parametrize("kw", [{"val_fraction": 1.0}, {"test_fraction": -0.1},
                                {"val_fraction": 0.6, "test_fraction": 0.5}, {"folds": 1}])
def test_bad_fractions_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        make_splits(IDS, **kw)


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        make_splits(["a", "b", "a"])
