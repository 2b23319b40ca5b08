"""Seeded CT-like abdominal phantoms in the Medical Segmentation Decathlon (MSD) layout.

The demo, the tests and the benchmarks need CT volumes whose difficulties resemble real ones (Hounsfield
intensities, partial volume, correlated noise, anisotropic voxels, mixed RAS/LPS storage) without
downloading anything. ``data_tools.phantom_anatomy`` renders the abdomen; this module writes the cases
as an MSD folder, previews them and runs the ``phantoms`` subcommand.

* ``kidney``: a contrast-enhanced (nephrographic phase, parenchyma 120-150 HU) scan centred on
  polycystic kidneys: enlarged, lumpy and full of water-dense cysts of many sizes, some bulging the
  outline; the liver holds a few cysts too. The label covers parenchyma and kidney cysts, so a model
  must learn that dark cysts inside the kidney are kidney and those in the liver are not.
* ``psoas``: an unenhanced scan from the kidneys to the pelvis. The psoas runs from about the upper
  sixth of the slices to the caudal end, widening caudally beside the vertebral bodies; paraspinal
  muscles, quadratus lumborum, vessels, bowel walls and kidneys lie within a few HU of it, so shape and
  position, not contrast, decide.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np
from tqdm import tqdm

from data_tools.phantom_anatomy import (
    BODY_WIDTH,
    DEFAULT_SHAPE,
    ENHANCED,
    GENERATOR_VERSION,
    HU_RANGES,
    INPLANE_SPACING,
    LABELS,
    MIN_SHAPE,
    PLANES,
    PSOAS_CONTRAST,
    SHAPE_JITTER,
    SLICE_SPACING,
    SOFT,
    TASKS,
    TISSUES,
    Phantom,
    render_case,
)
from ds_seg3d.data.errors import DataError

__all__ = ["BODY_WIDTH", "DEFAULT_SHAPE", "ENHANCED", "GENERATOR_VERSION", "HU_RANGES", "INPLANE_SPACING", "LABELS",
           "MIN_SHAPE", "PLANES", "PREVIEW_WINDOW", "PSOAS_CONTRAST", "SHAPE_JITTER", "SLICE_SPACING", "SOFT", "TASKS",
           "TISSUES", "Phantom", "already_generated", "case_seed", "generate_case", "preview_png", "register",
           "render_case", "run", "write_msd_dataset"]


def generate_case(task: str, seed: int, shape: Sequence[int] = DEFAULT_SHAPE
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One seeded case: (image int16 HU, label uint8 {0,1}, affine 4x4 float64).

    The returned shape is ``shape`` jittered by up to +-10 % per axis, with a sampled anisotropic spacing
    and either RAS or LPS storage, as cases of a real collection differ.
    """
    p = render_case(task, seed, shape)
    return p.image, p.label, p.affine


def _parameters(task: str, cases: int, seed: int, shape: Sequence[int]) -> dict:
    return {"tool": "data_tools phantoms", "version": GENERATOR_VERSION, "task": task, "cases": int(cases),
            "seed": int(seed), "shape": [int(s) for s in shape]}


