"""Seeded train/val/test splits, or k folds, recorded in the manifest so every run trains on the same cases.

The split depends only on the sorted case ids and the seed, never on the order a layout listed the
cases in or on the number of build workers, so rebuilding a dataset reproduces it exactly.

Manifest form (``manifest["splits"]``)::

    holdout: {"method": "holdout", "seed", "val_fraction", "test_fraction", "train", "val", "test"}
    kfold:   {"method": "kfold", "seed", "k", "test_fraction", "test",
              "folds": [{"train": [...], "val": [...]}, ...]}

A dataset too small for the requested shares keeps every case in ``train`` (``val``/``test`` empty,
``folds`` empty) and carries a ``note`` that says why: a one-case smoke test must still build.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _share(n: int, fraction: float) -> int:
    """Cases for a requested share: at least one whenever the share is asked for at all."""
    return 0 if fraction <= 0 else max(1, int(round(n * fraction)))


def _check(val_fraction: float, test_fraction: float, folds: int | None) -> None:
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {f}")
    if folds is None and val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")
    if folds is not None and folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")


def make_splits(case_ids: Sequence[str], seed: int = 0, val_fraction: float = 0.2,
                test_fraction: float = 0.2, folds: int | None = None) -> dict[str, Any]:
    """Split case ids into train/val/test by fractions, or into ``folds`` folds after holding out a test share.

    Args:
        case_ids: every case of the dataset; order does not matter, duplicates are an error.
        seed: the shuffle seed; the same ids and seed always give the same split.
        val_fraction: share of cases for validation (holdout mode; ignored with ``folds``).
        test_fraction: share held out for testing, in both modes.
        folds: number of cross-validation folds; each fold's val list is disjoint, its train is the rest.
    """
    _check(val_fraction, test_fraction, folds)
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique")
    n = len(ids)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    n_test = _share(n, test_fraction)
    if folds is None:
        n_val = _share(n, val_fraction)
        out: dict[str, Any] = {"method": "holdout", "seed": seed, "val_fraction": val_fraction,
                               "test_fraction": test_fraction}
        if n_val + n_test >= n:
            return {**out, "train": ids, "val": [], "test": [],
                    "note": _too_small(n, f"{n_val} val + {n_test} test cases")}
        return {**out, "test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
                "train": sorted(order[n_test + n_val:])}

    out = {"method": "kfold", "seed": seed, "k": folds, "test_fraction": test_fraction}
    pool = order[n_test:]
    if len(pool) < folds:
        return {**out, "train": ids, "val": [], "test": [], "folds": [],
                "note": _too_small(n, f"{n_test} test cases and {folds} folds of at least one case")}
    vals = [set(part.tolist()) for part in np.array_split(np.array(pool, dtype=object), folds)]
    return {**out, "test": sorted(order[:n_test]),
            "folds": [{"train": sorted(set(pool) - val), "val": sorted(val)} for val in vals]}


def _too_small(n: int, wanted: str) -> str:
    return (f"dataset too small for the requested split ({n} cases, wanted {wanted} and at least one "
            f"training case): every case is in train")


def train_val(splits: dict[str, Any], fold: int | None = None) -> tuple[list[str], list[str]]:
    """The (train, val) case ids of a manifest's splits: the holdout split, or fold ``fold`` of a k-fold split."""
    if "note" in splits:
        return list(splits["train"]), []
    if splits["method"] == "kfold":
        if fold is None or not 0 <= fold < len(splits["folds"]):
            k = len(splits["folds"])
            raise ValueError(f"this dataset has {k} folds; choose a fold in 0..{k - 1}")
        return list(splits["folds"][fold]["train"]), list(splits["folds"][fold]["val"])
    if fold is not None:
        raise ValueError("this dataset has a holdout split, not folds")
    return list(splits["train"]), list(splits["val"])
