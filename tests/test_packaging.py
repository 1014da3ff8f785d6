"""What gets installed: every package folder listed, integrations/ under its own import name.

`integrations/` installs as `grefine_integrations`; a module named `integrations` in
site-packages would clash with anyone else's. The wheel test builds the real wheel with the
installed setuptools (no network), so a non-editable install holds what an editable one does.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_folders() -> set[str]:
    """Import names of every folder with an ``__init__.py`` under the mapped package dirs."""
    names = set()
    for name, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            names.add(".".join((name, *relative.parts)))
    return names


def test_every_package_folder_is_listed():
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == _package_folders()


def test_the_core_never_imports_integrations():
    for path in (ROOT / "grefine_hooks").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name.split(".")[0] in {"integrations", "grefine_integrations"} for name in names), path


def test_installed_names_from_outside_the_checkout(tmp_path):
    code = (
        "import importlib.util, grefine_integrations.serve as serve, grefine_hooks.cli as cli;"
        "assert importlib.util.find_spec('integrations') is None;"
        "assert 'serve' in cli.build_parser()._subparsers._group_actions[0].choices;"
        "print(serve.__file__)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent == ROOT / "integrations" / "serve"


def test_the_wheel_holds_the_packages_their_data_and_the_command(tmp_path):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ behind
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "NOTICE"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("grefine_hooks", "integrations"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = tmp_path.glob("grefine_hooks-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "grefine_integrations/serve/static/index.html" in names
    assert "grefine_integrations/serve/service.py" in names
    assert "grefine_integrations/comfyui/example_workflow_api.json" in names
    assert "grefine_integrations/comfyui/README.md" in names
    assert any(name.startswith("grefine_hooks/data/") for name in names)
    assert not any(name.startswith("integrations/") for name in names)
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[grefine_hooks.commands]" in text and "serve = grefine_integrations.serve.command:register" in text
