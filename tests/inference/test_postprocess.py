"""nnU-Net's post-processing: the largest connected component per label, where validation says so."""
from __future__ import annotations

import numpy as np

from ds_seg3d.inference import postprocess


def _two_blobs() -> np.ndarray:
    label = np.zeros((20, 20, 10), np.uint8)
    label[2:8, 2:8, 2:6] = 1      # 144 voxels
    label[12:14, 12:14, 2:4] = 1  # 8 voxels, apart from the first
    label[15:19, 2:6, 5:9] = 2    # another label, untouched
    return label


def test_only_the_largest_component_of_the_label_remains():
    label = _two_blobs()
    out = postprocess.largest_component(label, 1)
    assert (out == 1).sum() == 144 and (out == 2).sum() == (label == 2).sum()
    assert (out[12:14, 12:14, 2:4] == 0).all()
    assert (label == 1).sum() == 152  # the input is left as it was
    single = postprocess.largest_component(out, 1)
    assert np.array_equal(single, out)  # one component: unchanged


def test_diagonal_neighbours_are_one_component():
    label = np.zeros((4, 4, 4), np.uint8)
    label[0, 0, 0] = label[1, 1, 1] = 1  # 26-connected, as nnU-Net's
    assert (postprocess.largest_component(label, 1) == 1).sum() == 2


def test_a_label_is_kept_only_where_validation_improved():
    decision = postprocess.decide({"kidney": 0.90, "tumour": 0.70}, {"kidney": 0.88, "tumour": 0.75},
                                  {"background": 0, "kidney": 1, "tumour": 2})
    assert decision["keep_largest"] == {"tumour": 2}
    out = postprocess.apply(_two_blobs(), decision["keep_largest"].values())
    assert (out == 1).sum() == 152  # kidney untouched
