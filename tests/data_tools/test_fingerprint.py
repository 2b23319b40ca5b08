"""The dataset fingerprint of build-shards and nnU-Net's CT normalisation that it feeds."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_tools.build_shards import build_shards
from data_tools.fingerprint import INTENSITY_SAMPLES, case_seed
from data_tools.phantoms import write_msd_dataset
from ds_seg3d.data import shard_format as sf
from ds_seg3d.data.geometry import component_count
from ds_seg3d.data.preprocess import IntensityProperties, PreprocessOptions, foreground_intensities, preprocess_arrays
from ds_seg3d.data.reader import ShardReader
from ds_seg3d.paths import SAMPLE_CT_IMAGE, SAMPLE_CT_LABEL

KIDNEYS = (2, 3)  # TotalSegmentator's kidney_right, kidney_left in the sample CT


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fingerprint")
    src = write_msd_dataset(tmp / "src", "kidney", 6, 1, (64, 64, 32))
    return build_shards(src, tmp / "shards", spacing=(1.5, 1.5, 3.0), workers=1, seed=2, val_fraction=0.2,
                        test_fraction=0.2).parent


def test_fingerprint_samples_every_training_case_alike(shards: Path) -> None:
    m = sf.load_manifest(shards)
    fp = m["dataset_fingerprint"]
    train = sorted(set(m["cases"]) - set(m["splits"]["test"]))
    assert fp["cases"] == train and fp["samples_per_case"] == INTENSITY_SAMPLES
    samples = []
    for case in train:
        image = np.asarray(nib.load(m["cases"][case]["image"]).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(m["cases"][case]["label"]).dataobj)
        samples.append(foreground_intensities(image, label, INTENSITY_SAMPLES, case_seed(2, case)))
        assert fp["spacings"][case] == pytest.approx(m["cases"][case]["original_spacing"])
    assert IntensityProperties.of(np.concatenate(samples)).to_json() == pytest.approx(fp["foreground_intensity"])
    # the test cases' intensities stay out of the statistics every case is normalised with
    assert not set(m["splits"]["test"]) & set(fp["spacings"])
    counts = [component_count(np.asarray(nib.load(m["cases"][case]["label"]).dataobj) == 1) for case in train]
    assert fp["components"] == {"kidney": int(np.round(np.median(counts)))} == {"kidney": 2}  # left and right


def test_every_case_is_normalised_with_the_same_dataset_statistics(shards: Path) -> None:
    m = sf.load_manifest(shards)
    p = m["dataset_fingerprint"]["foreground_intensity"]
    reader = ShardReader(shards)
    for case in m["cases"]:
        norm = reader.normalisation(case)
        assert norm == pytest.approx({"clip_low": p["percentile_00_5"], "clip_high": p["percentile_99_5"],
                                      "mean": p["mean"], "std": p["std"]})
        hu = reader.read_case(case)[0] * norm["std"] + norm["mean"]
        assert hu.min() >= norm["clip_low"] - 1e-3 and hu.max() <= norm["clip_high"] + 1e-3


def _kidney_intensity(image: np.ndarray, label: np.ndarray, affine: np.ndarray, opts: PreprocessOptions) -> float:
    record = preprocess_arrays("ct", image, np.isin(label, KIDNEYS).astype(np.uint8), affine, opts, seed=0)
    return float(record.image[record.label > 0].mean())


def test_a_reframed_scan_meets_the_same_intensities_only_with_dataset_statistics() -> None:
    """The real CT, and the same CT with a third of its field of view cut away: per-case statistics move
    with the framing (the kidneys look brighter or darker); the dataset's do not."""
    ct, seg = nib.load(SAMPLE_CT_IMAGE), nib.load(SAMPLE_CT_LABEL)
    image, label = ct.get_fdata(dtype=np.float32), np.asarray(seg.dataobj)
    keep = image.shape[1] * 2 // 3  # drop the anterior third (RAS: high A): less fat and bowel, the same kidneys
    assert np.isin(label[:, keep:], KIDNEYS).sum() == 0
    stats = IntensityProperties.of(image[np.isin(label, KIDNEYS)])
    dataset = PreprocessOptions(target_spacing=(3.0, 3.0, 3.0), intensity=stats)
    per_case = PreprocessOptions(target_spacing=(3.0, 3.0, 3.0))
    whole = _kidney_intensity(image, label, ct.affine, dataset)
    framed = _kidney_intensity(image[:, :keep], label[:, :keep], ct.affine, dataset)
    assert framed == pytest.approx(whole, abs=1e-4)
    shift = _kidney_intensity(image[:, :keep], label[:, :keep], ct.affine, per_case) - \
        _kidney_intensity(image, label, ct.affine, per_case)
    assert abs(shift) > 0.02, shift  # the per-case z-score moves with the field of view


def test_predict_preprocesses_an_input_exactly_as_its_shard(shards: Path) -> None:
    """run.json carries the normalisation; an input read for prediction equals the case in the shard."""
    from ds_seg3d.inference.cases import InputCase, preprocess_options

    m = sf.load_manifest(shards)
    info = {"preprocessing": {k: m[k] for k in ("modality", "target_spacing", "normalisation")}}
    opts = preprocess_options(info)
    assert opts.intensity is not None and opts.intensity.mean == m["normalisation"]["mean"]
    reader = ShardReader(shards)
    case = m["splits"]["test"][0]
    read = InputCase.read(Path(m["cases"][case]["image"]), opts)
    assert np.allclose(read.image[0].numpy(), reader.read_case(case)[0], atol=1e-5)
