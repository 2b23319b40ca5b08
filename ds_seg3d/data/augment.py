"""Cheap patch augmentation: axis flips, in-plane quarter turns and intensity jitter.

Only transforms that keep voxels on the grid are used, so the label never needs interpolation and
stays exactly aligned with the image. Every random number comes from the generator passed in, which
the sampler derives from (seed, data-parallel rank, epoch, index): the first and the last pipeline
stage must draw the same augmented batch.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the patch augmentations (defaults: moderate, CT/MR friendly)."""

    flip_prob: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Probability of mirroring the patch along x, y and z, drawn independently per axis."""

    rot90_prob: float = 0.5
    """Probability of a quarter turn (90, 180 or 270 degrees, equally likely) in the x-y plane.
    Skipped for patches whose x and y sizes differ, since the turn would change the patch shape."""

    scale_range: tuple[float, float] = (0.9, 1.1)
    """Multiplicative intensity factor, uniform in [low, high]; (1, 1) disables it."""

    shift_range: tuple[float, float] = (-0.1, 0.1)
    """Additive intensity offset (in normalised units), uniform in [low, high]; (0, 0) disables it."""

    noise_std_range: tuple[float, float] = (0.0, 0.1)
    """Standard deviation of the Gaussian noise, uniform in [low, high], when noise is applied."""

    noise_prob: float = 0.15
    """Probability of adding Gaussian noise to a patch."""

    def __post_init__(self) -> None:
        probs = (*self.flip_prob, self.rot90_prob, self.noise_prob)
        if len(self.flip_prob) != 3:
            raise ValueError(f"flip_prob needs one probability per axis, got {self.flip_prob}")
        if any(not 0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"augmentation probabilities must lie in [0, 1], got {probs}")
        for name in ("scale_range", "shift_range", "noise_std_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}")
        if self.scale_range[0] <= 0:
            raise ValueError(f"scale_range must be positive, got {self.scale_range}")
        if self.noise_std_range[0] < 0:
            raise ValueError(f"noise_std_range must be non-negative, got {self.noise_std_range}")

    @classmethod
    def disabled(cls) -> "AugmentConfig":
        """A configuration that leaves every patch unchanged."""
        return cls(flip_prob=(0.0, 0.0, 0.0), rot90_prob=0.0, scale_range=(1.0, 1.0),
                   shift_range=(0.0, 0.0), noise_std_range=(0.0, 0.0), noise_prob=0.0)


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
            config: AugmentConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Apply one random draw of ``config`` to a patch; the same spatial transform to image and label.

    Args:
        image: float array whose last three axes are (X, Y, Z); leading axes (channels) ride along.
        label: integer array of shape (X, Y, Z).
        rng: the generator that decides everything; the number of draws does not depend on the
            outcome, so a given generator state always yields the same transform.
        config: what to apply; defaults to ``AugmentConfig()``.

    Returns contiguous arrays (torch.from_numpy refuses the negative strides of a flip view).
    """
    cfg = config if config is not None else AugmentConfig()
    if image.shape[-3:] != label.shape:
        raise ValueError(f"image spatial shape {image.shape[-3:]} differs from label shape {label.shape}")
    lead = image.ndim - 3

    flips = rng.random(3) < np.asarray(cfg.flip_prob)
    rotate = rng.random() < cfg.rot90_prob
    turns = int(rng.integers(1, 4))
    scale = rng.uniform(*cfg.scale_range)
    shift = rng.uniform(*cfg.shift_range)
    noisy = rng.random() < cfg.noise_prob
    noise_std = rng.uniform(*cfg.noise_std_range)
    noise_seed = int(rng.integers(2**63))

    axes = tuple(int(a) for a in np.flatnonzero(flips))
    if axes:
        image = np.flip(image, axis=tuple(lead + a for a in axes))
        label = np.flip(label, axis=axes)
    if rotate and label.shape[0] == label.shape[1]:
        image = np.rot90(image, k=turns, axes=(lead, lead + 1))
        label = np.rot90(label, k=turns, axes=(0, 1))

    image = np.ascontiguousarray(image)
    label = np.ascontiguousarray(label)
    intensity = scale != 1.0 or shift != 0.0 or (noisy and noise_std > 0.0)
    if intensity:
        image = image.astype(np.float32, copy=True)  # never write into the caller's array
        if scale != 1.0:
            image *= np.float32(scale)
        if shift != 0.0:
            image += np.float32(shift)
        if noisy and noise_std > 0.0:
            noise = np.random.default_rng(noise_seed).standard_normal(image.shape, dtype=np.float32)
            image += noise * np.float32(noise_std)
    return image, label
