"""Training patches for one data-parallel rank: seeded, resumable, with foreground oversampling.

Every sample is a pure function of (seed, data-parallel rank, epoch, index). That buys three things:
the first and the last pipeline stage of a rank draw identical batches without talking to each other
(the pipeline rank never enters a seed), a checkpoint only has to store the next (epoch, index), and
any sample can be reproduced on its own for debugging.

Each epoch shuffles the whole case list with a generator seeded by (seed, epoch), the same on every
rank, and rank r takes the slice [r::dp_size], so within an epoch the ranks train on disjoint cases.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ds_seg3d.data.augment import AugmentConfig, NnUNetAugment
from ds_seg3d.data.augment import augment as apply_augment
from ds_seg3d.data.reader import ShardReader


@dataclasses.dataclass(frozen=True)
class PatchPlan:
    """Where one sample comes from, decided before any voxel is read."""

    case: str
    start: tuple[int, int, int]  # patch corner in shard voxels; may lie outside the volume
    foreground_class: int | None  # label value the patch was centred on, or None for a random patch
    centre: tuple[int, int, int] | None  # the foreground voxel it was centred on (within the jitter)


class PatchSampler:
    """Draws (image, label) patches for one data-parallel rank.

    Args:
        reader: where the cases live.
        case_ids: the training cases (all ranks must pass the same list in the same order).
        patch_size: (X, Y, Z) voxels, or one int for a cube.
        dp_rank, dp_size: this rank's position in the data-parallel group.
        seed: base seed shared by all ranks.
        oversample_foreground: probability that a patch is centred (with jitter of up to a quarter
            patch per axis) on a voxel of a randomly chosen label class present in the case; the other
            patches sit at a uniformly random position. nnU-Net's 0.33 keeps small organs in view.
        patches_per_epoch: samples per rank per epoch; default: the largest rank's share of the cases.
        augment: augmentation applied to each patch (``NnUNetAugment`` reads its larger region around the
            patch), or None for none.
    """

    def __init__(self, reader: ShardReader, case_ids: Sequence[str], patch_size: int | Sequence[int], *,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, oversample_foreground: float = 0.33,
                 patches_per_epoch: int | None = None, augment: AugmentConfig | NnUNetAugment | None = None):
        self.reader = reader
        self.case_ids = [str(c) for c in case_ids]
        if not self.case_ids:
            raise ValueError(f"{reader.folder}: no training cases to sample from")
        size = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(int(s) for s in patch_size)
        if len(size) != 3 or min(size) <= 0:
            raise ValueError(f"patch_size must be three positive sizes, got {patch_size}")
        self.patch_size: tuple[int, int, int] = size  # type: ignore[assignment]
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside a data-parallel group of {dp_size}")
        if not 0.0 <= oversample_foreground <= 1.0:
            raise ValueError(f"oversample_foreground must lie in [0, 1], got {oversample_foreground}")
        if patches_per_epoch is not None and patches_per_epoch <= 0:
            raise ValueError(f"patches_per_epoch must be positive, got {patches_per_epoch}")
        self.dp_rank, self.dp_size, self.seed = int(dp_rank), int(dp_size), int(seed)
        self.oversample_foreground = float(oversample_foreground)
        self.augment = augment
        # Every rank must agree on where an epoch ends, or their shuffles (and so their disjoint case
        # slices) drift apart; hence the largest share, not this rank's share, when cases do not divide.
        self.epoch_length = int(patches_per_epoch or math.ceil(len(self.case_ids) / self.dp_size))
        if len(self.case_ids) < self.dp_size:
            warnings.warn(f"{len(self.case_ids)} training case(s) for {self.dp_size} data-parallel ranks: "
                          "ranks share cases (each epoch's shuffle is wrapped around)", stacklevel=2)
        self._epoch, self._index = 0, 0
        self._cases_epoch: int | None = None
        self._cases: list[str] = []

    # -- which cases, which patch ----------------------------------------------------------------
    def rank_cases(self, epoch: int) -> list[str]:
        """This rank's cases in ``epoch``: a (seed, epoch) shuffle, sliced [dp_rank::dp_size]."""
        if self._cases_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.case_ids))
            shuffled = [self.case_ids[i] for i in order]
            if len(shuffled) < self.dp_size:
                self._cases = [shuffled[self.dp_rank % len(shuffled)]]
            else:
                self._cases = shuffled[self.dp_rank::self.dp_size]
            self._cases_epoch = epoch
        return self._cases

    def _rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.dp_rank, epoch, index])

    def _plan(self, epoch: int, index: int, rng: np.random.Generator) -> PatchPlan:
        cases = self.rank_cases(epoch)
        case = cases[index % len(cases)]
        size = np.asarray(self.patch_size)
        forced = rng.random() < self.oversample_foreground
        fg = self.reader.foreground(case) if forced else {}
        if fg:
            value = int(rng.choice(list(fg)))
            coords = fg[value]
            centre = coords[rng.integers(len(coords))].astype(np.int64)
            jitter = rng.integers(-(size // 4), size // 4 + 1)
            start = centre + jitter - size // 2
            return PatchPlan(case, tuple(int(s) for s in start), value, tuple(int(c) for c in centre))
        # A random patch lies inside the volume where the volume is larger than the patch, and holds
        # the whole extent (at a random offset) where it is smaller.
        slack = np.asarray(self.reader.shape(case)) - size
        start = rng.integers(np.minimum(slack, 0), np.maximum(slack, 0) + 1)
        return PatchPlan(case, tuple(int(s) for s in start), None, None)

    def plan(self, epoch: int, index: int) -> PatchPlan:
        """Where sample (epoch, index) comes from, without reading it."""
        return self._plan(epoch, index, self._rng(epoch, index))

    def sample(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample (epoch, index): image (1, X, Y, Z) float32 and label (X, Y, Z) int64."""
        rng = self._rng(epoch, index)
        p = self._plan(epoch, index, rng)
        if isinstance(self.augment, NnUNetAugment):  # read the region around the patch, augment, crop
            if self.augment.patch != self.patch_size:
                raise ValueError(f"augmentation for patch {self.augment.patch}, sampler for {self.patch_size}")
            offset = (np.asarray(self.augment.region) - np.asarray(self.patch_size)) // 2
            image, label = self.reader.read_patch(p.case, tuple(int(v) for v in np.asarray(p.start) - offset),
                                                  self.augment.region)
            image, label = self.augment(image[None], label, seed=int(rng.integers(2**32)))
            return image.astype(np.float32, copy=False), label.astype(np.int64)
        image, label = self.reader.read_patch(p.case, p.start, self.patch_size)
        if self.augment is not None:
            image, label = apply_augment(image, label, rng, self.augment)
        return image[None].astype(np.float32, copy=False), label.astype(np.int64)

    # -- streams and resume ----------------------------------------------------------------------
    def _advance(self, epoch: int, index: int) -> tuple[int, int]:
        index += 1
        return (epoch + 1, 0) if index >= self.epoch_length else (epoch, index)

    def batches(self, batch_size: int, start: tuple[int, int] | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless (images (B, 1, X, Y, Z) float32, labels (B, X, Y, Z) int64) from ``start``.

        ``start`` defaults to the saved position; ``state_dict()`` always names the next sample not
        yet handed out, so a checkpoint taken between batches resumes exactly.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if start is not None:
            self.load_state_dict({"epoch": start[0], "index": start[1]})
        return self._stream(batch_size)

    def _stream(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            epoch, index = self._epoch, self._index
            images, labels = [], []
            for _ in range(batch_size):
                image, label = self.sample(epoch, index)
                images.append(image)
                labels.append(label)
                epoch, index = self._advance(epoch, index)
            self._epoch, self._index = epoch, index
            yield torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of one from the saved position (use ``batches`` for larger micro-batches)."""
        return self.batches(1)

    def state_dict(self) -> dict[str, Any]:
        """The next sample's position; identical on all data-parallel ranks, so one copy suffices."""
        return {"epoch": self._epoch, "index": self._index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler uses {self.seed}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.epoch_length:
            raise ValueError(f"sampler position ({epoch}, {index}) is outside an epoch of {self.epoch_length}")
        self._epoch, self._index = epoch, index
