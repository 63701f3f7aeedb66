"""Running the 2-rank strategy scripts (tests/scripts/strategy_*.py) from tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"


def script_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The scripts' environment: this checkout importable, one demo dataset cache per test module."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MEMFLOW_TRAIN_CACHE": os.environ.get("MEMFLOW_TRAIN_CACHE", str(tmp_path_factory.mktemp("demo_cache"))),
    }


def run_script(args: list[str], env: dict[str, str], cwd: Path) -> None:
    """python ARGS in cwd (15 min at most); its stderr tail in the failure."""
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
