"""Training progress counts steps (not epochs), resumes from the checkpoint's step, and prints plain lines
when there is no terminal."""

from __future__ import annotations

import re

import lightning as L
import pytest

from memflow_train.progress import StepProgressBar
from tests.method_helpers import dmd_module, loader


def _fit(bar: StepProgressBar, steps: int, **kwargs) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar], **kwargs)  # fmt: skip
    trainer.fit(dmd_module(), loader())
    return trainer


def test_plain_lines_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    _fit(StepProgressBar(interval=0.0, tty=False), steps=3)
    lines = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(
        r"step 1/3 \(33%\) \| [\d.]+ steps/s \| ETA \d\d:\d\d:\d\d \| .*critic_loss [\d.e+-]+", lines[0]
    )
    assert lines[-1].startswith("step 3/3 (100%)") and "Epoch" not in " ".join(lines)


def test_a_terminal_bar_counts_steps_to_max_steps(capsys: pytest.CaptureFixture[str]) -> None:
    bar = StepProgressBar(tty=True)
    _fit(bar, steps=4)
    err = capsys.readouterr().err
    assert "4/4" in err and "step" in err and "Epoch" not in err
