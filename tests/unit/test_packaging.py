"""What `pip install` ships: every package folder of the repo is in the wheel's package list."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def configured() -> tuple[list[str], dict[str, str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setuptools["packages"], setuptools.get("package-dir", {})


def package_folders() -> dict[str, Path]:
    """Installed package name -> folder, for every folder with an `__init__.py` that should ship."""
    _, dirs = configured()
    found = {".".join(p.parent.relative_to(ROOT).parts): p.parent for p in (ROOT / "absorber_memory").rglob("__init__.py")}
    for name, folder in dirs.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found[".".join((name, *rel))] = init.parent
    return found


def test_every_package_folder_is_in_the_wheel():
    packages, _ = configured()
    missing = sorted(set(package_folders()) - set(packages))
    assert missing == [], f"add {missing} to [tool.setuptools] packages in pyproject.toml"


def test_every_listed_package_exists():
    packages, _ = configured()
    assert sorted(set(packages) - set(package_folders())) == []


def test_the_check_sees_the_bench_package():
    assert "absorber_memory.bench" in package_folders()
