"""Post-processing: the largest connected components per label (as many as training labels have), where
validation says so."""
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
    out = postprocess.largest_components(label, 1)
    assert (out == 1).sum() == 144 and (out == 2).sum() == (label == 2).sum()
    assert (out[12:14, 12:14, 2:4] == 0).all()
    assert (label == 1).sum() == 152  # the input is left as it was
    single = postprocess.largest_components(out, 1)
    assert np.array_equal(single, out)  # one component: unchanged


def test_diagonal_neighbours_are_one_component():
    label = np.zeros((4, 4, 4), np.uint8)
    label[0, 0, 0] = label[1, 1, 1] = 1  # 26-connected, as nnU-Net's
    assert (postprocess.largest_components(label, 1) == 1).sum() == 2


def test_a_label_is_kept_only_where_validation_improved():
    decision = postprocess.decide({"kidney": 0.90, "tumour": 0.70}, {"kidney": 0.88, "tumour": 0.75},
                                  {"background": 0, "kidney": 1, "tumour": 2}, {"kidney": 2})
    assert decision["keep_largest"] == {"tumour": 2}
    assert decision["components"] == {"kidney": 2, "tumour": 1}
    assert postprocess.kept(decision) == {2: 1} and postprocess.kept(None) == {}
    out = postprocess.apply(_two_blobs(), postprocess.kept(decision))
    assert (out == 1).sum() == 152  # kidney untouched


def test_a_paired_organ_keeps_both_of_its_parts_and_loses_a_stray_blob():
    label = np.zeros((30, 20, 10), np.uint8)
    label[2:8, 2:8, 2:6] = 1      # left kidney, 144 voxels
    label[20:26, 2:8, 2:6] = 1    # right kidney, 144 voxels
    label[12:14, 14:16, 2:4] = 1  # a false positive, 8 voxels
    out = postprocess.largest_components(label, 1, 2)
    assert (out == 1).sum() == 288 and (out[12:14, 14:16, 2:4] == 0).all()
    assert (postprocess.largest_components(label, 1, 1) == 1).sum() == 144


def test_training_components_come_from_the_fingerprint():
    manifest = {"labels": {"background": 0, "kidney": 1, "psoas": 2},
                "dataset_fingerprint": {"components": {"kidney": 2}}}
    assert postprocess.training_components(manifest) == {"kidney": 2, "psoas": 1}
    assert postprocess.training_components({"labels": {"background": 0, "kidney": 1}}) == {"kidney": 1}
