"""Sliding-window inference over any predictor, with Gaussian blending.

The window plan (``window_starts``) depends only on the volume shape, so every rank of a pipeline can
compute the same sequence of windows: the first stage feeds them, the last stage accumulates the
logits (see ``ds_seg3d.inference.pipelined``). On one device, ``sliding_window_inference(image,
roi_size, sw_batch_size, predictor)`` takes any callable from a window batch to logits.
Memory stays bounded: windows are predicted batch by batch and added into one accumulator.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm


def _axis_starts(size: int, roi: int, overlap: float) -> list[int]:
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1.0 - overlap)))
    n = math.ceil((size - roi) / step) + 1
    # Spread the windows evenly so that the last one ends exactly at the border.
    return sorted({round(i * (size - roi) / (n - 1)) for i in range(n)})


def window_starts(shape: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """Start corners of the windows covering a volume of ``shape`` (padded up to ``roi`` if smaller)."""
    axes = [_axis_starts(max(s, r), r, overlap) for s, r in zip(shape, roi)]
    return list(itertools.product(*axes))


def gaussian_weight(roi: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """nnU-Net's importance map: a Gaussian centred on the window, sigma = roi * sigma_scale."""
    grids = []
    for r in roi:
        x = torch.arange(r, dtype=torch.float64) - (r - 1) / 2.0
        grids.append(torch.exp(-0.5 * (x / max(r * sigma_scale, 1e-6)) ** 2))
    w = grids[0][:, None, None] * grids[1][None, :, None] * grids[2][None, None, :]
    w = w / w.max()
    return w.clamp_min(1e-3).float()


def pad_to_roi(image: torch.Tensor, roi: Sequence[int]) -> torch.Tensor:
    """Pad a (C, X, Y, Z) image at the far ends so that every axis is at least the window size."""
    pads = []
    for s, r in zip(reversed(image.shape[1:]), reversed(list(roi))):
        pads += [0, max(0, r - s)]
    return torch.nn.functional.pad(image, pads) if any(pads) else image


def window_batches(image: torch.Tensor, roi: Sequence[int], batch_size: int, overlap: float
                   ) -> Iterator[tuple[list[tuple[int, ...]], torch.Tensor]]:
    """Yield (starts, windows (B, C, *roi)) over a padded (C, X, Y, Z) image; the last batch may be short."""
    padded = pad_to_roi(image, roi)
    starts = window_starts(padded.shape[1:], roi, overlap)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        windows = torch.stack([padded[(slice(None),) + tuple(slice(s, s + r) for s, r in zip(st, roi))]
                               for st in chunk])
        yield chunk, windows


class WindowAccumulator:
    """Gaussian-weighted average of per-window softmax probabilities over a (padded) volume."""

    def __init__(self, shape: Sequence[int], num_classes: int, roi: Sequence[int], sigma_scale: float = 0.125):
        self.shape = tuple(int(s) for s in shape)
        self.padded = tuple(max(s, r) for s, r in zip(self.shape, roi))
        self.roi = tuple(roi)
        self.weight = gaussian_weight(roi, sigma_scale)
        self.probs = torch.zeros((num_classes,) + self.padded, dtype=torch.float32)
        self.norm = torch.zeros(self.padded, dtype=torch.float32)

    def add(self, starts: Sequence[tuple[int, ...]], logits: torch.Tensor) -> None:
        probs = torch.softmax(logits.detach().float().cpu(), dim=1)
        for st, p in zip(starts, probs):
            sl = tuple(slice(s, s + r) for s, r in zip(st, self.roi))
            self.probs[(slice(None),) + sl] += p * self.weight
            self.norm[sl] += self.weight

    def result(self) -> torch.Tensor:
        """(num_classes, X, Y, Z) probabilities on the unpadded volume."""
        out = self.probs / self.norm.clamp_min(1e-8)
        return out[(slice(None),) + tuple(slice(0, s) for s in self.shape)]


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``axes`` (0 = X, 1 = Y, 2 = Z), the empty one first: the flips of
    test-time mirroring (8 for three axes, as nnU-Net)."""
    axes = tuple(axes)
    return [tuple(a for i, a in enumerate(axes) if mask >> i & 1) for mask in range(2 ** len(axes))]


def flip_windows(windows: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """Flip a (B, C, X, Y, Z) batch along spatial ``axes``; flipping twice is the identity."""
    return torch.flip(windows, dims=[2 + a for a in axes]) if axes else windows


def mirrored(predictor: Callable[[torch.Tensor], torch.Tensor], axes: Sequence[int]
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``predictor`` averaged over every flip of ``axes``: each flipped batch is predicted and flipped
    back, and the logits are averaged (nnU-Net's test-time mirroring)."""
    combos = mirror_combinations(axes)
    if len(combos) == 1:
        return predictor

    def predict(windows: torch.Tensor) -> torch.Tensor:
        total = None
        for combo in combos:
            logits = flip_windows(predictor(flip_windows(windows, combo)), combo).float()
            total = logits if total is None else total + logits
        return total / len(combos)
    return predict


def sliding_window_inference(inputs: torch.Tensor, roi_size: Sequence[int], sw_batch_size: int,
                             predictor: Callable[[torch.Tensor], torch.Tensor], overlap: float = 0.5,
                             num_classes: int | None = None, progress: bool = False,
                             mirror_axes: Sequence[int] = ()) -> torch.Tensor:
    """Probabilities (K, X, Y, Z) for one (C, X, Y, Z) image from ``predictor(windows) -> logits``,
    with test-time mirroring over ``mirror_axes`` (none by default)."""
    predictor = mirrored(predictor, mirror_axes)
    starts_all = window_starts(pad_to_roi(inputs, roi_size).shape[1:], roi_size, overlap)
    acc = None
    bar = tqdm(total=len(starts_all), desc="windows", unit="win", disable=not progress, leave=False)
    with torch.no_grad():
        for starts, windows in window_batches(inputs, roi_size, sw_batch_size, overlap):
            logits = predictor(windows)
            if acc is None:
                acc = WindowAccumulator(inputs.shape[1:], num_classes or logits.shape[1], roi_size)
            acc.add(starts, logits)
            bar.update(len(starts))
    bar.close()
    return acc.result()


def argmax_labels(probs: torch.Tensor) -> np.ndarray:
    return probs.argmax(0).to(torch.uint8).numpy()
