"""Seeded CT-like abdominal phantoms in the Medical Segmentation Decathlon (MSD) layout.

The demo, the tests and the benchmarks need CT volumes whose difficulties resemble real ones (Hounsfield
intensities, partial volume, noise, anisotropic voxels, mixed RAS/LPS storage) without downloading
anything. Two tasks:

* ``kidney``: polycystic kidneys, enlarged and irregular, full of cysts of many sizes; the label covers
  parenchyma and cysts, so a model must learn that dark cysts inside the outline are still kidney.
* ``psoas``: psoas muscles that widen caudally and have nearly the intensity of the paraspinal muscles;
  only thin fat planes or bone separate them, so shape, not contrast, decides.

Anatomy is built in world millimetres. Its size depends on the requested shape and the seed, never on
the case's sampled voxel spacing, so resampling cases to a common spacing lines them up as real scans
line up. A 128-voxel field of view at 0.7-1.0 mm spans only 80-140 mm, so the body is a proportionally
scaled abdomen sized to fit the smallest field of view the sampling can produce.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from data_tools.errors import DataError

TASKS = ("kidney", "psoas")
GENERATOR_VERSION = 1
DEFAULT_SHAPE = (128, 128, 64)
SHAPE_JITTER = (0.9, 1.1)  # per-case factor on each axis of the requested shape
INPLANE_SPACING = (0.7, 1.0)  # mm, the same for x and y, as CT pixels are square
SLICE_SPACING = (1.5, 5.0)  # mm
MIN_SHAPE = (16, 16, 8)

# Tissue classes of the rendered map; labels are derived from it.
TISSUES = {name: i for i, name in enumerate((
    "air", "fat", "muscle", "visceral_fat", "bowel", "liver", "cancellous_bone", "cortical_bone",
    "disc", "spinal_canal", "kidney", "cyst", "paraspinal", "psoas"))}
# Hounsfield ranges; each case draws one value per tissue (cysts draw one each).
HU_RANGES = {
    "air": (-1000, -1000), "fat": (-115, -85), "muscle": (40, 55), "visceral_fat": (-105, -80),
    "bowel": (15, 40), "liver": (55, 70), "cancellous_bone": (180, 300), "cortical_bone": (500, 900),
    "disc": (70, 100), "spinal_canal": (5, 20), "kidney": (30, 40), "cyst": (0, 15), "paraspinal": (45, 60),
}
PSOAS_CONTRAST = 5.0  # |psoas - paraspinal| HU, at most
LABELS = {"kidney": ("kidney", "cyst"), "psoas": ("psoas",)}

Inside = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass
class Phantom:
    """One rendered case; ``tissue`` (a ``TISSUES`` map) lets tests and figures look under the noise."""

    image: np.ndarray  # int16 HU, stored orientation
    label: np.ndarray  # uint8 {0, 1}, same grid
    affine: np.ndarray  # (4, 4) float64 voxel -> world (RAS+) mm
    tissue: np.ndarray  # uint8 tissue class per voxel, same grid


class _Canvas:
    """A RAS-ordered grid in world mm that shapes are painted onto, each within its bounding box only."""

    def __init__(self, axes: Sequence[np.ndarray]):
        self.axes = axes
        shape = tuple(len(a) for a in axes)
        self.tissue = np.zeros(shape, np.uint8)
        self.hu = np.full(shape, HU_RANGES["air"][0], np.float32)

    def paint(self, tissue: str, hu: float, center: Sequence[float], reach: Sequence[float],
              inside: Inside, over: Sequence[str] | None = None) -> None:
        """Set voxels within ``reach`` mm of ``center`` where ``inside(dx, dy, dz)`` holds.

        ``over`` restricts painting to voxels currently of those tissues, which keeps organs from
        overwriting bone or leaving the body.
        """
        box, rel = [], []
        for a, c, r in zip(self.axes, center, reach):
            lo, hi = int(np.searchsorted(a, c - r, side="left")), int(np.searchsorted(a, c + r, side="right"))
            if hi <= lo:
                return
            box.append(slice(lo, hi))
            rel.append(a[lo:hi] - np.float32(c))
        box_t = tuple(box)
        mask = np.broadcast_to(inside(rel[0][:, None, None], rel[1][None, :, None], rel[2][None, None, :]),
                               self.tissue[box_t].shape)
        if over is not None:
            mask = mask & np.isin(self.tissue[box_t], [TISSUES[t] for t in over])
        self.tissue[box_t][mask] = TISSUES[tissue]
        self.hu[box_t][mask] = hu


def _wobble(rng: np.random.Generator, amplitude: float, modes: int = 4) -> Inside:
    """A smooth random field (a few low-frequency plane waves) that deforms an outline irregularly."""
    k = rng.normal(size=(modes, 3))
    k *= (rng.uniform(1.0, 3.0, modes) / np.linalg.norm(k, axis=1))[:, None]
    phase = rng.uniform(0, 2 * np.pi, modes)
    amp = amplitude * rng.uniform(0.5, 1.0, modes) * rng.choice([-1.0, 1.0], modes) / np.sqrt(modes)
    k, phase, amp = k.astype(np.float32), phase.astype(np.float32), amp.astype(np.float32)

    def field(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        return sum(a * np.cos(kk[0] * u + kk[1] * v + kk[2] * w + p) for kk, p, a in zip(k, phase, amp))
    return field


def _ellipsoid(radii: Sequence[float], angle: float = 0.0, wobble: Inside | None = None,
               z_ref: float = 1.0) -> Inside:
    """Inside test of an ellipsoid rotated in-plane; ``radii[2] = inf`` makes a cylinder along z."""
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    a, b, c = (np.float32(r) for r in radii)

    def inside(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray) -> np.ndarray:
        u, v = (ca * dx + sa * dy) / a, (ca * dy - sa * dx) / b
        w = dz / c if np.isfinite(c) else np.zeros_like(dz)
        q = u * u + v * v + w * w
        if wobble is not None:
            q = q - wobble(u, v, w if np.isfinite(c) else dz / np.float32(z_ref))
        return q < 1.0
    return inside


def _box(half: Sequence[float], phase: Callable[[np.ndarray], np.ndarray] | None = None) -> Inside:
    """Axis-aligned box; ``phase(dz)`` optionally limits it to some z levels (vertebral processes)."""
    def inside(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray) -> np.ndarray:
        m = (np.abs(dx) <= half[0]) & (np.abs(dy) <= half[1])
        return m & phase(dz) if phase is not None else m
    return inside


def _body(c: _Canvas, rng: np.random.Generator, hu: dict[str, float], L: float, H: float) -> dict[str, float]:
    """Skin outline, subcutaneous fat, abdominal wall, visceral fat; returns the frame organs hang on."""
    bx, by = rng.uniform(-0.03, 0.03, 2) * L
    ax = rng.uniform(0.82, 0.9) * L
    ay = ax * rng.uniform(0.7, 0.78)
    tf, tw = rng.uniform(0.05, 0.09) * L, rng.uniform(0.03, 0.045) * L
    wob = _wobble(rng, 0.04)
    for tissue, inset in (("fat", 0.0), ("muscle", tf), ("visceral_fat", tf + tw)):
        c.paint(tissue, hu[tissue], (bx, by, 0.0), (1.1 * ax, 1.1 * ay, np.inf),
                _ellipsoid((ax - inset, ay - inset, np.inf), wobble=wob, z_ref=H))
    rv = rng.uniform(0.11, 0.13) * L  # vertebral body radius: the unit of the posterior anatomy
    yv = by - ay + tf + tw + 3.05 * rv  # vertebral body centre, paraspinals filling the space behind
    return {"bx": bx, "by": by, "rv": rv, "sx": bx, "yv": yv}


def _bowel(c: _Canvas, rng: np.random.Generator, f: dict[str, float], L: float, H: float,
           x_range: tuple[float, float]) -> None:
    """Soft-tissue loops anterior to the retroperitoneum: distractors near organ intensities."""
    for _ in range(int(rng.integers(5, 11))):
        r = rng.uniform(0.07, 0.15) * L
        ctr = (f["bx"] + rng.uniform(*x_range) * L, f["by"] + rng.uniform(0.0, 0.45) * L,
               rng.uniform(-0.8, 0.8) * H)
        c.paint("bowel", rng.uniform(*HU_RANGES["bowel"]), ctr, (2.5 * r,) * 3,
                _ellipsoid((r, r * rng.uniform(0.6, 1.0), r * rng.uniform(1.0, 2.0)), rng.uniform(0, np.pi),
                           _wobble(rng, 0.3)), over=("visceral_fat",))


def _paraspinals(c: _Canvas, rng: np.random.Generator, hu: dict[str, float], f: dict[str, float],
                 H: float) -> None:
    """Back muscles behind the transverse processes, as dense as the psoas: the psoas task's decoy."""
    rv = f["rv"]
    for side in (-1, 1):
        radii = (rv * rng.uniform(0.95, 1.05), rv * rng.uniform(0.9, 1.0), np.inf)
        c.paint("paraspinal", hu["paraspinal"], (f["sx"] + side * 1.25 * rv, f["yv"] - 2.1 * rv, 0.0),
                (2 * rv, 2 * rv, np.inf), _ellipsoid(radii, wobble=_wobble(rng, 0.06), z_ref=H),
                over=("visceral_fat", "muscle"))