def _validate(out: Path, task: str, cases: int, seed: int, shape: Sequence[int]) -> None:
    if task not in TASKS:
        raise DataError(out, f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if cases < 1:
        raise DataError(out, f"--cases must be at least 1, got {cases}")
    if seed < 0:
        raise DataError(out, f"--seed must be non-negative, got {seed}")
    if len(shape) != 3 or any(s < m for s, m in zip(shape, MIN_SHAPE)):
        raise DataError(out, f"--shape must be 3 sizes of at least {MIN_SHAPE}, got {tuple(shape)}")


def already_generated(out: str | os.PathLike, task: str, cases: int, seed: int, shape: Sequence[int]) -> bool:
    """True when ``out`` holds exactly these phantoms; False when it is absent or empty.

    Anything else in ``out`` is someone's data: refuse rather than overwrite it.
    """
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    if not out.is_dir():
        raise DataError(out, "exists and is not a folder")
    try:
        prior = json.loads((out / "dataset.json").read_text()).get("generator")
    except (OSError, ValueError, AttributeError):
        prior = None
    if prior == _parameters(task, cases, seed, shape):
        return True
    raise DataError(out, "exists and is not empty (not phantoms of these parameters); choose another folder")


@contextlib.contextmanager
def atomic_msd_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` holding ``imagesTr/`` and ``labelsTr/``; renamed to ``out`` (absent or
    empty) when the block ends, removed if it fails, so an interrupted write never looks like a dataset."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "imagesTr").mkdir(parents=True)
        (tmp / "labelsTr").mkdir()
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``array`` with ``affine`` as qform and sform (code 1, scanner) and mm units."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index``: a dataset of N cases is a prefix of one with more cases."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_msd_dataset(out: str | os.PathLike, task: str, cases: int, seed: int,
                      shape: Sequence[int] = DEFAULT_SHAPE) -> Path:
    """Write an MSD-style folder (imagesTr, labelsTr, dataset.json) and return its path.

    Everything is written into a temporary sibling folder that is renamed into place at the end, so an
    interrupted run never leaves a complete-looking dataset.
    """
    out = Path(out)
    _validate(out, task, cases, seed, shape)
    if already_generated(out, task, cases, seed, shape):
        return out
    with atomic_msd_folder(out) as tmp:
        training = []
        for i in tqdm(range(cases), desc=f"{task} phantoms", unit="case"):
            case_id = f"{task}_{i:03d}"
            image, label, affine = generate_case(task, case_seed(seed, i), shape)
            save_nifti(image, affine, tmp / "imagesTr" / f"{case_id}.nii.gz")
            save_nifti(label, affine, tmp / "labelsTr" / f"{case_id}.nii.gz")
            training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
        meta = {
            "name": f"Phantom{task.capitalize()}",
            "description": ("synthetic contrast-enhanced CT-like abdomen: polycystic kidneys" if task == "kidney"
                            else "synthetic unenhanced CT-like abdomen: psoas muscles among iso-dense muscles"),
            "reference": "generated by data_tools phantoms", "licence": "Apache-2.0",
            "release": str(GENERATOR_VERSION), "tensorImageSize": "3D", "modality": {"0": "CT"},
            "labels": {"0": "background", "1": task}, "numTraining": cases, "training": training,
            "numTest": 0, "test": [], "generator": _parameters(task, cases, seed, shape),
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=1))
    return out


PREVIEW_WINDOW = (-160, 240)  # abdominal soft-tissue window (level 40, width 400), HU


def preview_png(out_dir: str | os.PathLike, png_path: str | os.PathLike | None = None, cases: int = 3) -> Path:
    """Montage of the first ``cases`` cases of an MSD folder: a look before training on it.

    Each row shows axial slices from cranial to caudal and a coronal slice through the label, in
    radiological view (patient's right on the left, anterior up), with label contours in red.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    png = Path(png_path) if png_path is not None else out / "preview.png"
    try:
        entries = json.loads((out / "dataset.json").read_text())["training"][:cases]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(out / "dataset.json", f"cannot list cases for a preview ({e})") from None
    fig = Figure(figsize=(15, 3 * len(entries)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(entries), 5, squeeze=False)
    for row, entry in zip(axes, entries):
        image, label = (nib.as_closest_canonical(nib.load(out / entry[k])) for k in ("image", "label"))
        img, lab = np.asarray(image.dataobj, np.float32), np.asarray(label.dataobj)
        sx, _, sz = image.header.get_zooms()[:3]
        n = img.shape[2]
        views = [(img[:, :, k], lab[:, :, k], 1.0, f"axial {k}/{n}")
                 for k in np.linspace(0.9 * (n - 1), 0.1 * (n - 1), 4).round().astype(int)]
        j = int(np.argwhere(lab).mean(axis=0)[1]) if lab.any() else img.shape[1] // 2
        views.append((img[:, j, :], lab[:, j, :], float(sz / sx), f"coronal {j}"))
        for ax, (sl, ls, aspect, title) in zip(row, views):
            ax.imshow(sl.T[::-1, ::-1], cmap="gray", vmin=PREVIEW_WINDOW[0], vmax=PREVIEW_WINDOW[1],
                      aspect=aspect, interpolation="nearest")
            if ls.any():
                ax.contour(ls.T[::-1, ::-1], [0.5], colors="red", linewidths=0.8)
            ax.set_title(f"{Path(entry['image']).name.split('.')[0]} {title}", fontsize=8)
            ax.set_axis_off()
    fig.suptitle(f"window {PREVIEW_WINDOW[0]}..{PREVIEW_WINDOW[1]} HU; label in red", fontsize=9)
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, png)
    return png


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``phantoms`` subcommand to a ``data_tools`` parser."""
    p = subparsers.add_parser("phantoms", help="write seeded CT-like phantoms in the MSD layout",
                              description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="output folder (created; must be absent or empty)")
    p.add_argument("--task", choices=TASKS, required=True, help="kidney: polycystic kidneys; psoas: psoas muscles")
    p.add_argument("--cases", type=int, default=20, help="number of cases (default 20)")
    p.add_argument("--seed", type=int, default=0, help="base seed; case i uses a seed derived from (seed, i)")
    p.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"),
                   help="nominal volume size; each case varies it by up to 10%% (default 128 128 64)")
    p.add_argument("--preview", action="store_true", help="also write OUT/preview.png, a montage of the first cases")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """CLI entry: bad parameters or a foreign non-empty OUT raise DataError (the CLI exits non-zero)."""
    _validate(args.out, args.task, args.cases, args.seed, args.shape)
    if already_generated(args.out, args.task, args.cases, args.seed, args.shape):
        print(f"{args.out}: already holds these {args.cases} {args.task} phantoms "
              f"(seed {args.seed}); nothing to do")
    else:
        start = time.perf_counter()
        write_msd_dataset(args.out, args.task, args.cases, args.seed, args.shape)
        print(f"{args.out}: wrote {args.cases} {args.task} phantoms in {time.perf_counter() - start:.1f} s")
    if getattr(args, "preview", False):
        print(f"{preview_png(args.out)}: preview of the first cases")
    return 0
