"""The project travels as a wheel (the GPU machine installs it, not this checkout): every package
directory of the source tree must be in it, with its package data."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the name it installs under (pyproject's package-dir)
TREES = {"torus_plugins": "torus_plugins", "adapters": "torus_adapters", "adapters/seed_api": "torus_sparse"}


def _source_files() -> set[str]:
    out = {}
    for src, dst in TREES.items():  # the longer source folder wins (seed_api sits inside adapters/)
        for f in (ROOT / src).rglob("*"):
            if "__pycache__" in f.parts or not f.is_file() or f.suffix not in (".py", ".c"):
                continue
            out[f] = f"{dst}/{f.relative_to(ROOT / src).as_posix()}"
    return set(out.values())


def test_wheel_holds_every_module(tmp_path: Path) -> None:
    # Built from a copy: setuptools' build/ folder in the checkout keeps files of earlier builds.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for tree in ("torus_plugins", "adapters"):
        shutil.copytree(ROOT / tree, src / tree, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("torus_sparse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_source_files() - names)
    assert not missing, f"modules missing from the wheel (add their package to pyproject.toml): {missing}"