def _spine(c: _Canvas, rng: np.random.Generator, hu: dict[str, float], f: dict[str, float]) -> None:
    """Vertebral bodies (cortical shell, cancellous core) with discs, arch, spinous and transverse processes."""
    rv, sx, yv = f["rv"], f["sx"], f["yv"]
    period, z0 = rv * rng.uniform(1.9, 2.2), rng.uniform(0, 3 * rv)

    def levels(lo: float, hi: float) -> Callable[[np.ndarray], np.ndarray]:
        return lambda dz: (((dz - z0) / period) % 1.0 >= lo) & (((dz - z0) / period) % 1.0 < hi)

    full = (3 * rv, 3.5 * rv, np.inf)
    shell = 0.2 * rv
    c.paint("cortical_bone", hu["cortical_bone"], (sx, yv, 0.0), full, _ellipsoid((rv, 0.9 * rv, np.inf)))
    c.paint("cancellous_bone", hu["cancellous_bone"], (sx, yv, 0.0), full,
            _ellipsoid((rv - shell, 0.9 * rv - shell, np.inf)))
    ring = _ellipsoid((1.02 * rv, 0.92 * rv, np.inf))
    disc = levels(0.0, 0.22)
    c.paint("disc", hu["disc"], (sx, yv, 0.0), full, lambda dx, dy, dz: ring(dx, dy, dz) & disc(dz))
    c.paint("cortical_bone", hu["cortical_bone"], (sx, yv - 1.0 * rv, 0.0), full,
            _box((2.0 * rv, 0.15 * rv), levels(0.45, 0.75)))  # transverse processes
    c.paint("cortical_bone", hu["cortical_bone"], (sx, yv - 2.4 * rv, 0.0), full,
            _box((0.15 * rv, 0.5 * rv), levels(0.3, 0.9)))  # spinous process
    arch = (sx, yv - 1.5 * rv, 0.0)
    c.paint("cortical_bone", hu["cortical_bone"], arch, full, _ellipsoid((0.62 * rv, 0.62 * rv, np.inf)))
    c.paint("spinal_canal", hu["spinal_canal"], arch, full, _ellipsoid((0.4 * rv, 0.4 * rv, np.inf)))


