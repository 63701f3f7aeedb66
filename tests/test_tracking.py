"""W&B through the CLI: offline without a key, scalars and the whole config in the run, same run on resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _fit(tmp: Path, env: dict[str, str], steps: int, ckpt: Path | None = None) -> None:
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp / "ckpt"), "every_n_train_steps": 3, "save_top_k": -1},
    }
    args = [
        sys.executable, str(REPO / "train.py"), "fit",
        "--config", str(REPO / "configs" / "demo.yaml"), "--config", str(REPO / "configs" / "loggers" / "wandb.yaml"),
        f"--trainer.max_steps={steps}", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.callbacks=[{json.dumps(checkpoint)}]", f"--trainer.logger.init_args.save_dir={tmp / 'wandb'}",
    ]  # fmt: skip
    if ckpt is not None:
        args.append(f"--ckpt_path={ckpt}")
    result = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def _records(run_dir: Path) -> list[dict]:
    wandb = shutil.which("wandb", path=str(Path(sys.executable).parent)) or "wandb"
    out = subprocess.run(
        [wandb, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_offline_wandb_run_holds_scalars_config_and_resumes_the_same_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(REPO), HOME=str(tmp_path))  # no API key anywhere: the CLI must go offline by itself
    env.setdefault("MEMFLOW_TRAIN_CACHE", os.environ.get("MEMFLOW_TRAIN_CACHE", str(tmp_path / "cache")))
    _fit(tmp_path, env, steps=6)
    runs = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = _records(runs[0])
    run_id = next(r["run"]["run_id"] for r in records if r.get("type") == "run")
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    assert len(history) >= 6 and all("train/critic_loss" in h for h in history)
    generator = [h["train/generator_loss"] for h in history]
    assert len({g for g in generator if g != "NaN"}) == 2 and generator.count("NaN") == len(generator) - 2  # steps 0, 5
    config = {k: v for r in records if r.get("type") == "config" for k, v in r["config"]["update"].items()}
    assert config["cli"]["model"]["class_path"] == "memflow_train.methods.SelfForcingDMD"
    assert config["cli"]["trainer"]["max_steps"] == 6

    _fit(tmp_path, env, steps=8, ckpt=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    resumed = sorted(set((tmp_path / "wandb" / "wandb").glob("offline-run-*")) - set(runs))
    assert len(resumed) == 1 and resumed[0].name.endswith(run_id)
    steps = [r["history"]["item"]["trainer/global_step"] for r in _records(resumed[0]) if r.get("type") == "history"]
    assert min(steps) >= 3  # the resumed run continues after the checkpoint's step
