"""``data-tools export-nnunet``: the shards' cases in nnU-Net v2's raw layout, accepted by nnU-Net's own check."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from data_tools.__main__ import main
from ds_seg3d.data.shard_format import load_manifest


def test_export_keeps_the_split_and_the_labels_and_nnunet_accepts_it(kidney_shards: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    assert main(["export-nnunet", str(kidney_shards), str(raw), "--dataset-id", "777"]) == 0
    manifest = load_manifest(kidney_shards)
    folder = raw / f"Dataset777_{manifest['name']}"
    splits = manifest["splits"]
    train, val, test = splits["train"], splits["val"], splits["test"]

    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT"} and dataset["labels"] == manifest["labels"]
    assert dataset["numTraining"] == len(train) + len(val) and dataset["file_ending"] == ".nii.gz"
    assert json.loads((folder / "splits_final.json").read_text()) == [{"train": train, "val": val}]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == sorted(f"{c}_0000.nii.gz" for c in train + val)
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == sorted(f"{c}.nii.gz" for c in test)
    for case in train + val + test:
        where = "Tr" if case in train + val else "Ts"
        source = manifest["cases"][case]
        image = folder / f"images{where}" / f"{case}_0000.nii.gz"
        assert image.read_bytes() == Path(source["image"]).read_bytes()  # the image as it was
        label, truth = nib.load(folder / f"labels{where}" / f"{case}.nii.gz"), nib.load(source["label"])
        assert np.allclose(label.affine, nib.load(image).affine)
        assert np.array_equal(np.asarray(label.dataobj), np.asarray(truth.dataobj).astype(np.uint8))
        assert set(np.unique(np.asarray(label.dataobj))) <= set(manifest["labels"].values())
    assert not list(raw.glob(".tmp-*"))

    # Written once: a second export into the same place is refused.
    assert main(["export-nnunet", str(kidney_shards), str(raw), "--dataset-id", "777"]) == 2

    # nnU-Net's own integrity check and fingerprint, in environment variables of this run only.
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "res"), "nnUNet_n_proc_DA": "1"}
    tool = shutil.which("nnUNetv2_extract_fingerprint", path=str(Path(sys.executable).parent))
    assert tool, "nnunetv2 is not installed (the bench extra)"
    proc = subprocess.run([tool, "-d", "777", "--verify_dataset_integrity", "-np", "1"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    fingerprint = json.loads((tmp_path / "pre" / folder.name / "dataset_fingerprint.json").read_text())
    assert len(fingerprint["shapes_after_crop"]) == len(train) + len(val)
