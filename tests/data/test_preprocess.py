"""Per-case preprocessing on real NIfTI files: validation errors, normalisation, crop, real CT volumes."""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform

from data_tools.cases import case_statistics, load_case, preprocess_case
from data_tools.layouts import CaseSpec, detect_layout, parse_label_map
from ds_seg3d.data import geometry as geo
from ds_seg3d.data.errors import DataError
from ds_seg3d.data.preprocess import PreprocessOptions, load_image
from ds_seg3d.paths import SAMPLE_CT

REAL = SAMPLE_CT
AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def phantom(shape=(40, 32, 16)):
    """Air, a two-tissue body (0 and 100 HU, so mean 50 and std 50) with an organ, and a separate table."""
    image = np.full(shape, -1000, np.int16)
    image[8:30, 6:22, 3:13] = 0
    image[8:19, 6:22, 3:13] = 100
    image[4:36, 26:29, 1:15] = 400  # table: not connected to the body
    label = np.zeros(shape, np.uint8)
    label[12:20, 10:16, 5:10] = 1
    label[22:26, 10:14, 6:9] = 2
    return image, label


def csv_source(tmp_path: Path, image: Path, label: Path):
    csv = tmp_path / "cases.csv"
    rel = [os.path.relpath(p, tmp_path) for p in (image, label)]
    csv.write_text(f"case_id,image,label\ncase1,{rel[0]},{rel[1]}\n")
    return detect_layout(csv)


def one_case(tmp_path: Path, image: np.ndarray, label: np.ndarray, spec: str = "organ=1;other=2",
             label_affine: np.ndarray = AFFINE):
    src = csv_source(tmp_path, save(tmp_path / "img.nii.gz", image), save(tmp_path / "lab.nii.gz", label, label_affine))
    return src.cases[0], parse_label_map(spec, src)


def msd_case(tmp_path: Path, image: np.ndarray, label: np.ndarray):
    """A one-case MSD source declaring labels 0, 1, 2."""
    import json
    save(tmp_path / "imagesTr" / "c1.nii.gz", image)
    save(tmp_path / "labelsTr" / "c1.nii.gz", label)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ", "2": "other"},
        "training": [{"image": "imagesTr/c1.nii.gz", "label": "labelsTr/c1.nii.gz"}]}))
    src = detect_layout(tmp_path)
    return src.cases[0], parse_label_map(None, src)


def opts(**kw) -> PreprocessOptions:
    return PreprocessOptions(target_spacing=kw.pop("target_spacing", (0.8, 0.8, 2.0)), **kw)


def expect_error(path: Path, fn, *args, match: str):
    with pytest.raises(DataError, match=match) as err:
        fn(*args)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ")


# ---------------------------------------------------------------- validation


