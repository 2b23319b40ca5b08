"""Patches per second per core of nnU-Net's training augmentation in three libraries.

nnU-Net v2.8.1's pipeline (``nnUNetTrainer.get_training_transforms``): rotation (p 0.2, +-30 degrees
per axis, or +-180 in-plane when a patch is anisotropic) and scaling (p 0.2, 0.7-1.4) sampled from a
larger region and cropped to the patch, Gaussian noise (p 0.1), Gaussian blur (p 0.2), multiplicative
brightness (p 0.15), contrast (p 0.15), simulated low resolution (p 0.25), inverted gamma (p 0.1),
gamma (p 0.3), mirroring on every axis. Each library builds it as closely as it can:

- batchgeneratorsv2: nnU-Net's own transforms with nnU-Net's arguments;
- MONAI: RandAffine (rotation, then scaling, onto the patch grid), RandGaussianNoise, RandGaussianSmooth,
  RandScaleIntensity, RandScaleIntensityFixedMean, RandSimulateLowResolution, RandAdjustContrast
  (gamma, plain and inverted), RandFlip per axis;
- torchio: RandomAffine, RandomNoise, RandomBlur, RandomGamma, RandomFlip (it has no brightness,
  contrast or low-resolution transform of nnU-Net's kind: the missing ones are named in the table).

Each library runs single-threaded (``torch.set_num_threads(1)``) on the same random image and label, with
a warm-up, then ``--patches`` timed patches. ``--write-md`` replaces the "Augmentation" section of
BENCHMARKS.md. Run with the project venv and the ``augment-bench`` packages (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from ds_seg3d.results import write_section  # noqa: E402

SECTION = "## Augmentation"
ROTATION = math.radians(30)


def batchgenerators_v2(patch: tuple[int, ...]) -> Callable[[np.ndarray, np.ndarray], Any]:
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    pipeline = ComposeTransforms([
        SpatialTransform(patch, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                         p_rotation=0.2, rotation=(-ROTATION, ROTATION), p_scaling=0.2, scaling=(0.7, 1.4),
                         p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
                         border_mode_seg="constant", padding_value_seg=-1),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=True),
                        apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None,
                                                       allowed_channels=None, p_per_channel=0.5),
                        apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
        MirrorTransform(allowed_axes=(0, 1, 2)),
    ])

    def run(image: np.ndarray, label: np.ndarray) -> Any:
        out = pipeline(image=torch.from_numpy(image), segmentation=torch.from_numpy(label[None]).to(torch.int16))
        return out["image"], out["segmentation"]
    return run


def monai_pipeline(patch: tuple[int, ...]) -> Callable[[np.ndarray, np.ndarray], Any]:
    from monai import transforms as mt

    keys = ("image", "label")
    pipeline = mt.Compose([
        mt.RandAffined(keys, prob=0.2, rotate_range=(ROTATION,) * 3, spatial_size=patch, mode=("bilinear", "nearest"),
                       padding_mode="zeros"),
        mt.RandAffined(keys, prob=0.2, scale_range=(0.4,) * 3, spatial_size=patch, mode=("bilinear", "nearest"),
                       padding_mode="zeros"),
        mt.CenterSpatialCropd(keys, roi_size=patch),
        mt.RandGaussianNoised("image", prob=0.1, std=math.sqrt(0.1)),
        mt.RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1), sigma_y=(0.5, 1), sigma_z=(0.5, 1)),
        mt.RandScaleIntensityd("image", prob=0.15, factors=0.25),
        mt.RandScaleIntensityFixedMeand("image", prob=0.15, factors=0.25, preserve_range=True),
        mt.RandSimulateLowResolutiond("image", prob=0.25, zoom_range=(0.5, 1.0)),
        mt.RandAdjustContrastd("image", prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
        mt.RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
        *[mt.RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(3)],
    ])
    pipeline.set_random_state(0)

    def run(image: np.ndarray, label: np.ndarray) -> Any:
        out = pipeline({"image": torch.from_numpy(image), "label": torch.from_numpy(label[None])})
        return out["image"], out["label"]
    return run


def torchio_pipeline(patch: tuple[int, ...]) -> Callable[[np.ndarray, np.ndarray], Any]:
    import torchio as tio

    pipeline = tio.Compose([
        tio.RandomAffine(scales=(0.7, 1.4), degrees=30, p=0.36),  # rotation or scaling: 1 - 0.8^2
        tio.RandomNoise(std=(0, math.sqrt(0.1)), p=0.1),
        tio.RandomBlur(std=(0.5, 1.0), p=0.2),
        tio.RandomGamma(log_gamma=(math.log(0.7), math.log(1.5)), p=0.3),
        tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5),
        tio.CropOrPad(patch),
    ])

    def run(image: np.ndarray, label: np.ndarray) -> Any:
        subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(image)),
                              label=tio.LabelMap(tensor=torch.from_numpy(label[None]).to(torch.int16)))
        out = pipeline(subject)
        return out["image"].data, out["label"].data
    return run


LIBRARIES = {
    "batchgeneratorsv2": ("batchgeneratorsv2", batchgenerators_v2, "all of nnU-Net's (its own transforms)"),
    "monai": ("monai", monai_pipeline, "all of nnU-Net's kinds"),
    "torchio": ("torchio", torchio_pipeline, "no brightness, contrast, low resolution or inverted gamma"),
}


def region(patch: tuple[int, ...]) -> tuple[int, ...]:
    """What the loader reads around a patch so that rotation and scaling never pad inside it (nnU-Net's
    ``get_patch_size`` for +-30 degrees and scaling down to 0.85, rounded up to even)."""
    grow = 1.0 / 0.85 * (abs(math.cos(ROTATION)) + abs(math.sin(ROTATION)))
    return tuple(int(2 * math.ceil(p * grow / 2)) for p in patch)


def measure(name: str, patch: tuple[int, ...], patches: int, warmup: int = 5) -> dict[str, Any]:
    module, build, coverage = LIBRARIES[name]
    try:
        from importlib import metadata

        version = metadata.version(module)
        run = build(patch)
    except (ImportError, metadata.PackageNotFoundError) as e:
        return {"library": name, "status": f"not installed ({e})"}
    np.random.seed(0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    shape = region(patch)
    image = rng.standard_normal((1, *shape)).astype(np.float32)
    label = (rng.random(shape) > 0.7).astype(np.uint8)
    for _ in range(warmup):
        run(image, label)
    start = time.perf_counter()
    for _ in range(patches):
        out_image, out_label = run(image, label)
    seconds = time.perf_counter() - start
    assert tuple(out_image.shape[-3:]) == patch, (name, out_image.shape)
    return {"library": name, "version": version, "patch": patch, "region": shape, "patches": patches,
            "per_second": patches / seconds, "ms": 1000 * seconds / patches, "coverage": coverage, "status": "ok"}


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    import os

    lines = [SECTION, "", f"Written by `{command}` on {now:%Y-%m-%d %H:%M} UTC.  ",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
             f"{os.getloadavg()[0]:.2f} at the end; one thread (`torch.set_num_threads(1)`); torch "
             f"{torch.__version__}.", "",
             "nnU-Net v2.8.1's training augmentation built in each library (see the script's docstring), applied to "
             "a region around the patch (what the loader reads so that rotation never pads inside it), then the "
             "patch. Patches per second on one core:", "",
             "| library | version | patch | region read | patches / s / core | ms / patch | nnU-Net's transforms |",
             "|---|---|---|---|---:|---:|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['library']} | - | - | - | - | - | {r['status']} |")
            continue
        lines.append(f"| {r['library']} | {r['version']} | {'x'.join(map(str, r['patch']))} | "
                     f"{'x'.join(map(str, r['region']))} | {r['per_second']:.1f} | {r['ms']:.1f} | {r['coverage']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patch", type=int, nargs=3, action="append", metavar=("X", "Y", "Z"),
                   help="patch sizes (default: 64 64 32 and 96 80 72)")
    p.add_argument("--patches", type=int, default=60, help="timed patches per library and size")
    p.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES))
    p.add_argument("--write-md", action="store_true", help="replace the section of --md")
    p.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for patch in [tuple(x) for x in (args.patch or [(64, 64, 32), (96, 80, 72)])]:
        for name in args.libraries:
            row = measure(name, patch, args.patches)
            rows.append(row)
            print(row if row["status"] != "ok" else
                  f"{name:>18} {'x'.join(map(str, patch)):>10}: {row['per_second']:.1f} patches/s ({row['ms']:.1f} ms)",
                  flush=True)
    if args.write_md:
        command = "python benchmarks/bench_augment.py" + (" " + " ".join(argv) if argv else "")
        write_section(args.md, markdown(rows, command))
        print(f"wrote the section {SECTION[3:]!r} of {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
