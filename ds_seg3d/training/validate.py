"""Whole-volume validation during pipelined training: sliding windows through the engine, Dice per class.

The validation cases are split over data-parallel replicas and run in lockstep on every rank (see
``ds_seg3d.inference.pipelined``); the last stage scores each case against its shard label, as predicted
and with each label reduced to its largest connected components (as many as it has in the training labels:
what decides the post-processing, ``ds_seg3d.inference.postprocess``), and the Dice sums are all-reduced over the world so that every rank
returns the same means.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ds_seg3d.data.reader import ShardReader
from ds_seg3d.evaluation.metrics import dice_per_class
from ds_seg3d.inference import postprocess
from ds_seg3d.inference.pipelined import Volume, predict_in_lockstep
from ds_seg3d.inference.sliding_window import argmax_labels
from ds_seg3d.parallel.engines import all_reduce_sum


def validate(engine, reader: ShardReader, cases: Sequence[str], *, dp_rank: int, dp_size: int,
             roi: Sequence[int], micro_batch: int, overlap: float,
             on_progress: Callable[[], None] = lambda: None) -> tuple[dict[str, float], dict[str, float]]:
    """Mean Dice per foreground class over ``cases``, as predicted and with every label reduced to its
    largest components (the same two dicts on every rank)."""
    labels = reader.labels
    keep = postprocess.training_components(reader.manifest)
    names = [n for n, v in labels.items() if v != 0]
    n = len(names)
    sums = torch.zeros(2 * n + 1, dtype=torch.float64)  # Dice sums, Dice sums after the reduction, case count

    def volume(case: str) -> Volume:
        def score(probs: torch.Tensor) -> None:
            predicted, truth = argmax_labels(probs), reader.read_case(case)[1]
            d = dice_per_class(predicted, truth, labels)
            largest = {name: dice_per_class(postprocess.largest_components(predicted, labels[name], keep[name]),
                                            truth, {name: labels[name]})[name] for name in names}
            sums[:n] += torch.tensor([d[k] for k in names], dtype=torch.float64)
            sums[n:2 * n] += torch.tensor([largest[k] for k in names], dtype=torch.float64)
            sums[-1] += 1

        return Volume(reader.shape(case), lambda: torch.from_numpy(reader.read_case(case)[0])[None], score)

    predict_in_lockstep(engine, [volume(c) for c in cases], dp_rank=dp_rank, dp_size=dp_size, roi=roi,
                        micro_batch=micro_batch, overlap=overlap, num_classes=len(labels),
                        on_progress=on_progress)
    sums = all_reduce_sum(sums)
    count = max(sums[-1].item(), 1.0)
    return ({k: float(sums[i] / count) for i, k in enumerate(names)},
            {k: float(sums[n + i] / count) for i, k in enumerate(names)})
