"""Build a shard folder from a NIfTI dataset: fingerprint, preprocess in worker processes, write shards,
manifest last.

Two passes over the cases, as nnU-Net plans and preprocesses: the first reads every case not held out
for testing and records the dataset fingerprint (voxel spacings, shapes, and intensities sampled from
the labelled voxels), from which CT normalisation takes its clip range, mean and standard deviation;
the second preprocesses every case with them. The fingerprint (``data_tools.fingerprint``) goes into
the manifest for planning.
The parent process is the only writer, so shard contents and order do not depend on ``workers``.
A build that fails or is interrupted removes what it wrote; the manifest is written last and
atomically, so a folder either holds a complete, checksummed dataset or no manifest at all.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm import tqdm

from data_tools.cases import case_statistics, load_case
from data_tools.fingerprint import case_seed, dataset_fingerprint, fingerprint_cases, median_spacing
from data_tools.layouts import CaseSpec, LabelMap, SourceDataset, detect_layout, parse_label_map
from data_tools.splits import make_splits
from data_tools.workers import ordered_map
from ds_seg3d.data.errors import DataError
from ds_seg3d.data.preprocess import IntensityProperties, PreprocessOptions, preprocess_arrays
from ds_seg3d.data.shard_format import (
    CODECS,
    DEFAULT_CHUNK,
    DEFAULT_CODEC,
    MANIFEST_NAME,
    SHARD_PATTERN,
    CaseRecord,
    ShardWriter,
    codec_options,
    load_manifest,
    sha256_file,
    write_manifest,
)
from ds_seg3d.planning.plans import PLANS_NAME

_TMP = ".tmp"
CT_NORMALISATIONS = ("dataset", "window")


def _shard_name_regex() -> re.Pattern[str]:
    """Recognise this tool's shard file names from the one pattern shard_format owns."""
    m = re.fullmatch(r"(.*)\{:0(\d+)d\}(.*)", SHARD_PATTERN)
    assert m, SHARD_PATTERN
    return re.compile(re.escape(m.group(1)) + r"\d{%s,}" % m.group(2) + re.escape(m.group(3)))


_SHARD_RE = _shard_name_regex()


def is_shard_name(name: str) -> bool:
    return _SHARD_RE.fullmatch(name) is not None


def _is_own_file(name: str) -> bool:
    base = name[:-len(_TMP)] if name.endswith(_TMP) else name
    return base in (MANIFEST_NAME, PLANS_NAME, ".tmp-" + PLANS_NAME) or is_shard_name(base)


def _prepare(job: tuple[CaseSpec, LabelMap, PreprocessOptions, int]) -> tuple[str, Any]:
    """Worker: statistics on the source grid, then the preprocessed record, from one read of the files.

    DataError travels back as (path, problem) rather than as the exception itself, which does not
    survive pickling between processes.
    """
    spec, label_map, opts, seed = job
    try:
        image, label, affine = load_case(spec, label_map, opts)
        stats = case_statistics(label, affine, label_map.names)
        record = preprocess_arrays(spec.case_id, image, label, affine, opts, seed,
                                   sorted(label_map.foreground.values()))
    except DataError as e:
        return "error", (e.path, e.problem)
    return "ok", (record, stats)


def _fingerprint(options: dict[str, Any], case_ids: Iterable[str]) -> dict[str, Any]:
    body = {"options": options, "cases": sorted(case_ids)}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, **body}


