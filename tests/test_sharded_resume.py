"""Resuming a run on 2 CPU ranks under DeepSpeed ZeRO-2/3 or FSDP2 (fp32, and bf16 compute with activation
checkpointing for flow matching) continues every rank's loss curve exactly
(a file of its own, so that `pytest -n 2 --dist loadfile` runs it beside the equivalence tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.sharded_helpers import REPO, SCRIPTS, run_script, script_env

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return script_env(tmp_path_factory)


@pytest.mark.parametrize(
    ("stage", "config"),
    [("2", "demo.yaml"), ("3", "demo_long.yaml"), ("fsdp2", "demo_long.yaml"), ("fsdp2_bf16", "demo_finetune.yaml")],
)
def test_resume_continues_every_rank_exactly(stage: str, config: str, env, tmp_path: Path) -> None:
    cfg = str(REPO / "configs" / config)
    script = str(SCRIPTS / "strategy_resume.py")
    run_script([script, stage, cfg, str(tmp_path / "whole"), "8", "100"], env, tmp_path)
    run_script([script, stage, cfg, str(tmp_path / "split"), "4", "4"], env, tmp_path)
    ckpt = tmp_path / "split" / "ckpt" / "epoch=0-step=4.ckpt"
    assert ckpt.is_file() if stage.startswith("fsdp2") else ckpt.is_dir()
    run_script([script, stage, cfg, str(tmp_path / "split"), "8", "100", str(ckpt)], env, tmp_path)
    for rank in (0, 1):
        whole = json.loads((tmp_path / "whole" / f"losses_rank{rank}.json").read_text())
        first = json.loads((tmp_path / "split" / f"losses_rank{rank}.json").read_text())
        rest = json.loads((tmp_path / "split" / f"losses_resumed_rank{rank}.json").read_text())
        assert [s["step"] for s in rest] == [4, 5, 6, 7]
        assert first + rest == whole, f"rank {rank}"
