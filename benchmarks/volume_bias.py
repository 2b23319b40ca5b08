"""Where a trained network's volume error comes from: geometry, resampling back, or the probabilities.

For every test case of a shard folder and every run given, on the shard grid (RAS, target spacing, body
crop) and on the input grid, as ``predict`` maps it back:

- **oracle round trip**: the true label resampled to the shard grid (``build-shards``' path) and its one-hot
  "probabilities" mapped back onto the input grid (``predict``'s path): what the geometry alone does to a
  volume;
- **shard grid**: the network's argmax volume against the true volume, both on the shard grid, with
  precision and recall (over-segmentation shows as precision below recall), and the soft volume (the sum
  of the foreground probability): a network whose probabilities are calibrated has a soft volume near the
  true one, one trained on oversampled foreground has a soft volume above it;
- **reliability**: of the voxels whose foreground probability falls in a band, the share that is truly
  foreground;
- **input grid**: the volume ``predict`` writes (probabilities resampled trilinearly, then argmax).

Prediction runs as ``predict`` does (sliding window, mirroring as the run records). ``--out FILE.md``
writes the tables. Usage::

    python benchmarks/volume_bias.py SHARDS RUN [RUN ...] --out bias.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from ds_seg3d import checkpoint as ckpt  # noqa: E402
from ds_seg3d.data.preprocess import preprocess_arrays  # noqa: E402
from ds_seg3d.data.shard_format import iter_cases, load_manifest  # noqa: E402
from ds_seg3d.inference.cases import mirror_axes, model_from_run, preprocess_options, to_input_grid  # noqa: E402
from ds_seg3d.inference.sliding_window import sliding_window_inference  # noqa: E402
from ds_seg3d.models.layers import build_sequential  # noqa: E402

BANDS = [(0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.0001)]


def case_rows(run: Path, shards: Path) -> tuple[list[dict], np.ndarray]:
    """Per test case: volumes (voxels of the shard grid and mL on the input grid), precision, recall; and the
    reliability counts (per band: voxels, truly foreground) summed over cases."""
    info = ckpt.read_run_info(run)
    _, defs = model_from_run(info)
    model = build_sequential(defs)
    ckpt.load_layers(model, run)
    model.eval()
    opts, labels = preprocess_options(info), info["labels"]
    if len(labels) != 2:
        raise ValueError(f"{run}: one foreground label expected, got {labels}")
    roi = tuple(info["experiment"]["data"]["patch"])
    manifest = load_manifest(shards)
    entries = dict(iter_cases(manifest))
    rows, bands = [], np.zeros((len(BANDS), 2))
    for case in manifest["splits"]["test"]:
        img, lab = nib.load(entries[case]["image"]), nib.load(entries[case]["label"])
        image, label = img.get_fdata(dtype=np.float32), (np.asarray(lab.dataobj) > 0).astype(np.uint8)
        rec = preprocess_arrays(case, image, label, img.affine, opts, seed=0)
        with torch.no_grad():
            probs = sliding_window_inference(torch.from_numpy(rec.image)[None], roi, 2,
                                             lambda w: model(w).float(), overlap=0.5, num_classes=2,
                                             mirror_axes=mirror_axes(info))
        p = probs[1].numpy()
        truth, pred = rec.label > 0, p > 0.5
        for i, (lo, hi) in enumerate(BANDS):
            inside = (p >= lo) & (p < hi)
            bands[i] += [inside.sum(), (inside & truth).sum()]
        oracle = to_input_grid(torch.from_numpy(np.stack([~truth, truth]).astype(np.float32)), rec.geometry) > 0
        final = to_input_grid(probs, rec.geometry) > 0
        voxel_ml = float(np.prod(nib.affines.voxel_sizes(img.affine))) / 1000
        true_ml = float(label.sum()) * voxel_ml
        rows.append({"case": case, "true_vox": int(truth.sum()), "pred_vox": int(pred.sum()), "soft_vox": float(p.sum()),
                     "precision": float((pred & truth).sum() / max(pred.sum(), 1)),
                     "recall": float((pred & truth).sum() / max(truth.sum(), 1)),
                     "oracle_err": 100 * (float(oracle.sum()) * voxel_ml - true_ml) / true_ml,
                     "final_err": 100 * (float(final.sum()) * voxel_ml - true_ml) / true_ml})
    return rows, bands


def pct(a: float, b: float) -> float:
    return 100 * (a - b) / b


def markdown(results: dict[str, tuple[list[dict], np.ndarray]]) -> str:
    lines = ["| run | cases | oracle round trip % | argmax on shard grid % | soft volume % | precision | recall "
             "| written by predict % |", "|---|---|---|---|---|---|---|---|"]
    for name, (rows, _) in results.items():
        m = {k: float(np.mean([r[k] for r in rows])) for k in ("precision", "recall", "oracle_err", "final_err")}
        hard = float(np.mean([pct(r["pred_vox"], r["true_vox"]) for r in rows]))
        soft = float(np.mean([pct(r["soft_vox"], r["true_vox"]) for r in rows]))
        lines.append(f"| {name} | {len(rows)} | {m['oracle_err']:+.2f} | {hard:+.2f} | {soft:+.2f} | "
                     f"{m['precision']:.3f} | {m['recall']:.3f} | {m['final_err']:+.2f} |")
    lines += ["", "Reliability (all runs' test voxels): of the voxels whose foreground probability is in a band, "
              "the share that is truly foreground.", "",
              "| band | " + " | ".join(results) + " |", "|---" * (1 + len(results)) + "|"]
    for i, (lo, hi) in enumerate(BANDS):
        cells = []
        for _, bands in results.values():
            n, fg = bands[i]
            cells.append(f"{fg / n:.3f} ({int(n):,} voxels)" if n else "-")
        lines.append(f"| {lo:.1f}-{min(hi, 1.0):.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("shards", type=Path, help="shard folder whose test split is scored")
    p.add_argument("runs", type=Path, nargs="+", help="run folders (trained on those shards)")
    p.add_argument("--names", nargs="+", help="a name per run for the tables (default: the folder names)")
    p.add_argument("--out", type=Path, help="write the tables here (markdown)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = args.names or [str(r) for r in args.runs]
    results = {name: case_rows(run, args.shards) for name, run in zip(names, args.runs)}
    text = markdown(results)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        (args.out.with_suffix(".json")).write_text(json.dumps(
            {n: {"cases": rows, "bands": bands.tolist()} for n, (rows, bands) in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
