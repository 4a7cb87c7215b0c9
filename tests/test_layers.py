"""The arrows go one way: flows → tasks → edgeopt. edgeopt imports neither prefect nor mlflow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = {"prefect", "mlflow", "tasks", "flows"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def test_core_never_imports_prefect_mlflow_or_upper_layers():
    offenders = {str(p.relative_to(REPO)): sorted(_imports(p) & FORBIDDEN)
                 for p in (REPO / "edgeopt").rglob("*.py") if _imports(p) & FORBIDDEN}
    assert offenders == {}


def test_tasks_never_import_flows():
    offenders = [str(p) for p in (REPO / "tasks").rglob("*.py") if "flows" in _imports(p)]
    assert offenders == []


def test_importing_the_whole_core_loads_neither_prefect_nor_mlflow():
    code = ("import importlib, pkgutil, sys, edgeopt\n"
            "for m in pkgutil.walk_packages(edgeopt.__path__, 'edgeopt.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('prefect', 'mlflow')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
