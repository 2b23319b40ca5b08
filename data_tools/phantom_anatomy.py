"""The shared abdomen of the phantoms, rendered as a radiographer would scan it.

Both tasks share one abdomen: skin, subcutaneous fat and a muscle wall; spine, paraspinal muscles,
quadratus lumborum and psoas; liver, spleen, kidneys, aorta and IVC with their iliac branches; bowel
loops holding fluid and gas. Organs are kept apart by fat planes, as fascia keeps them. What each task
adds (contrast, polycystic kidneys, the scan's extent) is described in ``data_tools.phantoms``.

Each case is framed on its anatomy as a radiographer frames a scan: in-plane the body fills 80-90 % of
the field of view, and the slices cover the same stretch of anatomy whatever their spacing. Organ sizes
in millimetres therefore follow the sampled spacing: resampled cases differ in size by up to ~1.8x
in-plane and ~3x craniocaudally, more than patients do, which scale augmentation has to absorb.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

TASKS = ("kidney", "psoas")
GENERATOR_VERSION = 2  # bump whenever rendering changes: it keys already generated datasets
DEFAULT_SHAPE = (128, 128, 64)
SHAPE_JITTER = (0.9, 1.1)  # per-case factor on each axis of the requested shape
INPLANE_SPACING = (0.7, 1.0)  # mm, the same for x and y, as CT pixels are square
SLICE_SPACING = (1.5, 5.0)  # mm
MIN_SHAPE = (16, 16, 8)
BODY_WIDTH = (0.8, 0.88)  # body width / in-plane field of view, before the outline's wobble

# Tissue classes of the rendered map; labels are derived from it.
TISSUES = {name: i for i, name in enumerate((
    "air", "fat", "muscle", "visceral_fat", "bowel", "liver", "cancellous_bone", "cortical_bone",
    "disc", "spinal_canal", "kidney", "cyst", "paraspinal", "psoas", "spleen", "vessel", "fluid", "gas",
    "hepatic_cyst"))}
# Unenhanced Hounsfield ranges; each case draws one value per tissue (cysts and bowel loops one each).
HU_RANGES = {
    "air": (-1000, -1000), "fat": (-115, -85), "muscle": (42, 55), "visceral_fat": (-105, -80),
    "bowel": (38, 50), "liver": (55, 70), "cancellous_bone": (180, 300), "cortical_bone": (500, 900),
    "disc": (70, 100), "spinal_canal": (5, 20), "kidney": (30, 40), "cyst": (0, 15), "paraspinal": (42, 55),
    "spleen": (42, 52), "vessel": (40, 52), "fluid": (0, 20), "gas": (-1000, -950), "hepatic_cyst": (0, 15),
}
# The kidney task's contrast phase: enhancing parenchyma makes the water-dense cysts stand out.
ENHANCED = {"kidney": (120, 150), "liver": (95, 115), "spleen": (100, 125), "vessel": (140, 180),
            "bowel": (60, 90)}
PSOAS_CONTRAST = 5.0  # |psoas - paraspinal| HU, at most
LABELS = {"kidney": ("kidney", "cyst"), "psoas": ("psoas",)}
# Organs that fat or fascia keeps apart, strongest first: where two meet, the weaker one's edge becomes fat.
PLANES = (("muscle",), ("paraspinal",), ("vessel",), ("psoas",), ("kidney", "cyst"), ("liver", "hepatic_cyst"),
          ("spleen",), ("bowel", "fluid", "gas"))
SOFT = ("visceral_fat", "liver", "spleen", "hepatic_cyst")  # what a growing kidney may displace

Inside = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass
class Phantom:
    """One rendered case; ``tissue`` (a ``TISSUES`` map) lets tests and figures look under the noise."""

    image: np.ndarray  # int16 HU, stored orientation
    label: np.ndarray  # uint8 {0, 1}, same grid
    affine: np.ndarray  # (4, 4) float64 voxel -> world (RAS+) mm
    tissue: np.ndarray  # uint8 tissue class per voxel, same grid


class _Canvas:
    """A RAS-ordered grid that shapes are painted onto, each within its bounding box only.

    x and y are world mm; z is anatomical mm (world z divided by the case's craniocaudal stretch), so
    shapes are drawn with true proportions whatever the slice spacing.
    """

    def __init__(self, axes: Sequence[np.ndarray]):
        self.axes = axes
        shape = tuple(len(a) for a in axes)
        self.tissue = np.zeros(shape, np.uint8)
        self.hu = np.full(shape, HU_RANGES["air"][0], np.float32)

    def paint(self, tissue: str, hu: float, center: Sequence[float], reach: Sequence[float],
              inside: Inside, over: Sequence[str] | None = None) -> None:
        """Set voxels within ``reach`` of ``center`` where ``inside(dx, dy, dz)`` holds.

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
               z_ref: float = 1.0, shear: Sequence[float] = (0.0, 0.0)) -> Inside:
    """Ellipsoid rotated in-plane and sheared along z; ``radii[2] = inf`` makes a cylinder along z."""
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    a, b, c = (np.float32(r) for r in radii)
    hx, hy = (np.float32(s) for s in shear)

    def inside(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray) -> np.ndarray:
        dx, dy = dx - hx * dz, dy - hy * dz
        u, v = (ca * dx + sa * dy) / a, (ca * dy - sa * dx) / b
        w = dz / c if np.isfinite(c) else np.zeros_like(dz)
        q = u * u + v * v + w * w
        if wobble is not None:
            q = q - wobble(u, v, w if np.isfinite(c) else dz / np.float32(z_ref))
        return q < 1.0
    return inside


