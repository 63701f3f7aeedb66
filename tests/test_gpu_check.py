"""The GPU check (python -m memflow_train.benchmarks.gpu_check): its --tiny mode end to end on CPU, section
isolation and exit status, the budget, and what it refuses."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memflow_train.benchmarks import gpu_check
from memflow_train.benchmarks.common import repeat_within
from memflow_train.benchmarks.streaming_fps import BACKEND_LABEL

REPO = Path(__file__).resolve().parents[1]


def finite(*values: object) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


@pytest.mark.slow
def test_tiny_mode_runs_every_section(tmp_path: Path) -> None:
    """The CI form of the GPU check: every section runs on CPU and reports finite numbers, JSON and Markdown."""
    command = [sys.executable, "-m", "memflow_train.benchmarks.gpu_check", "--tiny", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == [] and finite(report["wall_s"])
    sections = report["sections"]
    assert list(sections) == ["precision", "dmd", "fps"]

    p = sections["precision"]
    assert finite(p["max_abs_error"], p["max_abs_error_rel_rms"], p["rms_error_rel_rms"], p["cosine_similarity"])
    assert p["max_abs_error"] > 0 and p["cosine_similarity"] > 0.99  # bf16 differs from fp32, and not by much

    d = sections["dmd"]
    assert finite(d["seconds_per_step"], d["peak_gib"]) and d["seconds_per_step"] > 0 and d["peak_gib"] > 0
    assert d["gradient_checkpointing"] and len(d["steps"][0]["exit_steps"]) == 7  # 21 frames: 7 chunks
    planner = d["planner"]  # the memory planner's estimate of the same step (tests/test_plan.py checks its bound)
    assert finite(planner["estimate_gib"], planner["measured_over_estimate"]) and planner["estimate_gib"] > 0

    f = sections["fps"]
    measured = {(r["variant"], r["backend"]): r for r in f["rows"] if r.get("fps")}
    unavailable = {r["backend"] for r in f["rows"] if r.get("unavailable")}
    assert unavailable | {b for _, b in measured} == set(BACKEND_LABEL)  # every backend measured or explained
    assert {"sdpa", "sdpa_flash", "flex"} <= {b for _, b in measured}  # all run on CPU
    for (variant, _), r in measured.items():
        assert finite(r["fps"], r["seconds_per_chunk"], r["first_call_seconds"]) and r["fps"] > 0
        assert r["chunks"] == [12, 13] and r["video_frames_per_chunk"] == 12  # after 12 warm-up chunks
        assert r["attended_frames"] == {"off": 12, "nam": 15, "nam_sma": 12}[variant]
        assert r["bank_frames"] == (0 if variant == "off" else 3)
        assert r["goal_met"] is None  # tiny sizes: the paper's anchors do not apply

    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Streaming generation: transformer FPS", "## Stage-1 DMD step", "## Backbone bfloat16"):
        assert heading in md
    assert "LongLive (memory-free) 20.7 FPS" in md and "Failed: nothing" in md
    assert "| nam_sma | sdpa (PyTorch's choice of kernel) |" in md


def test_a_failing_section_is_recorded_and_the_others_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args, device, deadline):  # noqa: ANN001, ANN202
        raise RuntimeError("out of memory\nsecond line")

    ran = []
    monkeypatch.setitem(gpu_check.SECTION_RUNS, "precision", broken)
    monkeypatch.setitem(gpu_check.SECTION_RUNS, "dmd", lambda *a: ran.append("dmd") or {"failures": ["dmd: planner"]})
    monkeypatch.setitem(gpu_check.SECTION_RUNS, "fps", lambda *a: ran.append("fps") or {})
    with pytest.raises(SystemExit, match="precision: RuntimeError: out of memory; dmd: planner"):
        gpu_check.main(["--tiny", "--out", str(tmp_path)])
    assert ran == ["dmd", "fps"]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"]["precision"]["error"] == "RuntimeError: out of memory"
    assert "Section failed: RuntimeError: out of memory" in (tmp_path / "gpu_check.md").read_text()


def test_budget_shares_what_is_left_and_repeats_stop_at_the_deadline() -> None:
    budget = gpu_check.Budget(100.0)
    shares = [budget.deadline(s) - time.perf_counter() for s in gpu_check.SECTIONS]
    assert shares == pytest.approx([10.0, 100 * 3 / 9, 100.0], abs=0.5)  # weights 1, 3, 6 of what is left
    ran: list[int] = []
    assert repeat_within(time.perf_counter() + 60, 3, ran.append) == 3 and ran == [0, 1, 2]
    assert repeat_within(time.perf_counter() - 1, 3, ran.append) == 1  # past the deadline: the first runs


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tiny", "--height", "100"], "--height must be a positive multiple of 16"),
        (["--tiny", "--prompt-tokens", "20"], "--prompt-tokens 20 exceeds --text-len 16"),
        (["--tiny", "--measure-chunks", "0"], "--measure-chunks must be >= 1, got 0"),
        (["--tiny", "--budget-s", "0"], "--budget-s must be a positive number of seconds"),
        (["--device", "cpu"], "the full check needs a CUDA GPU"),
    ],
)
def test_refuses_what_it_cannot_measure(tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gpu_check.parse_args(["--out", str(tmp_path), *flags])
