"""Imports run one way: models/ imports nothing from pretrain/ or tools/ (read from the source,
every ``import`` and ``from ... import`` statement of every module under models/)."""

from __future__ import annotations

import ast
from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "models"


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_models_import_nothing_from_the_trainer_or_the_tools():
    files = sorted(MODELS.rglob("*.py"))
    assert len(files) > 10
    offenders = {str(f.relative_to(MODELS)): imported_packages(f) & {"pretrain", "tools"} for f in files}
    assert {f: packages for f, packages in offenders.items() if packages} == {}


def test_the_command_line_parses_without_loading_torch():
    """``pretrain data ...`` and ``--help`` start fast: building the parser imports no torch
    (each command imports what it runs)."""
    import subprocess
    import sys

    code = "import sys, pretrain.cli; pretrain.cli.build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
