"""The demo configs end to end: fit, exact resume, and a 2-process DDP run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from memflow_train.cli import MemflowCLI
from memflow_train.methods.optim import find_multi_network_optimizer

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("demo_cache")


def _variant(name: str, tmp: Path, checkpoint_every: int | None) -> Path:
    """The demo config with outputs under tmp and (optionally) a checkpoint every N steps."""
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    trainer = config["trainer"]
    trainer.update(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp))
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("ModelCheckpoint")]
    if checkpoint_every:
        trainer["callbacks"].append(
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(tmp / "ckpt"), "every_n_train_steps": checkpoint_every, "save_top_k": -1},
            }
        )
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / name
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, steps: int, ckpt: Path | None = None) -> tuple[list[tuple[int, dict]], MemflowCLI]:
    """Fit through the CLI; returns every step's losses per network."""
    cli = MemflowCLI(args=["--config", str(config), f"--trainer.max_steps={steps}"], run=False)
    losses: list[tuple[int, dict]] = []
    module = cli.model
    if module.automatic_optimization:
        step_fn = module.training_step

        def training_step(batch, batch_idx):
            loss = step_fn(batch, batch_idx)
            losses.append((module.global_step, {"model": float(loss.detach())}))
            return loss

        module.training_step = training_step
    else:
        update = module.update_networks

        def update_networks(step_losses, step):
            losses.append((step, {k: float(v.detach()) for k, v in step_losses.items()}))
            return update(step_losses, step)

        module.update_networks = update_networks
    cli.trainer.fit(module, datamodule=cli.datamodule, ckpt_path=ckpt)
    return losses, cli


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo.yaml", "demo_long.yaml", "demo_finetune.yaml"])
def test_resume_continues_exactly_like_an_uninterrupted_run(name: str, tmp_path: Path) -> None:
    n, m = 6, 12
    whole, whole_cli = _fit(_variant(name, tmp_path / "whole", None), m)
    first, _ = _fit(_variant(name, tmp_path / "split", n), n)
    ckpt = tmp_path / "split" / "ckpt" / f"epoch=0-step={n}.ckpt"
    assert ckpt.is_file()
    rest, rest_cli = _fit(_variant(name, tmp_path / "split", None), m, ckpt)
    assert first + rest == whole
    assert {s for s, _ in rest} == set(range(n, m))
    for (k, a), b in zip(whole_cli.model.state_dict().items(), rest_cli.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_demo_fit_writes_losses_and_a_checkpoint(tmp_path: Path) -> None:
    config = _variant("demo.yaml", tmp_path, checkpoint_every=5)
    losses, cli = _fit(config, 10)
    assert cli.trainer.global_step == 10
    metrics = cli.trainer.callback_metrics
    for key in ("train/critic_loss", "generator_loss", "data/consumed_samples"):  # the bar's latest generator loss
        assert torch.isfinite(metrics[key]), key
    assert torch.isnan(metrics["train/generator_loss"])  # step 9 trained the critic only
    assert [s for s, _ in losses] == list(range(10))
    assert [sorted(v) for _, v in losses][:2] == [["critic", "generator"], ["critic"]]
    assert sum("generator" in v for _, v in losses) == 2  # steps 0 and 5
    assert (tmp_path / "ckpt" / "epoch=0-step=10.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp_ranks_draw_the_same_exit_steps_and_switches(tmp_path: Path) -> None:
    config = _variant("demo_long.yaml", tmp_path, None)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / "demo_ddp.py"), str(config), str(tmp_path), "8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 8
    for a, b in zip(*ranks, strict=True):
        assert a["exit_steps"] == b["exit_steps"] and a["switch_frame"] == b["switch_frame"]
    # Each rank streams its own samples (resampled shards, a seed per rank: different, not disjoint).
    assert [s["keys"] for s in ranks[0]] != [s["keys"] for s in ranks[1]]
    assert {s["switch_frame"] for s in ranks[0]} <= set(range(9, 36, 3))


@pytest.mark.slow
def test_resume_applies_new_optimizer_and_memory_settings_and_refuses_other_changes(tmp_path: Path) -> None:
    config = _variant("demo.yaml", tmp_path, checkpoint_every=4)
    MemflowCLI(args=["fit", "--config", str(config), "--trainer.max_steps=4"])
    ckpt = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    resume = ["fit", "--config", str(config), "--trainer.max_steps=6", "--ckpt_path", str(ckpt)]
    cli = MemflowCLI(args=[*resume, "--model.init_args.generator_optimizer.lr=0.002",
                           "--model.init_args.memory.sma=false"])  # fmt: skip
    groups = find_multi_network_optimizer(cli.trainer.optimizers[0])
    assert groups.group("generator")["lr"] == 0.002 and groups.group("critic")["lr"] == 1e-4
    assert cli.model.memory.sma is False and cli.trainer.global_step == 6
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["init_args"]
    assert saved["generator_optimizer"]["lr"] == 0.002 and saved["memory"]["init_args"]["sma"] is False
    with pytest.raises(SystemExit, match=r"(?s)cannot change at resume.*num_frames: 12 in the checkpoint, 6 now"):
        MemflowCLI(args=[*resume, "--model.init_args.num_frames=6"])


@pytest.mark.slow
def test_each_run_keeps_its_checkpoints_in_its_own_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two runs of one config never share a checkpoint folder (no last-v1.ckpt beside another run's last.ckpt)."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["trainer"].update(default_root_dir=str(tmp_path), enable_model_summary=False)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    for _ in range(2):
        MemflowCLI(args=["fit", "--config", str(path), "--trainer.max_steps=2"])
    folders = sorted(p.parent for p in tmp_path.rglob("last.ckpt"))
    assert [f.relative_to(tmp_path).as_posix() for f in folders] == [
        "logs/version_0/checkpoints",
        "logs/version_1/checkpoints",
    ]
    assert not list(tmp_path.rglob("last-v*.ckpt"))
    assert f"resume with --ckpt_path {folders[1]}/last.ckpt" in capsys.readouterr().err


def test_readme_commands_write_under_outputs() -> None:
    """The README's example commands leave nothing in the repository root (outputs/ is ignored)."""
    import re

    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"--(?:output|out) (\S+)", readme) + re.findall(r"export CHECKPOINT (\S+)", readme)
    assert targets and all(t.startswith("outputs/") for t in targets), targets
    assert "outputs/" in (REPO / ".gitignore").read_text()


@pytest.mark.slow
def test_a_run_prints_no_warning_a_user_cannot_act_on(tmp_path: Path) -> None:
    """Lightning's pytree deprecation and product tips, DeepSpeed's accelerator notice and transformers' save
    bar (shown when the demo data is built) are not shown."""
    env_cache = tmp_path / "fresh_cache"  # build the demo data in this run, so its save bars would show
    config = _variant("demo.yaml", tmp_path, checkpoint_every=None)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEMFLOW_TRAIN_CACHE": str(env_cache)}
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), "--trainer.max_steps=2",
         "--trainer.enable_progress_bar=true"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for noise in (
        "LeafSpec",
        "Tip: For seamless cloud",
        "Setting accelerator to CPU",
        "Epoch 0/-2",
        "Writing model shards",
    ):
        assert noise not in output, noise
    assert "step 2/2 (100%)" in output