def _prepare_output(out: Path, fingerprint: dict[str, Any]) -> None:
    """Make OUT ready for this build: refuse another dataset's folder, clear this dataset's old files.

    The old manifest goes first, so no moment exists where a manifest points at half-written shards.
    """
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if not (p.is_file() and _is_own_file(p.name)))
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DataError(out, f"holds files that this tool did not write ({listed}); choose an empty folder")
    if (out / MANIFEST_NAME).exists():
        try:
            old = load_manifest(out).get("fingerprint", {})
        except ValueError as e:
            raise DataError(out, f"holds a manifest that cannot be read ({e}); choose an empty folder") from None
        if old.get("sha256") != fingerprint["sha256"]:
            raise DataError(out, f"holds a different dataset ({_difference(old, fingerprint)}); "
                                 f"choose an empty folder or delete this one")
        (out / MANIFEST_NAME).unlink()
    for p in out.iterdir():  # stale shards of an earlier build of this dataset, or of an unfinished one
        p.unlink()


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old.get("cases") != new["cases"]:
        return "other cases"
    old_opts = old.get("options", {})
    changed = sorted(k for k in set(old_opts) | set(new["options"]) if old_opts.get(k) != new["options"].get(k))
    return "built with other options: " + ", ".join(changed) if changed else "unknown build"


def _case_entry(spec: CaseSpec, rec: CaseRecord, stats: dict[str, Any], shard: str) -> dict[str, Any]:
    g = rec.geometry
    entry: dict[str, Any] = {
        "shard": shard, "shape": list(rec.image.shape), "spacing": list(g.spacing),
        "original_shape": list(g.original_shape), "original_spacing": list(g.original_spacing),
        "original_axcodes": g.original_axcodes,
        "voxels": {k: int(v) for k, v in stats["voxels"].items()},
        "volume_ml": {k: float(v) for k, v in stats["volume_ml"].items()},
        "image": str(spec.image.absolute()),
        "label": str(spec.label.absolute()) if spec.label is not None else None,
    }
    if spec.label_parts:
        entry["label_parts"] = {k: str(v.absolute()) for k, v in spec.label_parts.items()}
    return entry


def _normalisation(opts: PreprocessOptions) -> dict[str, Any]:
    if opts.modality == "CT" and opts.intensity is not None:
        p = opts.intensity
        return {"modality": "CT", "method": "dataset",
                "scheme": "clip to the 0.5 / 99.5 percentiles of the training set's foreground intensities, then "
                          "z-score with their mean and std (nnU-Net's CT normalisation)",
                "clip_low": p.percentile_00_5, "clip_high": p.percentile_99_5, "mean": p.mean, "std": p.std,
                "crop_margin_mm": opts.crop_margin_mm}
    if opts.modality == "CT":
        return {"modality": "CT", "method": "window", "scheme": "clip to ct_window, then z-score per case",
                "ct_window": list(opts.ct_window), "crop_margin_mm": opts.crop_margin_mm}
    return {"modality": opts.modality, "method": "case", "scheme": "z-score per case",
            "crop_margin_mm": opts.crop_margin_mm}


