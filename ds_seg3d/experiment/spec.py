"""What a named comparison is: its arms, its budget, its data; no running here (see ``experiment.run``)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

from ds_seg3d.paths import DEFAULT_DISCRIMINATOR_CONFIG, DEFAULT_DS_CONFIG, shipped

PY = [sys.executable, "-m"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Budget and launch of one run, the same for every arm. ``hostfile`` replaces ``--num_gpus ranks``;
    ``overrides`` are ``--set`` items for every arm's training; relative config paths name shipped files
    (``ds_seg3d.paths.shipped``)."""

    cases: int = 20
    steps: int = 300
    ranks: int = 2
    stages: int = 2
    seed: int = 0
    phantom_shape: tuple[int, int, int] | None = None
    deepspeed_config: str = DEFAULT_DS_CONFIG
    discriminator_config: str = DEFAULT_DISCRIMINATOR_CONFIG
    hostfile: str | None = None
    plan_budget_gb: float = 0.15
    """Memory per rank the shards' networks are planned for (``ds-seg3d plan``); on a CPU the real limit is
    time, and this budget keeps a planned 3D step near one second on 2 cores."""
    plan_base_width: int = 8
    """Channels at full resolution of the planned networks (nnU-Net: 32; the CPU default is narrower)."""
    overrides: tuple[str, ...] = ()
    arm_overrides: tuple[tuple[str, str], ...] = ()
    """``(arm, "section.field=value")``: a ``--set`` for that arm alone (widths matched per network, say)."""

    def arm_sets(self, arm: str) -> list[str]:
        """Every ``--set`` item of one arm's training: the shared ones, then the arm's own."""
        return [*self.overrides, *(item for name, item in self.arm_overrides if name == arm)]


@dataclasses.dataclass(frozen=True)
class Arm:
    """``train_args`` is what this arm adds to the shared training command; ``config`` (a shipped
    ``experiments/...`` TOML) replaces the comparison's experiment TOML for this arm (another network, say)."""

    name: str
    description: str
    train_args: Callable[[Settings], list[str]] = lambda s: []
    config: str | None = None


@dataclasses.dataclass(frozen=True)
class Comparison:
    """``heading``: its EXPERIMENTS.md section; ``labels``: ``evaluate --labels``; ``config``: a shipped
    ``experiments/...`` TOML; ``question``, ``caveat``, ``scale_up``: the section's fixed markdown."""

    name: str
    heading: str
    task: str
    labels: str
    config: str
    spacing: tuple[float, float, float]
    val_fraction: float
    test_fraction: float
    arms: tuple[Arm, ...]
    question: str
    caveat: str
    scale_up: str
    defaults: Settings = Settings()
    data: Callable[["Comparison", Settings, Path], list[tuple[str, list[str]]]] = lambda c, s, out: data_cmds(c, s, out)
    """The commands that build ``out/shards`` (default: phantoms of ``task``, then shards)."""
    data_text: Callable[["Comparison", Settings, str], str] = lambda c, s, splits: (
        f"{s.cases} `{c.task}` phantoms (seed {s.seed}; {splits})")
    """How the section's Data line names the data; ``splits`` reads "14 train, 2 val, 4 test"."""
    phantoms: bool = True
    """Whether ``data`` generates phantoms (``--cases`` and ``--phantom-shape`` mean something)."""
    target: Callable[[list[dict]], str] | None = None
    """A sentence on whether the rows meet the comparison's stated target, if it has one."""
    reframe: tuple[float, float] | None = None
    """(spacing in mm, anterior fraction cut): also predict every test scan resampled to that isotropic
    spacing with that part of its field of view cut away (``data-tools regrid``), put the prediction back
    on the scan's grid and score its agreement with the prediction of the scan as it is."""

    def arm_config(self, arm: Arm) -> str:
        return arm.config or self.config


def data_cmds(c: Comparison, s: Settings, out: Path) -> list[tuple[str, list[str]]]:
    """Phantoms, then shards, then their plans: one dataset for every arm."""
    shape = ["--shape", *map(str, s.phantom_shape)] if s.phantom_shape else []
    return [("phantoms", [*PY, "data_tools", "phantoms", str(out / "phantoms"), "--task", c.task,
                          "--cases", str(s.cases), "--seed", str(s.seed), *shape]),
            shards_cmd(c, s, out / "phantoms", out), plan_cmd(s, out)]


def shards_cmd(c: Comparison, s: Settings, source: Path, out: Path) -> tuple[str, list[str]]:
    return ("build-shards", [*PY, "data_tools", "build-shards", str(source), str(out / "shards"),
                             "--spacing", *map(str, c.spacing), "--seed", str(s.seed),
                             "--val-fraction", str(c.val_fraction), "--test-fraction", str(c.test_fraction)])


def plan_cmd(s: Settings, out: Path) -> tuple[str, list[str]]:
    """The shards' 3D and 2D networks, planned for the run's ranks and stages (``ds-seg3d plan SHARDS``)."""
    return ("plan", [*PY, "ds_seg3d", "plan", str(out / "shards"), "--budget-gb", f"{s.plan_budget_gb:g}",
                     "--ranks", str(s.ranks), "--stages", str(s.stages), "--base-width", str(s.plan_base_width),
                     "--deepspeed-config", str(shipped(s.deepspeed_config))])