def _kidney_task(c: _Canvas, rng: np.random.Generator, hu: dict[str, float], f: dict[str, float],
                 L: float, H: float) -> None:
    _bowel(c, rng, f, L, H, (-0.5, 0.1))
    liver = (rng.uniform(0.34, 0.42) * L, rng.uniform(0.34, 0.42) * L, rng.uniform(0.45, 0.55) * H)
    c.paint("liver", hu["liver"], (f["bx"] + 0.35 * L, f["by"] + 0.1 * L, rng.uniform(0.25, 0.33) * H),
            tuple(1.2 * r for r in liver), _ellipsoid(liver, wobble=_wobble(rng, 0.15)),
            over=("visceral_fat", "bowel"))
    _paraspinals(c, rng, hu, f, H)
    for side in (-1, 1):
        size = rng.uniform(1.0, 1.3) * rng.uniform(0.9, 1.1, 3)  # enlarged, and unequal
        radii = np.array([0.19 * L, 0.25 * L, 0.5 * H]) * size
        ctr = np.array([f["bx"] + side * rng.uniform(0.43, 0.47) * L, f["yv"] + rng.uniform(0.04, 0.1) * L,
                        rng.uniform(-0.1, 0.1) * H])
        angle = side * np.deg2rad(rng.uniform(15, 35))
        c.paint("kidney", hu["kidney"], ctr, 1.3 * radii, _ellipsoid(radii, angle, _wobble(rng, 0.25)),
                over=("visceral_fat", "bowel", "liver"))
        # Cyst centres: uniform in the kidney's unit ball, mapped through its rotation; radii log-uniform.
        n = int(rng.integers(30, 81))
        unit = rng.normal(size=(n, 3))
        unit *= (rng.uniform(0, 1, n) ** (1 / 3) * 0.85 / np.linalg.norm(unit, axis=1))[:, None]
        p = unit * radii
        ca, sa = np.cos(angle), np.sin(angle)
        offsets = np.stack([ca * p[:, 0] - sa * p[:, 1], sa * p[:, 0] + ca * p[:, 1], p[:, 2]], axis=1)
        cyst_r = np.exp(rng.uniform(np.log(0.08), np.log(0.6), n)) * radii[0]
        for off, r in zip(offsets, cyst_r):
            c.paint("cyst", rng.uniform(*HU_RANGES["cyst"]), ctr + off, (r,) * 3, _ellipsoid((r, r, r)),
                    over=("kidney", "cyst", "visceral_fat", "bowel"))