def build_shards(src: str | os.PathLike, out: str | os.PathLike, *, labels: str | None = None,
                 spacing: Sequence[float] | None = None, modality: str | None = None,
                 codec: str = DEFAULT_CODEC, chunk: int = DEFAULT_CHUNK, cases_per_shard: int = 16,
                 workers: int = 2, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
                 folds: int | None = None, margin_mm: float = 10.0,
                 ct_window: Sequence[float] | None = None, ct_normalisation: str = "dataset") -> Path:
    """Preprocess every case of ``src`` into HDF5 shards under ``out``; returns the manifest's path.

    Args:
        src: an MSD/nnU-Net folder, a TotalSegmentator-style folder or a CSV (detected automatically).
        out: the shard folder; created if missing, rebuilt in place if it holds the same dataset.
        labels: label spec (``"kidney=2,3;psoas=88,89"`` or structure names); None keeps the declared labels.
        spacing: target voxel size in mm, RAS order; None takes the median spacing of the cases.
        modality: "CT" or "MR"; None takes the source's.
        codec, chunk: shard compression (one of ``CODECS``) and chunk edge in voxels.
        cases_per_shard: cases per HDF5 file.
        workers: preprocessing processes; the output does not depend on it.
        seed, val_fraction, test_fraction, folds: the split (see ``data_tools.splits``) and foreground sampling.
        margin_mm: margin around the body box kept by the crop.
        ct_window: HU clip before a per-case z-score (``ct_normalisation="window"``); None keeps the default.
        ct_normalisation: "dataset" (nnU-Net's: clip and z-score with the fingerprint's foreground
            intensities, the same for every case) or "window" (clip to ``ct_window``, z-score per case).
    """
    src, out = Path(src), Path(out)
    codec_options(codec)  # unknown codec: ValueError before any work
    if ct_normalisation not in CT_NORMALISATIONS:
        raise ValueError(f"ct_normalisation must be one of {', '.join(CT_NORMALISATIONS)}, got {ct_normalisation!r}")
    if cases_per_shard < 1 or chunk < 1 or workers < 1:
        raise ValueError("cases_per_shard, chunk and workers must be at least 1")
    source: SourceDataset = detect_layout(src)
    label_map = parse_label_map(labels, source)
    cases = sorted(source.cases, key=lambda c: c.case_id)
    if not cases:
        raise DataError(src, "no cases found")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise DataError(src, "case ids are not unique")
    splits = make_splits(ids, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, folds=folds)
    modality = (modality or source.modality).upper()
    if modality not in ("CT", "MR"):
        raise DataError(src, f"modality {modality!r} is neither CT nor MR")
    target = tuple(float(s) for s in spacing) if spacing is not None else median_spacing(cases)
    if len(target) != 3 or min(target) <= 0:
        raise ValueError(f"target spacing must be three positive numbers, got {target}")
    window = {} if ct_window is None else {"ct_window": (float(ct_window[0]), float(ct_window[1]))}
    opts = PreprocessOptions(target_spacing=target, modality=modality, crop_margin_mm=float(margin_mm),
                             **window)
    if "note" in splits:
        print(f"warning: {src}: {splits['note']}", file=sys.stderr)

    mapping = {"names": label_map.names, "structures": label_map.structures,
               "source_values": {str(k): v for k, v in sorted(label_map.source_values.items())}}
    options = {"labels": mapping,
               "target_spacing": list(target), "modality": modality, "ct_window": list(opts.ct_window),
               "margin_mm": float(margin_mm), "codec": codec, "chunk": int(chunk),
               "cases_per_shard": int(cases_per_shard), "seed": int(seed), "val_fraction": float(val_fraction),
               "test_fraction": float(test_fraction), "folds": None if folds is None else int(folds),
               "ct_normalisation": ct_normalisation if modality == "CT" else None}
    fingerprint = _fingerprint(options, ids)
    _prepare_output(out, fingerprint)

    by_id = {c.case_id: c for c in cases}
    dataset = dataset_fingerprint([by_id[c] for c in fingerprint_cases(splits, ids)], label_map, opts, seed, workers)
    if modality == "CT" and ct_normalisation == "dataset":
        opts = dataclasses.replace(opts, intensity=IntensityProperties.from_json(dataset["foreground_intensity"]))

    jobs = [(c, label_map, opts, case_seed(seed, c.case_id)) for c in cases]
    shards, entries = _write_shards(out, source.name, cases, jobs, codec, chunk, cases_per_shard, workers)
    manifest = {
        "name": source.name, "modality": modality, "labels": dict(label_map.names), "label_mapping": mapping,
        "source_layout": source.layout, "source": str(src.resolve()), "target_spacing": list(target),
        "codec": codec, "chunk": chunk, "normalisation": _normalisation(opts),
        "shards": shards, "cases": entries, "splits": splits, "fingerprint": fingerprint,
        "dataset_fingerprint": dataset,
    }
    try:
        path = write_manifest(out, manifest)
    except BaseException:
        for s in shards:
            (out / s["file"]).unlink(missing_ok=True)
        (out / (MANIFEST_NAME + _TMP)).unlink(missing_ok=True)
        raise
    write_default_plans(out)
    return path


DEFAULT_PLAN_GB = 8.0
"""nnU-Net's planning target: one 8 GB accelerator (``ds-seg3d plan SHARDS`` re-plans for a real cluster)."""


