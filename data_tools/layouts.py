"""Source layouts: find the cases of an MSD/nnU-Net folder, a TotalSegmentator-style folder or a CSV.

INTERFACE (filled in by the implementation below this line; keep these names):

    @dataclass
    class CaseSpec:
        case_id: str
        image: Path                         # NIfTI image
        label: Path | None                  # one label map, or None for per-structure label files
        label_parts: dict[str, Path]        # TotalSegmentator: structure name -> binary mask file

    @dataclass
    class SourceDataset:
        layout: str                         # "msd" | "nnunet" | "totalseg" | "csv"
        root: Path
        name: str
        modality: str                       # "CT" | "MR"
        labels: dict[str, int]              # declared labels of the SOURCE, name -> value (background 0)
        cases: list[CaseSpec]

    def detect_layout(src: Path) -> SourceDataset       # DataError when nothing matches

    @dataclass
    class LabelMap:                         # source values/structures -> shard label values
        names: dict[str, int]               # shard label name -> shard value, background 0 included
        source_values: dict[int, int]       # source value -> shard value (unlisted source values -> 0)
        structures: dict[str, int]          # TotalSegmentator structure name -> shard value

    def parse_label_map(spec: str | None, source: SourceDataset) -> LabelMap
        # spec "kidney=2,3;psoas=88,89" (values) or "kidney=kidney_left,kidney_right" (structures);
        # None: identity on the declared labels.

Layout rules: a folder with ``dataset.json`` is MSD when its labels read ``{"0": "background"}`` and
nnU-Net v2 when they read ``{"background": 0}``; a folder holding ``ct.nii.gz`` (or ``mri.nii.gz``)
and ``segmentations/`` is one TotalSegmentator case, a folder of such folders is a dataset; a
``.csv`` file lists ``case_id,image,label`` with paths relative to the CSV. Only single-channel
NIfTI sources are supported. A CSV declares no labels (``labels`` is empty), so its label map must
be given explicitly.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from ds_seg3d.data.errors import DataError

NIFTI_ENDINGS = (".nii.gz", ".nii")
TOTALSEG_IMAGES = {"ct.nii.gz": "CT", "mri.nii.gz": "MR"}
TOTALSEG_MASKS = "segmentations"
CSV_COLUMNS = ("case_id", "image", "label")
MAX_SHARD_LABEL = 255  # shard labels are uint8
_CASE_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclasses.dataclass
class CaseSpec:
    case_id: str
    image: Path
    label: Path | None
    label_parts: dict[str, Path] = dataclasses.field(default_factory=dict)

    @property
    def label_source(self) -> Path:
        """The file (or mask folder) that label errors should name."""
        if self.label is not None:
            return self.label
        return self.image.parent / TOTALSEG_MASKS


@dataclasses.dataclass
class SourceDataset:
    layout: str
    root: Path
    name: str
    modality: str
    labels: dict[str, int]
    cases: list[CaseSpec]


@dataclasses.dataclass
class LabelMap:
    names: dict[str, int]
    source_values: dict[int, int]
    structures: dict[str, int] = dataclasses.field(default_factory=dict)
    # Every value the source may contain (background included); None when the source declares none.
    declared_values: frozenset[int] | None = None

    @property
    def foreground(self) -> dict[str, int]:
        return {n: v for n, v in self.names.items() if v > 0}


def strip_nifti(name: str) -> str:
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return name


def _check_case_id(case_id: str, where: Path) -> str:
    # Case ids become HDF5 group names and file names: keep them to a portable alphabet.
    if not _CASE_ID.match(case_id):
        raise DataError(where, f"case id {case_id!r} may only hold letters, digits, '_', '-' and '.'")
    return case_id


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(path, f"{what} is missing")
    return path


def modality_of(name: str) -> str:
    """nnU-Net's convention: "CT" gets CT normalisation, every other channel (MR, T1, T2, ...) a z-score."""
    return "CT" if "CT" in re.split(r"[^A-Z0-9]+", name.upper()) else "MR"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise DataError(path, f"cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise DataError(path, "expected a JSON object at the top level")
    return data


def _single_modality(meta: dict[str, Any], path: Path) -> str:
    channels = meta.get("channel_names", meta.get("modality", {"0": "CT"}))
    if not isinstance(channels, dict) or not channels:
        raise DataError(path, "'channel_names'/'modality' must map channel index to a name")
    if len(channels) != 1:
        raise DataError(path, f"{len(channels)} input channels ({', '.join(map(str, channels.values()))}); "
                              "only single-channel sources are supported")
    return modality_of(str(next(iter(channels.values()))))


def _msd_labels(raw: dict[str, Any], path: Path) -> dict[str, int]:
    labels = {}
    for key, name in raw.items():
        try:
            labels[str(name)] = int(key)
        except ValueError:
            raise DataError(path, f"label key {key!r} is not an integer") from None
    return labels


def _nnunet_labels(raw: dict[str, Any], path: Path) -> dict[str, int]:
    labels = {}
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise DataError(path, f"label {name!r} is a region ({value}); region-based labels are not supported")
        try:
            labels[str(name)] = int(value)
        except (TypeError, ValueError):
            raise DataError(path, f"label {name!r} has a non-integer value {value!r}") from None
    return labels


def _msd_cases(meta: dict[str, Any], root: Path, path: Path) -> list[CaseSpec]:
    entries = meta.get("training")
    if not isinstance(entries, list) or not entries:
        raise DataError(path, "no 'training' list of {image, label} entries")
    cases = []
    for entry in entries:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(path, f"training entry {entry!r} lacks 'image' or 'label'")
        image = _require(root / entry["image"], "image listed in dataset.json")
        label = _require(root / entry["label"], "label listed in dataset.json")
        cases.append(CaseSpec(_check_case_id(strip_nifti(image.name), path), image, label))
    return cases


def _nnunet_cases(meta: dict[str, Any], root: Path, path: Path) -> list[CaseSpec]:
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in NIFTI_ENDINGS:
        raise DataError(path, f"file_ending {ending!r}: only NIfTI ({', '.join(NIFTI_ENDINGS)}) is supported")
    cases = []
    if isinstance(meta.get("dataset"), dict):  # explicit case list (nnU-Net v2 "dataset" key)
        for case_id, entry in meta["dataset"].items():
            images = entry.get("images") or []
            if len(images) != 1 or "label" not in entry:
                raise DataError(path, f"case {case_id!r} must list exactly one image and a label")
            image = _require(root / images[0], "image listed in dataset.json")
            label = _require(root / entry["label"], "label listed in dataset.json")
            cases.append(CaseSpec(_check_case_id(case_id, path), image, label))
        return cases
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise DataError(images_dir, "folder is missing")
    suffix = "_0000" + ending
    for image in sorted(images_dir.glob("*" + suffix)):
        case_id = image.name[: -len(suffix)]
        label = _require(root / "labelsTr" / (case_id + ending), f"label of case {case_id}")
        cases.append(CaseSpec(_check_case_id(case_id, path), image, label))
    declared = meta.get("numTraining")
    if declared is not None and int(declared) != len(cases):
        raise DataError(path, f"numTraining is {declared} but {images_dir} holds {len(cases)} "
                              f"'*{suffix}' images")
    if not cases:
        raise DataError(images_dir, f"no '*{suffix}' images")
    return cases


def _from_dataset_json(root: Path) -> SourceDataset:
    path = root / "dataset.json"
    meta = _read_json(path)
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DataError(path, "no 'labels' object")
    is_msd = all(str(k).lstrip("-").isdigit() for k in raw) and "file_ending" not in meta
    if is_msd:
        labels, layout, cases = _msd_labels(raw, path), "msd", _msd_cases(meta, root, path)
    else:
        labels, layout, cases = _nnunet_labels(raw, path), "nnunet", _nnunet_cases(meta, root, path)
    if 0 not in labels.values():
        raise DataError(path, "labels declare no background (value 0)")
    return SourceDataset(layout, root, str(meta.get("name", root.name)), _single_modality(meta, path),
                         dict(sorted(labels.items(), key=lambda kv: kv[1])), cases)


def _totalseg_image(folder: Path) -> tuple[Path, str] | None:
    for name, modality in TOTALSEG_IMAGES.items():
        if (folder / name).is_file():
            return folder / name, modality
    return None


def _totalseg_case(folder: Path) -> tuple[CaseSpec, str]:
    found = _totalseg_image(folder)
    if found is None:
        raise DataError(folder / "ct.nii.gz", "image is missing (a TotalSegmentator case holds ct.nii.gz "
                                              "or mri.nii.gz)")
    image, modality = found
    masks = folder / TOTALSEG_MASKS
    if not masks.is_dir():
        raise DataError(masks, "folder of structure masks is missing")
    parts = {strip_nifti(p.name): p for p in sorted(masks.iterdir()) if p.name.endswith(NIFTI_ENDINGS)}
    if not parts:
        raise DataError(masks, "holds no .nii.gz structure masks")
    return CaseSpec(_check_case_id(folder.name, folder), image, None, parts), modality


def _from_totalseg(root: Path, folders: list[Path]) -> SourceDataset:
    cases, modalities = [], set()
    for folder in folders:
        case, modality = _totalseg_case(folder)
        cases.append(case)
        modalities.add(modality)
    if len(modalities) > 1:
        raise DataError(root, "mixes CT (ct.nii.gz) and MR (mri.nii.gz) cases")
    # TotalSegmentator ships no label numbering with the masks: number the structures by name.
    structures = sorted(set().union(*(c.label_parts for c in cases)))
    labels = {"background": 0, **{name: i + 1 for i, name in enumerate(structures)}}
    return SourceDataset("totalseg", root, root.name, modalities.pop(), labels, cases)


def _from_csv(path: Path) -> SourceDataset:
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read ({e})") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows or tuple(c.strip() for c in rows[0]) != CSV_COLUMNS:
        raise DataError(path, f"header must be {','.join(CSV_COLUMNS)}")
    cases, seen = [], set()
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 3 or not all(c.strip() for c in row):
            raise DataError(path, f"line {line}: expected 3 non-empty fields, got {row}")
        case_id, image, label = (c.strip() for c in row)
        if case_id in seen:
            raise DataError(path, f"line {line}: case id {case_id!r} appears twice")
        seen.add(case_id)
        cases.append(CaseSpec(_check_case_id(case_id, path),
                              _require(path.parent / image, f"image of case {case_id} (line {line} of {path.name})"),
                              _require(path.parent / label, f"label of case {case_id} (line {line} of {path.name})")))
    if not cases:
        raise DataError(path, "lists no cases")
    return SourceDataset("csv", path.parent, path.stem, "CT", {}, cases)


def detect_layout(src: str | Path) -> SourceDataset:
    """Recognise the layout of ``src`` and list its cases; every listed file is checked to exist."""
    src = Path(src)
    if src.is_file() and src.suffix.lower() == ".csv":
        return _from_csv(src)
    if not src.is_dir():
        raise DataError(src, "not a folder or a .csv file" if src.exists() else "does not exist")
    if (src / "dataset.json").is_file():
        return _from_dataset_json(src)
    if _totalseg_image(src) is not None or (src / TOTALSEG_MASKS).is_dir():
        return _from_totalseg(src, [src])
    folders = [p for p in sorted(src.iterdir()) if p.is_dir()
               and (_totalseg_image(p) is not None or (p / TOTALSEG_MASKS).is_dir())]
    if folders:
        return _from_totalseg(src, folders)
    raise DataError(src, "no known layout: expected dataset.json (MSD/nnU-Net), ct.nii.gz + segmentations/ "
                         "(TotalSegmentator), folders of such cases, or a CSV with header case_id,image,label")


def _parse_entries(spec: str, where: Path) -> list[tuple[str, list[str]]]:
    entries = []
    for part in spec.split(";"):
        if not part.strip():
            continue
        name, sep, tokens = part.partition("=")
        name = name.strip()
        items = [t.strip() for t in tokens.split(",") if t.strip()]
        if not sep or not name or not items:
            raise DataError(where, f"label map entry {part.strip()!r}: expected name=a,b,... "
                                   "(entries separated by ';')")
        if name == "background":
            raise DataError(where, "label map: 'background' is reserved for value 0")
        entries.append((name, items))
    if not entries:
        raise DataError(where, f"label map {spec!r} names no labels")
    return entries


def _resolve(token: str, source: SourceDataset, where: Path) -> int:
    """A source value, given as a number or as a declared label / structure name."""
    if re.fullmatch(r"\d+", token):
        value = int(token)
        if source.labels and value not in source.labels.values():
            raise DataError(where, f"label map: source value {value} is not declared "
                                   f"(declared: {', '.join(map(str, sorted(source.labels.values())))})")
        return value
    if token not in source.labels:
        if not source.labels:
            raise DataError(where, f"label map: {token!r} is a name but this source declares no label names; "
                                   "give source values")
        shown = ", ".join(list(source.labels)[:12]) + (", ..." if len(source.labels) > 12 else "")
        raise DataError(where, f"label map: unknown label {token!r} (declared: {shown})")
    return source.labels[token]


def parse_label_map(spec: str | None, source: SourceDataset) -> LabelMap:
    """Turn ``--labels`` into a LabelMap; shard values are 1..K in the order the labels are given.

    Without a spec every declared foreground label becomes its own shard label (in the order of its
    source value); a CSV declares none, so it needs a spec.
    """
    where = source.root
    if spec is None:
        if not source.labels:
            raise DataError(where, f"{source.layout} source declares no labels: pass --labels, "
                                   "e.g. 'kidney=2,3;psoas=88,89'")
        entries = [(n, [str(v)]) for n, v in sorted(source.labels.items(), key=lambda kv: kv[1]) if v != 0]
    else:
        entries = _parse_entries(spec, where)
    if len(entries) > MAX_SHARD_LABEL:
        raise DataError(where, f"label map has {len(entries)} labels; shards hold at most {MAX_SHARD_LABEL}")
    names: dict[str, int] = {"background": 0}
    source_values: dict[int, int] = {}
    for shard_value, (name, tokens) in enumerate(entries, start=1):
        if name in names:
            raise DataError(where, f"label map names {name!r} twice")
        names[name] = shard_value
        for token in tokens:
            value = _resolve(token, source, where)
            if value == 0:
                raise DataError(where, f"label map: {name!r} would take the background (value 0)")
            if value in source_values:
                raise DataError(where, f"label map: source value {value} ({token!r}) is assigned twice")
            source_values[value] = shard_value
    structures = {}
    if source.layout == "totalseg":
        by_value = {v: n for n, v in source.labels.items()}
        structures = {by_value[v]: s for v, s in source_values.items()}
    declared = frozenset(source.labels.values()) | {0} if source.labels else None
    return LabelMap(names, source_values, structures, declared)
