"""Packaging checks: manifest, lint, and the one-way layering core <- _widgets."""

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
        "import sys, napari_discreg, napari_discreg.core.train, napari_discreg.core.register, "
        "napari_discreg.core.evaluate, napari_discreg.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'magicgui', 'vispy'))\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_core_sources_never_import_gui_modules():
    offenders = []
    for path in (ROOT / "src" / "napari_discreg" / "core").rglob("*.py"):
        text = path.read_text()
        for mod in ("qtpy", "PyQt", "PySide", "napari", "magicgui", "vispy"):
            for line in text.splitlines():
                stripped = line.strip()
                if (
                    stripped.startswith(("import ", "from "))
                    and (
                        f" {mod}" in stripped.split(" import")[0]
                        or stripped.startswith(f"import {mod}")
                    )
                    and not stripped.startswith("from .")
                ):
                    if mod == "napari" and "napari_discreg" in stripped:
                        continue
                    offenders.append(f"{path.name}: {stripped}")
    assert not offenders, offenders
