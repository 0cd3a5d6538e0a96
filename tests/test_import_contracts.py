"""The import graph: import-linter's contracts (setup.cfg) hold, no module-level import cycle, and imports
inside functions stay rare (only optional or heavy third-party packages, each with a reason)."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clipconv"
#: third-party packages that may be imported inside a function (optional extra or heavy and rarely needed)
LAZY_ALLOWED = {"matplotlib", "sklearn", "webdataset"}


def _function_imports() -> list[tuple[str, int, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lines = path.read_text(encoding="utf-8").splitlines()
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                        found.append((f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", (module or "").split(".")[0],
                                      lines[node.lineno - 1]))
    return found


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is missing: install the test extra (pip install -e '.[test]')")
    result = subprocess.run([exe, "--config", str(PACKAGE.parent / "setup.cfg")], cwd=PACKAGE.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_function_level_imports_are_few_and_give_their_reason():
    found = _function_imports()
    assert len(found) <= 20, found
    for where, package, line in found:
        assert package in LAZY_ALLOWED, f"{where}: '{line.strip()}' belongs at the top of the module"
        assert "#" in line, f"{where}: a function-level import says why it is lazy (a comment on its line)"