def _capsule(half: Sequence[float], r: float, level: float | None = None) -> Inside:
    """Tube of radius ``r`` around the segment from -half to +half; ``level`` keeps only dy > level."""
    h = np.asarray(half, np.float32)
    hh = max(float(h @ h), 1e-6)

    def inside(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray) -> np.ndarray:
        t = np.clip((dx * h[0] + dy * h[1] + dz * h[2]) / hh, -1, 1)
        m = (dx - t * h[0]) ** 2 + (dy - t * h[1]) ** 2 + (dz - t * h[2]) ** 2 < r * r
        return m if level is None else m & (dy > level)
    return inside


def _box(half: Sequence[float], phase: Callable[[np.ndarray], np.ndarray] | None = None) -> Inside:
    """Axis-aligned box; ``phase(dz)`` optionally limits it to some z levels (vertebral processes)."""
    def inside(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray) -> np.ndarray:
        m = (np.abs(dx) <= half[0]) & (np.abs(dy) <= half[1])
        return m & phase(dz) if phase is not None else m
    return inside


def _tube(c: _Canvas, rng: np.random.Generator, hu: dict[str, float], a: np.ndarray, b: np.ndarray,
          r: float, over: Sequence[str], gas_odds: float) -> None:
    """A bowel segment from a to b: wall, then fluid, and gas floating anteriorly above a fluid level."""
    mid, half = (a + b) / 2, (b - a) / 2
    reach = np.abs(half) + r
    c.paint("bowel", hu["bowel"] + rng.uniform(-5, 5), mid, reach, _capsule(half, r), over=over)
    lumen = r - max(0.15 * r, 1.2 * float(c.axes[0][1] - c.axes[0][0]))
    if rng.uniform() < 0.25 or lumen <= 0:
        return  # collapsed loop: wall only, as dense as muscle
    c.paint("fluid", rng.uniform(*HU_RANGES["fluid"]), mid, reach, _capsule(half, lumen), over=("bowel",))
    if rng.uniform() < gas_odds:  # patient supine: gas rises anteriorly (+y)
        c.paint("gas", hu["gas"], mid, reach, _capsule(half, lumen, rng.uniform(-0.6, 0.5) * lumen),
                over=("fluid",))