def write_default_plans(out: Path) -> Path | None:
    """``plans.json`` for nnU-Net's default target, sized by the fast estimate (seconds)."""
    from ds_seg3d.memory.sizing import plan_shards

    try:
        plans = plan_shards(out, DEFAULT_PLAN_GB, 1, verify=False)
    except ValueError as e:
        print(f"warning: {out}: no default plan ({' '.join(str(e).split())}); run `ds-seg3d plan {out} ...`",
              file=sys.stderr)
        return None
    return plans.save(out)


def _write_shards(out: Path, name: str, cases: Sequence[CaseSpec], jobs: Sequence[Any], codec: str, chunk: int,
                  cases_per_shard: int, workers: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Stream preprocessed cases into shards; on any failure remove every file this build wrote."""
    shards: list[dict[str, Any]] = []
    entries: dict[str, Any] = {}
    written: list[Path] = []
    writer: ShardWriter | None = None
    members: list[str] = []
    results = ordered_map(_prepare, jobs, workers)
    try:
        for spec, (status, payload) in tqdm(zip(cases, results), total=len(cases), desc="build-shards",
                                            unit="case", disable=None):
            if status == "error":
                raise DataError(*payload)
            record, stats = payload
            if writer is None:
                path = out / SHARD_PATTERN.format(len(shards))
                writer, members = ShardWriter(path, name, codec=codec, chunk=chunk), []
            writer.write_case(record)
            members.append(spec.case_id)
            entries[spec.case_id] = _case_entry(spec, record, stats, writer.path.name)
            if len(members) == cases_per_shard or spec is cases[-1]:
                written.append(writer.path)
                writer.close()
                shards.append({"file": writer.path.name, "sha256": sha256_file(writer.path),
                               "bytes": writer.path.stat().st_size, "cases": members})
                writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        for p in written:
            p.unlink(missing_ok=True)
        raise
    finally:
        results.close()  # type: ignore[attr-defined]
    return shards, entries


def register(subparsers: Any) -> None:
    """Add the ``build-shards`` subcommand."""
    p = subparsers.add_parser("build-shards", help="preprocess a NIfTI dataset into HDF5 shards + manifest.json",
                              description=build_shards.__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="MSD/nnU-Net folder, TotalSegmentator-style folder or CSV")
    p.add_argument("out", type=Path, help="output shard folder")
    p.add_argument("--labels", default=None, help='e.g. "kidney=2,3;psoas=88,89"; default: declared labels')
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="target spacing in mm (RAS order); default: median of the cases")
    p.add_argument("--modality", choices=("CT", "MR"), default=None, help="default: from the source")
    p.add_argument("--codec", choices=CODECS, default=DEFAULT_CODEC)
    p.add_argument("--chunk", type=_positive_int, default=DEFAULT_CHUNK)
    p.add_argument("--cases-per-shard", type=_positive_int, default=16)
    p.add_argument("--workers", type=_positive_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=_fraction, default=0.2)
    p.add_argument("--test-fraction", type=_fraction, default=0.2)
    p.add_argument("--folds", type=_positive_int, default=None, metavar="K")
    p.add_argument("--margin-mm", type=float, default=10.0)
    p.add_argument("--ct-normalisation", choices=CT_NORMALISATIONS, default="dataset",
                   help="CT: 'dataset' clips and z-scores with the training set's foreground intensities (nnU-Net); "
                        "'window' clips to --ct-window and z-scores each case over its body")
    p.add_argument("--ct-window", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="HU clip of --ct-normalisation window (default -1000 1000)")
    p.set_defaults(func=_run)


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def _run(args: argparse.Namespace) -> int:
    manifest = build_shards(args.src, args.out, labels=args.labels, spacing=args.spacing, modality=args.modality,
                            codec=args.codec, chunk=args.chunk, cases_per_shard=args.cases_per_shard,
                            workers=args.workers, seed=args.seed, val_fraction=args.val_fraction,
                            test_fraction=args.test_fraction, folds=args.folds, margin_mm=args.margin_mm,
                            ct_window=args.ct_window, ct_normalisation=args.ct_normalisation)
    m = json.loads(manifest.read_text())
    print(f"{manifest}: {len(m['cases'])} cases in {len(m['shards'])} shards")
    return 0
