"""Packaging checks: manifest, lint, and the layering (import-linter contracts in pyproject)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; install the project with the [dev] extra")
    return found


def test_npe2_manifest_validates_with_imports():
    out = subprocess.run(
        [_tool("npe2"), "validate", "--imports", "napari-discreg"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_passes():
    out = subprocess.run(
        [_tool("ruff"), "check", "src", "tests", "benchmarks", "scripts"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_core_imports_without_qt_or_napari():
    code = (
        "import sys, napari_discreg, napari_discreg.core.learning.train, napari_discreg.core.registration.register, "
        "napari_discreg.core.learning.evaluate, napari_discreg.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'magicgui', 'vispy'))\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_import_layering_contracts_hold():
    # the contracts live in pyproject.toml ([tool.importlinter]); import-linter reads the
    # imports of every module, also those inside functions
    out = subprocess.run([_tool("lint-imports")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 4 kept, 0 broken" in out.stdout, out.stdout
    assert "core imports no matplotlib" in out.stdout


def test_mypy_passes_on_core_and_runs():
    # the files are listed in pyproject.toml ([tool.mypy] files)
    out = subprocess.run([_tool("mypy")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_package_import_is_light():
    """``import napari_discreg`` (napari's plugin discovery) imports neither torch nor
    scipy; the public names load on first use."""
    import subprocess
    import sys

    code = (
        "import sys, napari_discreg as nd; "
        "assert 'torch' not in sys.modules and 'scipy' not in sys.modules, 'heavy import'; "
        "assert callable(nd.register) and 'torch' in sys.modules; "
        "assert nd.core.registration.register.DEFAULT_METHOD == nd.DEFAULT_METHOD; "
        "assert set(nd.__all__) == set(nd._LAZY) and set(nd.__all__) <= set(dir(nd))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
