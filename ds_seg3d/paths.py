"""Every location the project reads by default: shipped configs, the sample CT, the source checkout.

The DeepSpeed JSON files of ``ds_configs/`` and the experiment TOML files of ``experiments/`` ship
inside the package (``ds_seg3d/_shipped/<folder>/``, see ``[tool.setuptools]`` in pyproject.toml),
so the defaults resolve after a plain ``pip install`` and from any working folder. In a source
checkout (an editable install) the same relative names resolve to the checkout's own folders, so an
edit there takes effect at once. Paths a user passes (``--config``, ``--deepspeed_config``) are taken
as they are and never looked up here.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGE = Path(str(resources.files("ds_seg3d")))
"""The installed ``ds_seg3d`` package folder."""
IMPORT_ROOT = PACKAGE.parent
"""The folder from which ``import ds_seg3d`` finds this copy: put on a child's ``PYTHONPATH``."""
SHIPPED = PACKAGE / "_shipped"
"""Where a wheel carries ``ds_configs/`` and ``experiments/``."""
SHIPPED_FOLDERS = ("ds_configs", "experiments")

SAMPLE_CT = PACKAGE / "sample_data" / "totalseg_small"
"""A small real abdominal CT with TotalSegmentator's labels (see the NOTICE beside it)."""
SAMPLE_CT_IMAGE = SAMPLE_CT / "example_ct_sm.nii.gz"
SAMPLE_CT_LABEL = SAMPLE_CT / "example_seg.nii.gz"

DEFAULT_DS_CONFIG = "ds_configs/pipeline_zero1_cpu_fp32.json"
"""The segmenter's DeepSpeed config when none is given (CPU, fp32, ZeRO-1)."""
DEFAULT_DISCRIMINATOR_CONFIG = "ds_configs/discriminator_cpu_fp32.json"
PLAIN_ZERO3_CONFIG = "ds_configs/plain_zero3.json"


def source_checkout() -> Path | None:
    """The repository root when this package runs from a source checkout, else None."""
    root = IMPORT_ROOT
    return root if (root / "pyproject.toml").is_file() and (root / "ds_configs").is_dir() else None


def shipped(relative: str | Path) -> Path:
    """A shipped file by its name in the repository, e.g. ``"ds_configs/plain_zero3.json"``.

    The checkout's file when running from one, else the copy inside the installed package. An
    absolute path is returned unchanged, so callers may pass either.
    """
    relative = Path(relative)
    if relative.is_absolute():
        return relative
    if not relative.parts or relative.parts[0] not in SHIPPED_FOLDERS:
        raise ValueError(f"{relative}: not a shipped file (those live under {' or '.join(SHIPPED_FOLDERS)}/)")
    checkout = source_checkout()
    return (checkout if checkout is not None else SHIPPED) / relative


def resolve(path: str | Path) -> Path:
    """A config path a user gave: itself when it exists; else, when it names a shipped file relative to
    the repository (``ds_configs/...``, ``experiments/...``), the shipped copy; else itself unchanged, for
    the caller to report as missing. So the documented commands work from any folder after an install."""
    given = Path(path)
    if given.exists() or given.is_absolute() or not given.parts or given.parts[0] not in SHIPPED_FOLDERS:
        return given
    copy = shipped(given)
    return copy if copy.exists() else given
