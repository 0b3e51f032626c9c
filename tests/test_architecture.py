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
