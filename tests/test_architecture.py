"""The package's structure: imports point one way, nothing imports the CLI, importing does no work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "reconad"
# the project's import-graph checker (lazy imports inside functions count; TYPE_CHECKING blocks do not)
CHECKER = Path(__file__).resolve().parents[2] / "shared" / "tools" / "import_cycles.py"


def test_no_import_cycle_and_nothing_imports_the_cli():
    # CI lays shared/ beside the clone, as the developers have it
    assert CHECKER.is_file(), f"{CHECKER} missing"
    result = subprocess.run([sys.executable, str(CHECKER), str(SRC)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_importing_the_package_loads_nothing_heavy():
    code = ("import sys, reconad, reconad.config, reconad.errors; "
            "heavy = [m for m in ('torch', 'lightning', 'matplotlib', 'reconad.engine') if m in sys.modules]; "
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


# cli → api → {study, report, deploy, serve} → engine (+ validation, acceleration, official) → methods → core
LAYERS = {"cli": 5, "__main__": 5, "api": 4, "study": 3, "report": 3, "deploy": 3, "serve": 3,
          "engine": 2, "validation": 2, "acceleration": 2, "official": 2, "methods": 1}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 6


def _imported(path: Path, module: str):
    import ast

    tree = ast.parse(path.read_text())
    type_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            type_only |= {id(inner) for stmt in node.body for inner in ast.walk(stmt)}
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            yield ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_imports_point_down_the_layers_lazy_imports_included():
    upward = []
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module == "reconad":  # the package's lazy public names point at the API on purpose
            continue
        upward += [f"{module} -> {target}" for target in _imported(path, module)
                   if target.startswith("reconad.") and _layer(target) > _layer(module)]
    assert not upward, upward