def _psoas_task(c: _Canvas, rng: np.random.Generator, hu: dict[str, float], f: dict[str, float],
                L: float, H: float) -> None:
    _bowel(c, rng, f, L, H, (-0.5, 0.5))
    _paraspinals(c, rng, hu, f, H)
    rv, sx, yv = f["rv"], f["sx"], f["yv"]
    psoas_hu = hu["paraspinal"] + rng.uniform(-PSOAS_CONTRAST, PSOAS_CONTRAST)
    zc, zh = rng.uniform(-0.05, 0.05) * H, rng.uniform(0.75, 0.85) * H
    sheath = 0.3 * rv  # the fat plane that separates psoas from its neighbours
    for side in (-1, 1):
        r_top, r_bot = rng.uniform(0.45, 0.55) * rv, rng.uniform(1.2, 1.4) * rv
        drift, y0, wob = rng.uniform(0.2, 0.45) * rv, rng.uniform(-0.1, 0.1) * rv, _wobble(rng, 0.08)

        def shape(extra: float, r_top=r_top, r_bot=r_bot, drift=drift, y0=y0, wob=wob, side=side) -> Inside:
            def inside(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray) -> np.ndarray:
                t = np.clip((zh - dz) / (2 * zh), 0, 1)  # 0 cranial tip, 1 caudal end: widening caudally
                cap = np.sqrt(np.clip(1 - (dz / zh) ** 8, 0, None))
                r = (r_top + (r_bot - r_top) * t) * cap
                xc = side * (1.05 * rv + sheath + 0.9 * r_bot * t + 0.9 * r_top * (1 - t) + drift * t)
                re = np.maximum(r + extra * (cap > 0), 1e-6)
                u, v = (dx - xc) / re, (dy - y0 - 0.25 * rv * t) / (0.85 * re)
                return u * u + v * v < 1 + wob(u, v, dz / zh)
            return inside
        reach = (5.5 * rv, 3 * rv, zh * 1.05)
        c.paint("visceral_fat", hu["visceral_fat"], (sx, yv, zc), reach, shape(sheath),
                over=("visceral_fat", "bowel", "paraspinal", "muscle"))
        c.paint("psoas", psoas_hu, (sx, yv, zc), reach, shape(0.0), over=("visceral_fat",))