def _body(c: _Canvas, rng: np.random.Generator, hu: dict[str, float], A: float, B: float,
          Z: float) -> dict[str, float]:
    """Skin outline, subcutaneous fat, muscle wall, visceral fat; returns the frame organs hang on.

    The outline is a superellipse, flatter at the back where the patient lies on the table; its girth
    changes slowly along z. Comparing a 2D level function with a 1D girth keeps this cheap.
    """
    x, y, z = c.axes
    bx, by = rng.uniform(-0.02, 0.02, 2) * A
    vox = float(x[1] - x[0])
    p, tf, tw = rng.uniform(2.2, 2.8), rng.uniform(0.08, 0.14) * A, max(rng.uniform(0.04, 0.06) * A, 1.6 * vox)
    u, v = x[:, None] - bx, y[None, :] - by
    wob = _wobble(rng, 0.03)(u / A, v / B, np.float32(0))
    girth = 1 + 0.03 * np.cos(z / Z * rng.uniform(1, 2) + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    pp = np.where(v < 0, p + 1.0, p).astype(np.float32)
    for tissue, inset in (("fat", 0.0), ("muscle", tf), ("visceral_fat", tf + tw)):
        level = (np.abs(u / (A - inset)) ** pp + np.abs(v / (B - inset)) ** pp) ** (1 / pp) - wob
        mask = level[:, :, None] < girth[None, None, :]
        c.tissue[mask], c.hu[mask] = TISSUES[tissue], hu[tissue]
    rv = rng.uniform(0.12, 0.14) * A  # vertebral body radius: the unit of the posterior anatomy
    return {"bx": bx, "by": by, "A": A, "B": B, "Z": Z, "rv": rv, "yv": by - B + tf + 3.4 * rv}


def _back(c: _Canvas, rng: np.random.Generator, hu: dict[str, float], f: dict[str, float],
          top: float) -> None:
    """Paraspinal muscles behind the transverse processes (as dense as the psoas) and quadratus lumborum."""
    rv, bx, yv, Z = f["rv"], f["bx"], f["yv"], f["Z"]
    for side in (-1, 1):
        radii = (rv * rng.uniform(1.0, 1.1), rv * rng.uniform(0.95, 1.05), np.inf)
        c.paint("paraspinal", hu["paraspinal"], (bx + side * 1.45 * rv, yv - 2.35 * rv, 0.0),
                (2 * rv, 2 * rv, np.inf), _ellipsoid(radii, wobble=_wobble(rng, 0.06), z_ref=Z),
                over=("visceral_fat", "muscle"))
        ql = _ellipsoid((0.8 * rv, 0.4 * rv, np.inf), side * np.deg2rad(-25), _wobble(rng, 0.1), Z)
        c.paint("muscle", hu["muscle"], (bx + side * 2.5 * rv, yv - 1.15 * rv, (top - 2 * Z) / 2),
                (rv, rv, (top + 2 * Z) / 2), ql, over=("visceral_fat",))


def _psoas(c: _Canvas, rng: np.random.Generator, hu: float, f: dict[str, float], top: float) -> None:
    """Psoas from ``top`` caudally: a small round cranial tip widening into a thick caudal belly."""
    rv, A = f["rv"], f["A"]
    span = 1.6 * A  # craniocaudal distance over which the muscle reaches its full width
    for side in (-1, 1):
        r0, r1 = rng.uniform(0.35, 0.45) * rv, rng.uniform(1.15, 1.4) * rv
        drift, wob = rng.uniform(0.1, 0.4) * rv, _wobble(rng, 0.06)

        def inside(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray, r0=r0, r1=r1, drift=drift, wob=wob,
                   side=side) -> np.ndarray:
            dz = dz - 2 * A  # from the cranial tip
            t = np.clip(-dz / span, 0, 1)
            r = (r0 + (r1 - r0) * t) * np.sqrt(np.clip(-dz / (0.1 * A), 0, 1)) + 1e-3  # rounded tip
            u = (dx - side * (1.1 * rv + 0.95 * r + drift * t)) / r
            v = (dy + 0.1 * rv - 0.45 * rv * t) / (0.9 * r)
            return u * u + v * v < 1 + wob(u, v, dz / span)
        c.paint("psoas", hu, (f["bx"], f["yv"], top - 2 * A), (5 * rv, 3 * rv, 2 * A), inside,
                over=("visceral_fat",))


def _solid_organs(c: _Canvas, rng: np.random.Generator, hu: dict[str, float], f: dict[str, float],
                  o: float, liver_cysts: int) -> None:
    """Liver (right upper quadrant, with ``liver_cysts`` cysts), spleen (left, posterior)."""
    A, B, bx, by = f["A"], f["B"], f["bx"], f["by"]
    liver_c = np.array([bx + 0.3 * A, by + 0.05 * B, o + 0.85 * A])
    liver_r = np.array([0.6 * A, 0.8 * B, 0.75 * A]) * rng.uniform(0.9, 1.1, 3)
    c.paint("liver", hu["liver"], liver_c, 1.3 * liver_r, _ellipsoid(liver_r, rng.uniform(-0.3, 0.1),
                                                                     _wobble(rng, 0.15)), over=("visceral_fat",))
    for _ in range(liver_cysts):
        r_min = 1.5 * float(c.axes[0][1] - c.axes[0][0])
        r = r_min * max(1.0, 0.08 * A / r_min) ** rng.uniform()
        ctr = liver_c + rng.uniform(-0.6, 0.6, 3) * liver_r
        c.paint("hepatic_cyst", rng.uniform(*HU_RANGES["hepatic_cyst"]), ctr, (r,) * 3, _ellipsoid((r,) * 3),
                over=("liver",))
    spleen_r = np.array([0.15 * A, 0.32 * A, 0.35 * A]) * rng.uniform(0.85, 1.15, 3)
    c.paint("spleen", hu["spleen"], (bx - 0.55 * A, by - 0.3 * B, o + 0.6 * A), (1.3 * spleen_r.max(),) * 3,
            _ellipsoid(spleen_r, np.deg2rad(rng.uniform(30, 50)), _wobble(rng, 0.15)), over=("visceral_fat",))


def _vessels(c: _Canvas, hu: dict[str, float], f: dict[str, float], o: float) -> None:
    """Aorta and IVC in front of the spine, dividing into iliac vessels along the psoas."""
    rv, bx, yv, Z = f["rv"], f["bx"], f["yv"], f["Z"]
    bif = o - 0.75 * f["A"]
    for x, y, r, below, spread, sink in ((-0.35, 1.5, 0.42, 0.0, 1.7, 0.5), (0.95, 1.4, 0.45, 0.1, 1.4, 0.0)):
        a, b = np.array([bx + x * rv, yv + y * rv, 1.3 * Z]), np.array([bx + x * rv, yv + y * rv, bif - below])
        c.paint("vessel", hu["vessel"], (a + b) / 2, np.abs(b - a) / 2 + r * rv, _capsule((b - a) / 2, r * rv),
                over=("visceral_fat",))
        for side in (-1, 1):
            e = np.array([bx + side * spread * rv, yv + (y + sink) * rv, -1.3 * Z])
            c.paint("vessel", hu["vessel"], (b + e) / 2, np.abs(e - b) / 2 + 0.75 * r * rv,
                    _capsule((e - b) / 2, 0.75 * r * rv), over=("visceral_fat",))


def _kidneys(c: _Canvas, rng: np.random.Generator, hu: dict[str, float], f: dict[str, float], o: float,
             polycystic: bool) -> None:
    """Kidneys beside the spine, the right one lower; polycystic ones enlarged and full of cysts."""
    A, rv = f["A"], f["rv"]
    vox = float(c.axes[0][1] - c.axes[0][0])
    for side in (-1, 1):  # -1: the patient's left (RAS x points to the right)
        scale = (0.28, 0.22, 0.7) if polycystic else (0.16, 0.12, 0.42)
        radii = np.array(scale) * A * rng.uniform(0.9, 1.1, 3)
        ctr = np.array([f["bx"] + side * rng.uniform(0.5, 0.54) * A, f["yv"] + rng.uniform(0.0, 0.4) * rv,
                        o - (0.06 if side > 0 else -0.04) * A])
        angle = -side * np.deg2rad(rng.uniform(20, 35))  # hilum facing antero-medially
        shear = (-side * rng.uniform(0.1, 0.2), -rng.uniform(0.05, 0.15))  # lower pole lateral and anterior
        c.paint("kidney", hu["kidney"], ctr, 1.4 * radii, _ellipsoid(radii, angle, _wobble(
            rng, 0.12 if polycystic else 0.04), shear=shear), over=SOFT)
        ca, sa = np.cos(angle), np.sin(angle)
        if not polycystic:  # renal sinus fat at the hilum
            hil = ctr - side * 0.6 * radii[0] * np.array([ca, sa, 0.0])
            c.paint("visceral_fat", hu["visceral_fat"], hil, radii, _ellipsoid(
                (0.35 * radii[0], 0.45 * radii[1], 0.5 * radii[2]), angle), over=("kidney",))
            continue
        # Cysts: centres uniform in the kidney's ellipsoid (through its rotation and shear), radii
        # log-uniform; the biggest placed first, each kept only clear of the others by a septum of
        # parenchyma, so they stay round instead of fusing into blotches.
        n = 1500
        p = rng.normal(size=(n, 3))
        p *= (rng.uniform(0, 1, n) ** (1 / 3) * 0.95 / np.linalg.norm(p, axis=1))[:, None] * radii
        x, y = ca * p[:, 0] - sa * p[:, 1], sa * p[:, 0] + ca * p[:, 1]
        centres = ctr + np.stack([x + shear[0] * p[:, 2], y + shear[1] * p[:, 2], p[:, 2]], axis=1)
        r_max = radii[1] * rng.uniform(0.35, 0.45)
        cyst_r = np.sort(1.3 * vox * max(1.0, r_max / (1.3 * vox)) ** rng.uniform(0, 1, n))[::-1]
        kept: list[int] = []
        for i in range(n):
            gap = np.linalg.norm(centres[kept] - centres[i], axis=1) - cyst_r[kept] - cyst_r[i]
            if not kept or gap.min() > 0.6 * vox:
                kept.append(i)
                r = cyst_r[i]
                c.paint("cyst", rng.uniform(*HU_RANGES["cyst"]), centres[i], (r,) * 3, _ellipsoid((r, r, r)),
                        over=("kidney", "cyst", *SOFT))


def _bowel(c: _Canvas, rng: np.random.Generator, hu: dict[str, float], f: dict[str, float], o: float) -> None:
    """Colon in the flanks and across the top, small-bowel loops in front: mixed wall, fluid and gas."""
    A, B, bx, yv, rv, Z = f["A"], f["B"], f["bx"], f["yv"], f["rv"], f["Z"]
    over = ("visceral_fat",)
    front = f["by"] + 0.55 * B
    for side in (-1, 1):
        a = np.array([bx + side * 0.62 * A, yv + 1.8 * rv, -1.2 * Z])
        b = a + np.array([rng.uniform(-0.05, 0.05) * A, rng.uniform(0, 0.2) * A, o + 0.5 * A + 1.2 * Z])
        _tube(c, rng, hu, a, b, rng.uniform(0.1, 0.14) * A, over, 0.8)
    z_tc = o + rng.uniform(0.3, 0.5) * A
    _tube(c, rng, hu, np.array([bx - 0.62 * A, front, z_tc]), np.array([bx + 0.62 * A, front, z_tc]),
          rng.uniform(0.1, 0.13) * A, over, 0.8)
    for _ in range(int(rng.integers(50, 80))):
        ctr = np.array([bx + rng.uniform(-0.55, 0.55) * A, rng.uniform(yv + 2 * rv, front), rng.uniform(-Z, Z)])
        d = rng.normal(size=3)
        half = d / np.linalg.norm(d) * rng.uniform(0.1, 0.3) * A
        _tube(c, rng, hu, ctr - half, ctr + half, rng.uniform(0.06, 0.1) * A, over, 0.3)


def _spine(c: _Canvas, rng: np.random.Generator, hu: dict[str, float], f: dict[str, float]) -> None:
    """Vertebral bodies (cortical shell, cancellous core) with discs, arch, spinous and transverse processes."""
    rv, sx, yv = f["rv"], f["bx"], f["yv"]
    period, z0 = rv * rng.uniform(1.5, 1.8), rng.uniform(0, 3 * rv)

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
            _box((0.15 * rv, 0.6 * rv), levels(0.3, 0.9)))  # spinous process
    arch = (sx, yv - 1.5 * rv, 0.0)
    c.paint("cortical_bone", hu["cortical_bone"], arch, full, _ellipsoid((0.62 * rv, 0.62 * rv, np.inf)))
    c.paint("spinal_canal", hu["spinal_canal"], arch, full, _ellipsoid((0.4 * rv, 0.4 * rv, np.inf)))