def test_truncated_and_garbage_files_are_data_errors(tmp_path):
    image, label = phantom()
    spec, lm = one_case(tmp_path, image, label)
    raw = spec.image.read_bytes()
    spec.image.write_bytes(raw[: len(raw) // 2])
    expect_error(spec.image, load_case, spec, lm, opts(), match="unreadable or truncated")
    spec.image.write_bytes(b"this is not a NIfTI file at all" * 20)
    expect_error(spec.image, load_case, spec, lm, opts(), match="unreadable or truncated")
    # Truncated uncompressed .nii: the header is fine, the voxels are short.
    nii = save(tmp_path / "plain.nii", image)
    nii.write_bytes(nii.read_bytes()[:2000])
    expect_error(nii, load_case, CaseSpec("c", nii, spec.label), lm, opts(), match="unreadable or truncated")
    # A gzip stream whose CRC does not match.
    bad = bytearray(gzip.compress(save(tmp_path / "ok.nii", image).read_bytes()))
    bad[-8] ^= 0xFF
    (tmp_path / "crc.nii.gz").write_bytes(bytes(bad))
    expect_error(tmp_path / "crc.nii.gz", load_case, CaseSpec("c", tmp_path / "crc.nii.gz", spec.label), lm,
                 opts(), match="unreadable or truncated")
    # Only the gzip trailer lost: every voxel byte is there, but the file is still truncated.
    (tmp_path / "short.nii.gz").write_bytes(bytes(bad[:-8]))
    expect_error(tmp_path / "short.nii.gz", load_case, CaseSpec("c", tmp_path / "short.nii.gz", spec.label), lm,
                 opts(), match="unreadable or truncated")


def test_2d_and_4d_inputs(tmp_path):
    image, label = phantom()
    spec, lm = one_case(tmp_path, image, label)
    save(spec.image, image[:, :, 0])
    expect_error(spec.image, load_case, spec, lm, opts(), match="expected a 3D volume, got 2D")
    save(spec.image, np.stack([image, image], axis=-1))
    expect_error(spec.image, load_case, spec, lm, opts(), match="got 4D")
    save(spec.image, image[..., None])  # trailing singleton: squeezed
    loaded, _, _ = load_case(spec, lm, opts())
    assert loaded.shape == image.shape and loaded.dtype == np.float32
    assert np.array_equal(loaded, image.astype(np.float32))


def test_shape_and_affine_mismatch(tmp_path):
    image, label = phantom()
    spec, lm = one_case(tmp_path, image, label[:, :, :-1])
    expect_error(spec.label, load_case, spec, lm, opts(), match="does not match the image shape")
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.01
    spec, lm = one_case(tmp_path, image, label, label_affine=shifted)
    expect_error(spec.label, load_case, spec, lm, opts(), match="affine differs")
    assert load_case(spec, lm, opts(affine_tolerance=0.02))[1].any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_image(tmp_path, bad):
    image, label = phantom()
    image = image.astype(np.float32)
    image[1, 2, 3] = bad
    spec, lm = one_case(tmp_path, image, label)
    expect_error(spec.image, load_case, spec, lm, opts(), match="NaN or infinite")
    expect_error(spec.image, load_image, spec.image, match="NaN or infinite")  # prediction input


def test_load_image_returns_the_header_for_writing_outputs(tmp_path):
    image, _ = phantom()
    loaded, affine, header = load_image(save(tmp_path / "in.nii.gz", image[..., None]))
    assert loaded.dtype == np.float32 and np.array_equal(loaded, image)
    np.testing.assert_allclose(affine, AFFINE)
    np.testing.assert_allclose(header.get_best_affine(), AFFINE)
    assert header.get_data_dtype() == np.int16


def test_undeclared_label_values(tmp_path):
    image, label = phantom()
    label[0, 0, 0] = 7
    spec, lm = msd_case(tmp_path, image, label)
    expect_error(spec.label, load_case, spec, lm, opts(), match="label values 7 are not among the declared")
    save(spec.label, label.astype(np.float32) + 0.5 * (label == 7))
    expect_error(spec.label, load_case, spec, lm, opts(), match="non-integer")


def test_empty_label_after_mapping(tmp_path):
    image, label = phantom()
    spec, lm = one_case(tmp_path, image, label, spec="kidney=5")
    expect_error(spec.label, load_case, spec, lm, opts(), match="empty after mapping")
    _, mapped, _ = load_case(spec, lm, opts(require_foreground=False))
    assert not mapped.any()


def test_totalseg_masks_are_merged_and_validated(tmp_path):
    image, label = phantom()
    case = tmp_path / "s0001"
    save(case / "ct.nii.gz", image)
    save(case / "segmentations" / "kidney_left.nii.gz", (label == 1).astype(np.uint8))
    save(case / "segmentations" / "kidney_right.nii.gz", (label == 2).astype(np.uint8))
    save(case / "segmentations" / "liver.nii.gz", np.zeros_like(label))
    src = detect_layout(case)
    lm = parse_label_map("right=kidney_right;left=kidney_left", src)
    _, mapped, _ = load_case(src.cases[0], lm, opts())
    assert np.array_equal(mapped, np.where(label == 2, 1, np.where(label == 1, 2, 0)))
    save(case / "segmentations" / "kidney_left.nii.gz", label)  # values 0, 1, 2: not a mask
    expect_error(case / "segmentations" / "kidney_left.nii.gz", load_case, src.cases[0], lm, opts(),
                 match="not binary")
    (case / "segmentations" / "kidney_left.nii.gz").unlink()
    expect_error(case / "segmentations" / "kidney_left.nii.gz", load_case, src.cases[0], lm, opts(),
                 match="file not found")
    # A case of a multi-case dataset that lacks a structure the label map asks for.
    lacking = CaseSpec("s0001", case / "ct.nii.gz", None,
                       {"kidney_right": case / "segmentations" / "kidney_right.nii.gz"})
    expect_error(case / "segmentations" / "kidney_left.nii.gz", load_case, lacking, lm, opts(),
                 match="structure mask of case s0001 is missing")


# ---------------------------------------------------------------- processing


def test_ct_normalisation_crop_and_foreground_sampling(tmp_path):
    image, label = phantom()
    spec, lm = one_case(tmp_path, image, label)
    o = opts(crop_margin_mm=1.6, foreground_samples=50)  # margin: 2 voxels in x, y and 1 in z
    rec = preprocess_case(spec, lm, o, seed=7)
    assert rec.normalisation == pytest.approx({"clip_low": -1000, "clip_high": 1000, "mean": 50.0, "std": 50.0})
    # The body box grown by the margin; the table (y 26..28) lies outside it.
    assert rec.geometry.crop_start == (6, 4, 2) and rec.geometry.crop_stop == (32, 24, 14)
    body = rec.image[2:-2, 2:-2, 1:-1]
    assert set(np.unique(body).tolist()) == {-1.0, 1.0}
    assert rec.image.min() == pytest.approx((-1000 - 50) / 50)
    assert rec.image.dtype == np.float32 and rec.label.dtype == np.uint8
    assert np.array_equal(rec.label, label[6:32, 4:24, 2:14])
    for value in (1, 2):
        coords = rec.foreground[value]
        assert coords.dtype == np.int32 and coords.shape == (min(50, int((label == value).sum())), 3)
        assert np.all(rec.label[tuple(coords.T)] == value)
        assert len({tuple(c) for c in coords.tolist()}) == len(coords)  # without replacement
    again = preprocess_case(spec, lm, o, seed=7).foreground[1]
    other = preprocess_case(spec, lm, o, seed=8).foreground[1]
    assert np.array_equal(again, rec.foreground[1]) and not np.array_equal(other, rec.foreground[1])


def test_labels_outside_the_body_stay_in_the_crop(tmp_path):
    image, label = phantom()
    label[0:2, 0:2, 0:2] = 2  # in the air, far from the body
    spec, lm = one_case(tmp_path, image, label)
    rec = preprocess_case(spec, lm, opts(crop_margin_mm=0.0), seed=0)
    assert rec.geometry.crop_start == (0, 0, 0)
    assert (rec.label == 2).sum() == (label == 2).sum()


def test_mr_normalisation_is_a_body_z_score(tmp_path):
    image = np.zeros((30, 30, 12), np.float32)
    image[5:25, 5:25, 2:10] = np.linspace(200, 600, 20)[:, None, None]
    label = np.zeros(image.shape, np.uint8)
    label[10:15, 10:15, 4:8] = 1
    spec, lm = one_case(tmp_path, image, label, spec="organ=1")
    rec = preprocess_case(spec, lm, opts(modality="MR", crop_margin_mm=0.0), seed=0)
    assert set(rec.normalisation) == {"mean", "std"}
    assert rec.image.shape == (20, 20, 8)
    assert rec.image.mean() == pytest.approx(0.0, abs=1e-5) and rec.image.std() == pytest.approx(1.0, abs=1e-4)


def test_ras_and_lps_files_give_identical_records(tmp_path):
    image, label = phantom()
    ras_img, ras_lab = nib.Nifti1Image(image, AFFINE), nib.Nifti1Image(label, AFFINE)
    to_lps = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt("LPS"))
    records = []
    for name, (im, lab) in {"ras": (ras_img, ras_lab), "lps": (ras_img.as_reoriented(to_lps),
                                                                ras_lab.as_reoriented(to_lps))}.items():
        folder = tmp_path / name
        folder.mkdir()
        src = csv_source(folder, save(folder / "i.nii.gz", np.asanyarray(im.dataobj), im.affine),
                         save(folder / "l.nii.gz", np.asanyarray(lab.dataobj), lab.affine))
        records.append(preprocess_case(src.cases[0], parse_label_map("organ=1;other=2", src),
                                       opts(target_spacing=(1.0, 1.0, 1.0)), seed=3))
    ras, lps = records
    assert lps.geometry.original_axcodes == "LPS" and ras.geometry.original_axcodes == "RAS"
    assert np.array_equal(ras.image, lps.image) and np.array_equal(ras.label, lps.label)
    np.testing.assert_allclose(ras.geometry.affine, lps.geometry.affine, atol=1e-4)  # float32 in NIfTI


def test_case_statistics_counts_voxels_and_millilitres():
    label = np.zeros((10, 10, 10), np.uint8)
    label[:2, :3, :4] = 1
    label[5, 5, 5] = 2
    stats = case_statistics(label, np.diag([0.5, 2.0, 3.0, 1.0]), {"background": 0, "a": 1, "b": 2, "c": 3})
    assert stats["voxels"] == {"a": 24, "b": 1, "c": 0}
    assert stats["volume_ml"] == pytest.approx({"a": 24 * 3.0 / 1000, "b": 3.0 / 1000, "c": 0.0})


# ---------------------------------------------------------------- real CT


@pytest.fixture(scope="module")
def real_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz"):
        shutil.copy(REAL / name, folder / name)
    (folder / "cases.csv").write_text("case_id,image,label\nexample,example_ct_sm.nii.gz,example_seg.nii.gz\n")
    src = detect_layout(folder / "cases.csv")
    return src.cases[0], parse_label_map("kidney=2,3;psoas=88,89", src)


def test_real_ct_volumes_match_a_direct_count(real_case):
    spec, lm = real_case
    o = opts(target_spacing=(1.5, 1.5, 1.5))
    image, label, affine = load_case(spec, lm, o)
    stats = case_statistics(label, affine, lm.names)
    seg = nib.load(str(spec.label))
    raw = np.asanyarray(seg.dataobj)
    voxel_ml = float(np.prod(seg.header.get_zooms()[:3])) / 1000.0
    for name, values in {"kidney": (2, 3), "psoas": (88, 89)}.items():
        direct = int(np.isin(raw, values).sum())
        assert direct > 0 and stats["voxels"][name] == direct
        assert stats["volume_ml"][name] == pytest.approx(direct * voxel_ml)

    rec = preprocess_case(spec, lm, o, seed=0)
    assert rec.geometry.original_axcodes == "RAS" and rec.geometry.spacing == (1.5, 1.5, 1.5)
    np.testing.assert_allclose(geo.voxel_spacing(rec.geometry.affine), 1.5)
    # 3 mm -> 1.5 mm resamples each class's mask trilinearly (corners round off a little): volumes
    # stay within a few percent, and the way back onto the original grid keeps Dice >= 0.95.
    shard_stats = case_statistics(rec.label, rec.geometry.affine, lm.names)
    assert shard_stats["volume_ml"] == pytest.approx(stats["volume_ml"], rel=0.05)
    back = geo.to_original_grid(rec.label, rec.geometry)
    for value in (1, 2):
        both = np.logical_and(back == value, label == value).sum()
        assert 2 * both / ((back == value).sum() + (label == value).sum()) >= 0.95
    # The crop box lies inside the resampled grid (the volumes above show it kept every label).
    g = rec.geometry
    assert rec.image.shape == tuple(b - a for a, b in zip(g.crop_start, g.crop_stop))
    assert all(0 <= a < b <= n for a, b, n in zip(g.crop_start, g.crop_stop, g.resampled_shape))
    assert rec.normalisation["clip_low"] == -1000 and 0 < rec.normalisation["std"]
    assert set(rec.foreground) == {1, 2} and all(len(c) > 0 for c in rec.foreground.values())