def _sample_grid(rng: np.random.Generator, shape: Sequence[int]) -> tuple[tuple[int, ...], np.ndarray]:
    size = tuple(max(m, int(round(s * rng.uniform(*SHAPE_JITTER)))) for s, m in zip(shape, MIN_SHAPE))
    inplane = rng.uniform(*INPLANE_SPACING)
    return size, np.array([inplane, inplane, rng.uniform(*SLICE_SPACING)])


def render_case(task: str, seed: int, shape: Sequence[int] = DEFAULT_SHAPE) -> Phantom:
    """Render one case with its tissue map; ``generate_case`` is the usual entry point."""
    if task not in TASKS:
        raise ValueError(f"unknown phantom task {task!r}; choose one of {', '.join(TASKS)}")
    rng = np.random.default_rng([seed, 1 + TASKS.index(task)])
    size, spacing = _sample_grid(rng, shape)
    # Anatomy scale: half the smallest field of view the sampling can produce, so organs stay inside.
    L = 0.98 * 0.5 * SHAPE_JITTER[0] * INPLANE_SPACING[0] * min(shape[0], shape[1])
    H = 0.98 * 0.5 * SHAPE_JITTER[0] * SLICE_SPACING[0] * shape[2]
    axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(size, spacing)]
    canvas = _Canvas(axes)
    hu = {name: rng.uniform(lo, hi) for name, (lo, hi) in HU_RANGES.items()}
    frame = _body(canvas, rng, hu, L, H)
    (_kidney_task if task == "kidney" else _psoas_task)(canvas, rng, hu, frame, L, H)
    _spine(canvas, rng, hu, frame)

    # Partial volume, in voxels: a wider in-plane point spread; through-plane, about one slice profile.
    blur = (*(rng.uniform(0.5, 1.0),) * 2, rng.uniform(0.5, 0.7))
    image = ndimage.gaussian_filter(canvas.hu, blur, mode="nearest")
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(10, 20))
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    tissue = canvas.tissue
    label = np.isin(tissue, [TISSUES[t] for t in LABELS[task]]).astype(np.uint8)

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [a[0] for a in axes]
    if rng.uniform() < 0.5:  # LPS storage: same world anatomy, x and y reversed in the array
        affine[:2, :2] *= -1
        affine[:2, 3] = [axes[0][-1], axes[1][-1]]
        image, label, tissue = (np.ascontiguousarray(a[::-1, ::-1]) for a in (image, label, tissue))
    return Phantom(image, label, affine, tissue)


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


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "imagesTr").mkdir(parents=True)
        (tmp / "labelsTr").mkdir()
        training = []
        for i in tqdm(range(cases), desc=f"{task} phantoms", unit="case"):
            case_id = f"{task}_{i:03d}"
            image, label, affine = generate_case(task, case_seed(seed, i), shape)
            _save(image, affine, tmp / "imagesTr" / f"{case_id}.nii.gz")
            _save(label, affine, tmp / "labelsTr" / f"{case_id}.nii.gz")
            training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
        meta = {
            "name": f"Phantom{task.capitalize()}",
            "description": ("synthetic CT-like abdomen: polycystic kidneys" if task == "kidney" else
                            "synthetic CT-like abdomen: psoas muscles next to iso-dense paraspinal muscles"),
            "reference": "generated by data_tools phantoms", "licence": "Apache-2.0",
            "release": str(GENERATOR_VERSION), "tensorImageSize": "3D", "modality": {"0": "CT"},
            "labels": {"0": "background", "1": task}, "numTraining": cases, "training": training,
            "numTest": 0, "test": [], "generator": _parameters(task, cases, seed, shape),
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=1))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """CLI entry: bad parameters or a foreign non-empty OUT raise DataError (the CLI exits non-zero)."""
    _validate(args.out, args.task, args.cases, args.seed, args.shape)
    if already_generated(args.out, args.task, args.cases, args.seed, args.shape):
        print(f"{args.out}: already holds these {args.cases} {args.task} phantoms "
              f"(seed {args.seed}); nothing to do")
        return 0
    start = time.perf_counter()
    write_msd_dataset(args.out, args.task, args.cases, args.seed, args.shape)
    print(f"{args.out}: wrote {args.cases} {args.task} phantoms in {time.perf_counter() - start:.1f} s")
    return 0
