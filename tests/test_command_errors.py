"""Every command reports what a user got wrong in a few lines: no traceback, exit 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MEMFLOW_TRAIN_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["data.prepare", "prompts", "missing.txt", "--output", "o", "--quiet"], "missing.txt"),
        (["memflow_train.export", "missing.ckpt", "out"], "no weights file at missing.ckpt"),
        (["memflow_train.generation", "n.jsonl", "--config", str(REPO / "configs" / "demo.yaml"),
          "--output", "o", "--text-encoder", "nowhere"], "no UMT5 encoder at nowhere"),
    ],
)  # fmt: skip
def test_command_errors_are_one_line(tmp_path: Path, command: list[str], message: str) -> None:
    (tmp_path / "n.jsonl").write_text('{"prompts": ["a", "b"], "switch_frames": [3], "num_frames": 6}\n')
    result = _run(command, tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def test_a_changed_prepare_source_is_refused_in_a_line(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a\n")
    assert _run(["data.prepare", "prompts", "p.txt", "--output", "o", "--quiet"], tmp_path).returncode == 0
    (tmp_path / "p.txt").write_text("a\nb\n")
    result = _run(["data.prepare", "prompts", "p.txt", "--output", "o", "--quiet"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the source changed since this progress file was written" in result.stderr
