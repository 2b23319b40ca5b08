"""Patch augmentation: nnU-Net's transforms (through MONAI), or a light grid-preserving set.

``NnUNetAugment`` is nnU-Net v2.8.1's training augmentation (``nnUNetTrainer.get_training_transforms``)
built from MONAI's transforms: rotation (p 0.2; +-30 degrees about every axis, or +-180 in-plane for an
anisotropic 3D patch or a slice-wise network) and isotropic scaling (p 0.2, 0.7-1.4; ``spatial_prob`` sets
both p), both applied to a larger region around the patch (``region``) and cropped to it, so neither pads
inside the patch; Gaussian noise (p 0.1), Gaussian blur (p 0.2), multiplicative brightness (p 0.15),
contrast about the mean (p 0.15), simulated low resolution (p 0.25), gamma on the inverted image (p 0.1)
and on the image (p 0.3), and a flip of every axis with probability 0.5 (in-plane axes only for the
slice-wise network). MONAI rather than nnU-Net's own batchgeneratorsv2: it covers every transform, draws
from random states it owns (seeded per sample here, never the global ones), and adds no dependency beyond
torch and numpy; both cost under 1 % of a training step (BENCHMARKS.md, "Augmentation").

``augment`` (``AugmentConfig``) is the earlier light set: axis flips, in-plane quarter turns and intensity
jitter, which keep voxels on the grid. Every random number of either comes from the generator the sampler
derives from (seed, data-parallel rank, epoch, index): the first and the last pipeline stage must draw the
same augmented batch.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

AUGMENTATIONS = ("nnunet", "light", "none")
ROTATION = math.radians(30)
"""nnU-Net's rotation of a (roughly isotropic) 3D patch about each axis."""
ANISOTROPY = 3.0
"""A 3D patch this much longer in-plane than along Z is rotated in-plane only (nnU-Net's dummy 2D)."""
MIN_SCALE = 0.85
"""The smallest zoom the region must allow for (nnU-Net's ``get_patch_size`` uses 0.85)."""


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


def _rotation(patch: Sequence[int], slices: bool) -> tuple[tuple[float, float], ...]:
    """MONAI's ``rotate_range`` (about X, Y, Z) for a patch: nnU-Net's choice for its shape."""
    x, y, z = patch
    if slices:  # 2D: +-180 degrees in-plane unless the slice is elongated (then +-15)
        angle = math.pi if max(x, y) / min(x, y) <= 1.5 else math.radians(15)
        return ((0.0, 0.0), (0.0, 0.0), (-angle, angle))
    if max(patch) / z > ANISOTROPY:
        return ((0.0, 0.0), (0.0, 0.0), (-math.pi, math.pi))
    return ((-ROTATION, ROTATION),) * 3


def region(patch: Sequence[int], slices: bool = False) -> tuple[int, int, int]:
    """What to read around a patch so that rotation and zooming out never reach past it (nnU-Net's
    ``get_patch_size``): each axis grown by the largest rotation's bounding box and 1 / 0.85."""
    angles = [max(abs(lo), abs(hi)) for lo, hi in _rotation(patch, slices)]
    out = []
    for axis, n in enumerate(patch):
        grow = 1.0
        for about, angle in enumerate(angles):
            if about != axis and angle:
                a = min(angle, math.pi / 4) if angle < math.pi else math.pi / 4  # a full turn: the diagonal
                grow = max(grow, abs(math.cos(a)) + abs(math.sin(a)))
        out.append(int(2 * math.ceil(n * grow / MIN_SCALE / 2)))
    return tuple(out)  # type: ignore[return-value]


class NnUNetAugment:
    """nnU-Net's training augmentation of one patch (see the module docstring).

    ``spatial_prob``: the probability of the rotation and, separately, of the scaling (nnU-Net's 0.2).
    ``__call__(image (C, *region), label (*region), seed)`` returns the augmented (image (C, *patch),
    label (*patch)) as numpy arrays; the same seed always gives the same result.
    """

    def __init__(self, patch: Sequence[int], slices: bool = False, spatial_prob: float = 0.2):
        from monai import transforms as mt

        self.patch = tuple(int(n) for n in patch)
        self.region = region(self.patch, slices)
        keys, modes = ("image", "label"), ("bilinear", "nearest")
        flips = (0, 1) if slices else (0, 1, 2)
        self.pipeline = mt.Compose([
            # zoom the whole region (zooming out keeps at least the patch inside it), then rotate onto the
            # patch grid about the region's centre, then the patch itself
            mt.RandZoomd(keys, prob=spatial_prob, min_zoom=1 / 1.4, max_zoom=1 / 0.7,
                         mode=("trilinear", "nearest"), keep_size=True),
            mt.RandAffined(keys, spatial_size=self.patch, prob=spatial_prob,
                           rotate_range=_rotation(self.patch, slices), mode=modes, padding_mode="zeros"),
            mt.CenterSpatialCropd(keys, roi_size=self.patch),
            mt.RandGaussianNoised("image", prob=0.1, std=math.sqrt(0.1)),
            mt.RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0),
                                   sigma_z=(0.0, 0.0) if slices else (0.5, 1.0)),
            mt.RandScaleIntensityd("image", prob=0.15, factors=0.25),
            mt.RandScaleIntensityFixedMeand("image", prob=0.15, factors=0.25, preserve_range=True),
            mt.RandSimulateLowResolutiond("image", prob=0.25, zoom_range=(0.5, 1.0)),
            mt.RandAdjustContrastd("image", prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
            mt.RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
            *[mt.RandFlipd(keys, prob=0.5, spatial_axis=a) for a in flips],
        ])

    def __call__(self, image: np.ndarray, label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if tuple(label.shape) != self.region:
            raise ValueError(f"expected a region of {self.region} around the patch, got {tuple(label.shape)}")
        self.pipeline.set_random_state(seed=int(seed) % 2**32)
        with torch.no_grad():
            out = self.pipeline({"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                                 "label": torch.from_numpy(np.ascontiguousarray(label)[None].astype(np.float32))})
        image_out = np.asarray(out["image"], dtype=np.float32)
        label_out = np.rint(np.asarray(out["label"][0])).astype(np.int64)
        return np.ascontiguousarray(image_out), np.ascontiguousarray(label_out)
