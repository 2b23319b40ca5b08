"""The package's shape: import contracts (import-linter), a small top level, every package shipped."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.launch import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_import_contracts_hold() -> None:
    """Layers data/models -> parallel -> training/inference/evaluation -> experiment/memory -> commands,
    no cycles anywhere, no DeepSpeed in the models, no anatomy in parallel, nothing from data_tools."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    contracts = PYPROJECT["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in proc.stdout
    assert {c["type"] for c in contracts} == {"layers", "forbidden", "acyclic_siblings"}


def test_top_level_holds_few_modules() -> None:
    modules = sorted(p.name for p in (REPO_ROOT / "ds_seg3d").glob("*.py"))
    assert len(modules) <= 7, modules


def test_every_package_is_shipped() -> None:
    """Packages are listed by name in pyproject.toml (two are mapped from the repository's top level):
    a new subpackage that is not listed would be missing from an installed copy."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO_ROOT).parts)
               for root in ("ds_seg3d", "data_tools") for p in (REPO_ROOT / root).rglob("__init__.py")}
    assert on_disk <= listed, sorted(on_disk - listed)
    mapped = PYPROJECT["tool"]["setuptools"]["package-dir"]
    for package, folder in mapped.items():
        assert package in listed and (REPO_ROOT / folder).is_dir()
        globs = PYPROJECT["tool"]["setuptools"]["package-data"][package]
        assert any((REPO_ROOT / folder).glob(g) for g in globs), (package, globs)


def test_shipped_configs_resolve_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    from ds_seg3d import paths
    from ds_seg3d.config import load_config
    from ds_seg3d.parallel.ds_config import load_ds_config

    monkeypatch.chdir(tmp_path)
    assert load_ds_config("ds_configs/pipeline_zero1_gpu_bf16.json")["bf16"]["enabled"] is True
    assert load_config("experiments/kidney_2d.toml").model.plan == "2d"
    assert paths.resolve("ds_configs/none.json") == Path("ds_configs/none.json")  # reported missing by the caller
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "mine.json").write_text("{}")
    assert paths.resolve("ds_configs/mine.json") == Path("ds_configs/mine.json")  # the user's own file wins
