"""Source layouts and label maps: MSD, nnU-Net v2, TotalSegmentator-style folders and CSV lists."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_tools.layouts import detect_layout, parse_label_map
from ds_seg3d.data.errors import DataError


def write_nifti(path: Path, data: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros((4, 4, 3), np.uint8) if data is None else data
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def assert_names(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(path) + ": ")


def make_msd(root: Path, modality: str = "CT", cases=("liver_1", "liver_2")) -> Path:
    for c in cases:
        write_nifti(root / "imagesTr" / f"{c}.nii.gz")
        write_nifti(root / "labelsTr" / f"{c}.nii.gz")
    meta = {"name": "Task03_Liver", "modality": {"0": modality},
            "labels": {"0": "background", "1": "liver", "2": "cancer"},
            "numTraining": len(cases),
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_nnunet(root: Path, cases=("kid_001", "kid_002", "kid_003"), channel="CT") -> Path:
    for c in cases:
        write_nifti(root / "imagesTr" / f"{c}_0000.nii.gz")
        write_nifti(root / "labelsTr" / f"{c}.nii.gz")
    meta = {"channel_names": {"0": channel}, "labels": {"background": 0, "kidney": 1, "tumor": 2},
            "numTraining": len(cases), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_totalseg_case(folder: Path, structures=("kidney_left", "kidney_right", "liver")) -> Path:
    write_nifti(folder / "ct.nii.gz", np.zeros((4, 4, 3), np.int16))
    for s in structures:
        write_nifti(folder / "segmentations" / f"{s}.nii.gz")
    return folder


def make_csv(tmp_path: Path, rows: list[str], header: str = "case_id,image,label") -> Path:
    for name in ("img/a.nii.gz", "lab/a.nii.gz", "img/b.nii.gz", "lab/b.nii.gz"):
        write_nifti(tmp_path / name)
    path = tmp_path / "cases.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_msd_layout(tmp_path):
    src = detect_layout(make_msd(tmp_path / "Task03_Liver"))
    assert src.layout == "msd" and src.name == "Task03_Liver" and src.modality == "CT"
    assert src.labels == {"background": 0, "liver": 1, "cancer": 2}
    assert [c.case_id for c in src.cases] == ["liver_1", "liver_2"]
    assert src.cases[0].image == tmp_path / "Task03_Liver" / "imagesTr" / "liver_1.nii.gz"
    assert src.cases[0].label.name == "liver_1.nii.gz" and src.cases[0].label.parent.name == "labelsTr"


@pytest.mark.parametrize("name,expected", [("MRI", "MR"), ("T2", "MR"), ("CT", "CT"), ("non-contrast CT", "CT")])
def test_modality_from_dataset_json(tmp_path, name, expected):
    assert detect_layout(make_msd(tmp_path, modality=name)).modality == expected


def test_msd_missing_listed_case_names_the_file(tmp_path):
    root = make_msd(tmp_path)
    (root / "labelsTr" / "liver_2.nii.gz").unlink()
    with pytest.raises(DataError) as err:
        detect_layout(root)
    assert_names(err, root / "labelsTr" / "liver_2.nii.gz")


def test_msd_multichannel_is_refused(tmp_path):
    root = make_msd(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "T2", "1": "ADC"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="single-channel") as err:
        detect_layout(root)
    assert_names(err, root / "dataset.json")


def test_nnunet_layout(tmp_path):
    src = detect_layout(make_nnunet(tmp_path / "Dataset042_Kidney", channel="MRI"))
    assert src.layout == "nnunet" and src.modality == "MR"
    assert src.labels == {"background": 0, "kidney": 1, "tumor": 2}
    assert [c.case_id for c in src.cases] == ["kid_001", "kid_002", "kid_003"]
    assert src.cases[1].image.name == "kid_002_0000.nii.gz" and src.cases[1].label.name == "kid_002.nii.gz"


def test_nnunet_missing_label_and_count_mismatch(tmp_path):
    root = make_nnunet(tmp_path / "a")
    (root / "labelsTr" / "kid_002.nii.gz").unlink()
    with pytest.raises(DataError) as err:
        detect_layout(root)
    assert_names(err, root / "labelsTr" / "kid_002.nii.gz")

    root = make_nnunet(tmp_path / "b")
    (root / "imagesTr" / "kid_003_0000.nii.gz").unlink()
    (root / "labelsTr" / "kid_003.nii.gz").unlink()
    with pytest.raises(DataError, match="numTraining is 3") as err:
        detect_layout(root)
    assert_names(err, root / "dataset.json")


def test_totalseg_single_case_and_folder_of_cases(tmp_path):
    one = detect_layout(make_totalseg_case(tmp_path / "s0011"))
    assert one.layout == "totalseg" and one.modality == "CT" and [c.case_id for c in one.cases] == ["s0011"]
    assert one.cases[0].label is None
    assert set(one.cases[0].label_parts) == {"kidney_left", "kidney_right", "liver"}

    root = tmp_path / "Totalsegmentator_dataset"
    make_totalseg_case(root / "s0001", ("liver", "spleen"))
    make_totalseg_case(root / "s0002", ("liver", "kidney_left"))
    (root / "meta.csv").write_text("image_id\ns0001\ns0002\n")
    many = detect_layout(root)
    assert [c.case_id for c in many.cases] == ["s0001", "s0002"]
    assert many.labels == {"background": 0, "kidney_left": 1, "liver": 2, "spleen": 3}


def test_totalseg_case_without_image_names_it(tmp_path):
    root = tmp_path / "ds"
    make_totalseg_case(root / "s0001")
    make_totalseg_case(root / "s0002")
    (root / "s0002" / "ct.nii.gz").unlink()
    with pytest.raises(DataError) as err:
        detect_layout(root)
    assert_names(err, root / "s0002" / "ct.nii.gz")


def test_csv_layout_with_relative_paths(tmp_path):
    path = make_csv(tmp_path, ["a,img/a.nii.gz,lab/a.nii.gz", "b,img/b.nii.gz,lab/b.nii.gz"])
    src = detect_layout(path)
    assert src.layout == "csv" and src.modality == "CT" and src.labels == {}
    assert [(c.case_id, c.image, c.label) for c in src.cases] == [
        ("a", tmp_path / "img/a.nii.gz", tmp_path / "lab/a.nii.gz"),
        ("b", tmp_path / "img/b.nii.gz", tmp_path / "lab/b.nii.gz")]


def test_csv_errors(tmp_path):
    path = make_csv(tmp_path, ["a,img/a.nii.gz,lab/missing.nii.gz"])
    with pytest.raises(DataError) as err:
        detect_layout(path)
    assert_names(err, tmp_path / "lab/missing.nii.gz")
    path = make_csv(tmp_path, ["a,img/a.nii.gz,lab/a.nii.gz"], header="id,img,seg")
    with pytest.raises(DataError, match="header") as err:
        detect_layout(path)
    assert_names(err, path)
    path = make_csv(tmp_path, ["a,img/a.nii.gz,lab/a.nii.gz", "a,img/b.nii.gz,lab/b.nii.gz"])
    with pytest.raises(DataError, match="twice"):
        detect_layout(path)


def test_unknown_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no known layout") as err:
        detect_layout(tmp_path)
    assert_names(err, tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")


def test_label_map_by_values_orders_shard_labels_as_given(tmp_path):
    src = detect_layout(make_csv(tmp_path, ["a,img/a.nii.gz,lab/a.nii.gz"]))
    lm = parse_label_map("psoas=88,89; kidney=2,3", src)
    assert lm.names == {"background": 0, "psoas": 1, "kidney": 2}
    assert lm.source_values == {88: 1, 89: 1, 2: 2, 3: 2}
    assert lm.declared_values is None  # a CSV declares nothing, so nothing can be undeclared


def test_label_map_by_names_and_identity(tmp_path):
    src = detect_layout(make_msd(tmp_path / "msd"))
    lm = parse_label_map("organ=liver,cancer", src)
    assert lm.names == {"background": 0, "organ": 1} and lm.source_values == {1: 1, 2: 1}
    ident = parse_label_map(None, src)
    assert ident.names == {"background": 0, "liver": 1, "cancer": 2}
    assert ident.source_values == {1: 1, 2: 2} and ident.declared_values == {0, 1, 2}


def test_label_map_by_totalseg_structures(tmp_path):
    src = detect_layout(make_totalseg_case(tmp_path / "s1", ("kidney_left", "kidney_right", "liver", "spleen")))
    lm = parse_label_map("kidney=kidney_left,kidney_right;liver=liver", src)
    assert lm.names == {"background": 0, "kidney": 1, "liver": 2}
    assert lm.structures == {"kidney_left": 1, "kidney_right": 1, "liver": 2}
    assert set(parse_label_map(None, src).structures) == {"kidney_left", "kidney_right", "liver", "spleen"}


@pytest.mark.parametrize("spec,problem", [
    ("kidney", "expected name=a,b"),
    ("kidney=", "expected name=a,b"),
    ("kidney=liverish", "unknown label 'liverish'"),
    ("kidney=7", "source value 7 is not declared"),
    ("a=1;a=2", "names 'a' twice"),
    ("a=1;b=1", "assigned twice"),
    ("a=0", "background"),
    ("background=1", "reserved"),
])
def test_label_map_errors(tmp_path, spec, problem):
    src = detect_layout(make_msd(tmp_path))
    with pytest.raises(DataError, match=problem) as err:
        parse_label_map(spec, src)
    assert_names(err, tmp_path)


def test_csv_without_labels_needs_a_label_map(tmp_path):
    src = detect_layout(make_csv(tmp_path, ["a,img/a.nii.gz,lab/a.nii.gz"]))
    with pytest.raises(DataError, match="--labels"):
        parse_label_map(None, src)
    with pytest.raises(DataError, match="declares no label names"):
        parse_label_map("kidney=kidney_left", src)
