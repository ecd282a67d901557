"""The package a reader installs works: build the wheel, install it in a fresh venv, test the installed copy.

`make dist` builds the same wheel and sdist into dist/. Here both are built from a copy of the sources (the
checkout stays untouched), the wheel is installed with pip into a new virtual environment, and a subset of the
unit tests plus every module's doctests run there, from a temporary folder, against the installed package.

Offline and fast: the build uses the project environment's setuptools (``--no-isolation``), pip installs the
wheel alone (``--no-deps --no-index``), and the new environment borrows torch, numpy, pytest, ... from the
project environment through a ``.pth`` file. Plain path lines in a ``.pth`` file add a folder to ``sys.path``
but do not process that folder's own ``.pth`` files, so the project's editable install of qbook stays inactive
there and ``import qbook`` can only find the installed wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.1.0"

#: Unit tests of the core modules that run against the installed package: fast ones (the whole check stays
#: well under a minute); every module is also imported and its doctests run.
UNIT_TESTS = ["test_affine.py", "test_granularity.py", "test_roofline.py"]

CHECK_INSTALLED = """\
import importlib
import pkgutil
import sys
from pathlib import Path

import qbook


def test_qbook_is_the_installed_wheel():
    site = Path(sys.prefix).resolve()
    assert Path(qbook.__file__).resolve().is_relative_to(site), qbook.__file__
    for module in pkgutil.walk_packages(qbook.__path__, "qbook."):
        path = Path(importlib.import_module(module.name).__file__).resolve()
        assert path.is_relative_to(site), (module.name, path)
    assert (Path(qbook.__file__).parent / "py.typed").is_file()
"""


def run(*args: str | os.PathLike, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [str(arg) for arg in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{args}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist and wheel, built as `make dist` builds them, from a copy of the package's sources."""
    pytest.importorskip("build", reason="the 'build' package (test extra) builds the wheel")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "qbook", src / "qbook", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src, cwd=src)
    return out


def test_dist_holds_the_package(dist):
    wheel, sdist = dist / f"qbook-{VERSION}-py3-none-any.whl", dist / f"qbook-{VERSION}.tar.gz"
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "qbook").rglob("*.py")}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"qbook-{VERSION}.dist-info/METADATA").decode()
    assert modules | {"qbook/py.typed"} <= names
    assert "License-Expression: MIT" in metadata
    with tarfile.open(sdist) as archive:
        names = {name.removeprefix(f"qbook-{VERSION}/") for name in archive.getnames()}
    assert modules | {"pyproject.toml", "README.md"} <= names


def test_installed_wheel_passes_the_unit_tests(dist, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run(python, "-c", purelib, cwd=tmp_path).stdout.strip())
    project_site = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "qbook_project_env.pth").write_text("".join(f"{path}\n" for path in project_site))

    wheel = dist / f"qbook-{VERSION}-py3-none-any.whl"
    pip_install = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet"]
    run(*pip_install, "--no-deps", "--no-index", wheel, cwd=tmp_path)

    tests = tmp_path / "tests"  # a copy: the checkout must not be on sys.path
    tests.mkdir()
    for name in UNIT_TESTS:
        shutil.copy2(ROOT / "tests" / name, tests / name)
    (tests / "test_installed.py").write_text(CHECK_INSTALLED)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    pytest_args = ["-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--doctest-modules"]
    result = run(python, "-m", "pytest", *pytest_args, tests, site / "qbook", cwd=tmp_path)
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-2000:]