_GROUP = np.full(len(TISSUES), 255, np.uint8)
for _g, _names in enumerate(PLANES):
    _GROUP[[TISSUES[n] for n in _names]] = _g


def _fat_planes(c: _Canvas, hu: float) -> None:
    """Where organs touch, turn the weaker one's voxels within two pixels (or one slice) into fat."""
    g = _GROUP[c.tissue]
    near = np.minimum(ndimage.minimum_filter(g, size=(5, 5, 1)), ndimage.minimum_filter(g, size=(3, 3, 3)))
    plane = (g < 255) & (near < g)
    c.tissue[plane], c.hu[plane] = TISSUES["visceral_fat"], hu


def _noise_gain(blur: Sequence[float]) -> float:
    """By how much a Gaussian blur (scipy's kernel, truncated at 4 sigma) shrinks white noise."""
    gain = 1.0
    for s in blur:
        x = np.arange(-int(4 * s + 0.5), int(4 * s + 0.5) + 1)
        w = np.exp(-0.5 * (x / s) ** 2)
        gain *= float(np.sqrt(((w / w.sum()) ** 2).sum()))
    return gain


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
    world = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(size, spacing)]
    # Framing: the body's half-width A fills the field of view; the slices span 2 Z of anatomy.
    A = rng.uniform(*BODY_WIDTH) * float(world[0][-1])
    B = min(A * rng.uniform(0.68, 0.78), 0.9 * float(world[1][-1]))
    Z = rng.uniform(1.0, 1.2) * A
    canvas = _Canvas([world[0], world[1], world[2] * np.float32(Z / world[2][-1])])
    hu = {name: rng.uniform(lo, hi) for name, (lo, hi) in HU_RANGES.items()}
    if task == "kidney":
        hu.update({name: rng.uniform(lo, hi) for name, (lo, hi) in ENHANCED.items()})
    # Kidney centre level: mid-volume for the kidney task, high for the psoas task (kidneys to pelvis).
    o = rng.uniform(-0.05, 0.1) * Z if task == "kidney" else rng.uniform(0.42, 0.5) * Z
    f = _body(canvas, rng, hu, A, B, Z)
    top = o + rng.uniform(0.2, 0.35) * A  # the psoas' cranial tip, near the upper kidney poles
    _psoas(canvas, rng, hu["paraspinal"] + rng.uniform(-PSOAS_CONTRAST, PSOAS_CONTRAST), f, top)
    _back(canvas, rng, hu, f, top)
    _solid_organs(canvas, rng, hu, f, o, int(rng.integers(2, 8)) if task == "kidney" else 0)
    _vessels(canvas, hu, f, o)
    _kidneys(canvas, rng, hu, f, o, polycystic=task == "kidney")
    _bowel(canvas, rng, hu, f, o)
    _spine(canvas, rng, hu, f)
    _fat_planes(canvas, hu["visceral_fat"])

    # Partial volume, in voxels: a wider in-plane point spread; through-plane, about one slice profile.
    # Noise passes through the same reconstruction kernel, which gives it CT's blotchy texture.
    blur = (*(rng.uniform(0.5, 0.9),) * 2, rng.uniform(0.4, 0.6))
    noise = rng.standard_normal(canvas.hu.shape, dtype=np.float32)
    noise *= np.float32(rng.uniform(8, 18) / _noise_gain(blur))
    image = ndimage.gaussian_filter(canvas.hu + noise, blur, mode="nearest")
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    tissue = canvas.tissue
    label = np.isin(tissue, [TISSUES[t] for t in LABELS[task]]).astype(np.uint8)

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [a[0] for a in world]
    if rng.uniform() < 0.5:  # LPS storage: same world anatomy, x and y reversed in the array
        affine[:2, :2] *= -1
        affine[:2, 3] = [world[0][-1], world[1][-1]]
        image, label, tissue = (np.ascontiguousarray(a[::-1, ::-1]) for a in (image, label, tissue))
    return Phantom(image, label, affine, tissue)
