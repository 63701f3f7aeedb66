"""LongVideoEvaluation inside the demo fit, its logger outputs (CSV, W&B offline), failures, DDP, and the
standalone report on the demo checkpoint."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from callbacks.evaluate import main as evaluate_main
from callbacks.long_video import LongVideoEvaluation
from data.video_io import decode_mp4
from memflow_train.cli import MemflowCLI
from memflow_train.methods import SelfForcingDMD
from memflow_train.models.vae import WanVAE

REPO = Path(__file__).resolve().parents[1]
STEPS = 4

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("demo_cache")]


def _config(tmp: Path, evaluation: dict | None, logger: dict | None = None, checkpoint: bool = False) -> Path:
    """configs/demo_eval.yaml with outputs in tmp, the generator trained (and its EMA updated) every step so
    that EMA and live weights differ, and the evaluation callback's init_args updated (None: no callback)."""
    config = yaml.safe_load((REPO / "configs" / "demo_eval.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp))
    trainer["logger"] = logger or {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(tmp), "name": "logs"},
    }
    callbacks = [c for c in trainer["callbacks"] if c["class_path"] == "callbacks.data_monitor.DataMonitor"]
    if evaluation is not None:
        callback = next(c for c in trainer["callbacks"] if c["class_path"].endswith("LongVideoEvaluation"))
        callback["init_args"].update(evaluation)
        callbacks.append(callback)
    if checkpoint:
        callbacks.append(
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(tmp / "ckpt"), "every_n_train_steps": STEPS, "save_top_k": -1},
            }
        )
    trainer["callbacks"] = callbacks
    config["model"]["init_args"].update(gen_update_ratio=1, ema_start_step=0)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp / "config.yaml"


def _fit(config: Path, steps: int = STEPS) -> tuple[list[tuple[int, dict]], MemflowCLI]:
    cli = MemflowCLI(args=["--config", str(config), f"--trainer.max_steps={steps}"], run=False)
    losses: list[tuple[int, dict]] = []
    update = cli.model.update_networks

    def update_networks(step_losses, step):
        losses.append((step, {k: float(v.detach()) for k, v in step_losses.items()}))
        return update(step_losses, step)

    cli.model.update_networks = update_networks
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return losses, cli


def _evaluation(cli: MemflowCLI) -> LongVideoEvaluation:
    return next(c for c in cli.trainer.callbacks if isinstance(c, LongVideoEvaluation))


def _state(cli: MemflowCLI) -> dict[str, torch.Tensor]:
    """Weights, EMA shadow and every module's train/eval flag."""
    state = {k: v.clone() for k, v in cli.model.state_dict().items()}
    state.update({f"ema.{k}": v.clone() for k, v in cli.model.ema.shadow.items()})
    state.update({f"training.{k}": torch.tensor(m.training) for k, m in cli.model.named_modules()})
    return state


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, dict]:
    losses, cli = _fit(_config(tmp_path_factory.mktemp("baseline"), None))
    return losses, _state(cli)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, MemflowCLI]:
    tmp = tmp_path_factory.mktemp("evaluated")
    losses, cli = _fit(_config(tmp, {"every_n_steps": 2}, checkpoint=True))
    return tmp, losses, cli


def test_the_callback_observes_without_changing_training(baseline, evaluated) -> None:
    base_losses, base_state = baseline
    _, losses, cli = evaluated
    assert losses == base_losses
    state = _state(cli)
    assert state.keys() == base_state.keys()
    for key, value in state.items():
        assert torch.equal(value, base_state[key]), key


def test_the_evaluation_reaches_the_logger_and_the_report_folder(evaluated) -> None:
    tmp, _, cli = evaluated
    log_dir = Path(cli.trainer.log_dir)
    rows = (log_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for key in ("eval/clip_score", "eval/subject_consistency/across", "eval/flicker", "eval/sharpness/drift",
                "eval/world/subject_recall", "eval/memory/returning_subject_share", "eval/fps_memory_free"):  # fmt: skip
        assert key in header, key
    steps = {row.split(",")[header.index("step")] for row in rows[1:] if row.split(",")[header.index("eval/flicker")]}
    assert steps == {"2", "4"}
    folder = log_dir / "long_video_eval" / f"step_{STEPS:07d}"
    report = json.loads((folder / "report.json").read_text())
    assert report["source"]["weights"] == "ema"
    assert [n["name"] for n in report["narratives"]] == ["synthetic:0", "synthetic:1"]
    assert len(report["segments"]) == 6 and {r["segment"] for r in report["segments"]} == {0, 1, 2}
    trace = report["narratives"][0]["bank_frames"]
    assert len(trace) == 6 and trace[-1][0], "the bank trace lists held frames per chunk and layer"
    assert (folder / "report.md").read_text().startswith("# Long-video consistency evaluation")
    assert (folder / "segments.csv").read_text().splitlines()[0].startswith("narrative,segment,start_frame")
    video = decode_mp4(folder / "videos" / "0000.mp4")
    assert video.shape == (1 + 4 * (3 * 6 - 1), 32, 32, 3)
    assert _evaluation(cli).last_report["protocol"]["id"] == report["protocol"]["id"]


def test_the_standalone_report_on_the_demo_checkpoint_matches_the_callback(evaluated, tmp_path) -> None:
    tmp, _, cli = evaluated
    checkpoint = tmp / "ckpt" / f"epoch=0-step={STEPS}.ckpt"
    args = ["--checkpoint", str(checkpoint), "--config", str(tmp / "config.yaml"), "--demo_models", "true"]
    report = evaluate_main([*args, "--out", str(tmp_path / "ema")])
    assert (tmp_path / "ema" / "report.md").is_file() and (tmp_path / "ema" / "videos" / "0001.mp4").is_file()
    assert json.loads((tmp_path / "ema" / "report.json").read_text())["scalars"] == report["scalars"]
    callback = _evaluation(cli).last_report
    assert report["protocol"]["id"] == callback["protocol"]["id"]
    measured = [k for k in callback["scalars"] if "fps" not in k and "slowdown" not in k]
    for key in measured:
        assert report["scalars"][key] == pytest.approx(callback["scalars"][key], abs=1e-5, nan_ok=True), key
    # The callback evaluated the EMA weights: the live generator gives other videos.
    live = evaluate_main([*args, "--checkpoint_key", "generator", "--videos", "0", "--out", str(tmp_path / "live")])
    assert live["scalars"]["flicker"] != pytest.approx(callback["scalars"]["flicker"], abs=1e-7)


def test_the_standalone_command_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "callbacks.evaluate", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--protocol.narratives" in result.stdout and "report.json" in result.stdout


def test_wandb_offline_files_hold_the_video_and_the_table(tmp_path: Path) -> None:
    import wandb

    logger = {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"save_dir": str(tmp_path), "offline": True, "project": "memflow-train-test"},
    }
    _fit(_config(tmp_path, {"every_n_steps": 2}, logger=logger), steps=2)
    wandb.finish()
    files = [p for p in (tmp_path / "wandb").glob("offline-run-*/files") if p.is_dir()]
    assert len(files) == 1
    videos = list((files[0] / "media" / "videos").rglob("*.mp4"))
    tables = list((files[0] / "media" / "table").rglob("*.table.json"))
    assert len(videos) == 2 and len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["narrative", "segment", "start_frame"] and len(table["data"]) == 6
    assert decode_mp4(videos[0]).shape[1:] == (32, 32, 3)


def test_an_evaluation_that_raises_leaves_training_running(baseline, tmp_path: Path, caplog) -> None:
    WanVAE.tiny(z_dim=8).save_pretrained(tmp_path / "wrong_vae")  # the demo generator makes 4-channel latents
    config = _config(tmp_path / "run", {"every_n_steps": 2, "vae": str(tmp_path / "wrong_vae")})
    with caplog.at_level(logging.ERROR, logger="callbacks.long_video.callback"):
        losses, cli = _fit(config)
    assert cli.trainer.global_step == STEPS
    assert losses == baseline[0]
    state = _state(cli)
    for key, value in state.items():
        assert torch.equal(value, baseline[1][key]), key
    failures = [r for r in caplog.records if "failed on rank 0" in r.getMessage()]
    assert len(failures) == 2 and "z_dim" in failures[0].exc_text
    header, *rows = (Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()
    failed = header.split(",").index("eval/failed")
    assert sum(row.split(",")[failed] == "1.0" for row in rows) == 2


class ValidatingDMD(SelfForcingDMD):
    """The demo method with a validation step (the critic's flow-matching loss on the validation prompts),
    so that `validate` runs; the training methods themselves define none yet."""

    def validation_step(self, batch, batch_idx: int) -> None:
        texts = self._texts(batch)
        loss = self.critic_loss(self.critic_samples(texts, 0), texts.embeds[:, 0], 0)
        self.log("val/critic_loss", loss, batch_size=len(batch))


def test_validate_runs_the_evaluation_once_at_the_end(tmp_path: Path) -> None:
    config = yaml.safe_load(_config(tmp_path, {"every_n_steps": 2}).read_text())
    config["model"]["class_path"] = f"{__name__}.ValidatingDMD"
    config["trainer"]["limit_val_batches"] = 1
    (tmp_path / "validate.yaml").write_text(yaml.safe_dump(config))
    cli = MemflowCLI(args=["--config", str(tmp_path / "validate.yaml")], run=False)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    reports = sorted(p.parent.name for p in (tmp_path / "logs").rglob("report.json"))
    assert reports == ["validate_0000000"]
    assert _evaluation(cli).last_report["source"]["weights"] == "live"  # no EMA update has happened yet


def _two_ranks(script: str, config: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run a 2-process script of tests/scripts (it launches rank 1 itself) with a timeout; each rank's JSON."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / script), str(config), str(tmp_path)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result, [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.distributed
def test_two_process_ddp_splits_generation_and_survives_a_rank_that_fails(tmp_path: Path) -> None:
    config = _config(tmp_path, {"every_n_steps": 2, "protocol": {"synthetic": {"count": 3}}})
    result, ranks = _two_ranks("eval_ddp.py", config, tmp_path)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == STEPS
    assert ranks[1]["injected_failures"] == 1 and "injected failure" in result.stderr
    # Step 2 failed on rank 1 only: no rank logged it. Step 4: narratives 0, 2 from rank 0 and 1 from rank 1.
    reports = sorted((tmp_path / "logs").rglob("report.json"))
    assert [p.parent.name for p in reports] == [f"step_{STEPS:07d}"]
    report = json.loads(reports[0].read_text())
    assert [n["name"] for n in report["narratives"]] == ["synthetic:0", "synthetic:1", "synthetic:2"]
    assert sorted(p.name for p in (reports[0].parent / "videos").iterdir()) == ["0000.mp4", "0001.mp4"]
    assert ranks[0]["report_narratives"] == 3 and ranks[1]["report_narratives"] is None


@pytest.mark.gpu
def test_an_evaluation_on_cuda_gives_its_memory_back() -> None:
    from callbacks.long_video import EvalProtocol, Evaluator
    from memflow_train.evaluation import FeatureModelSpec
    from memflow_train.generation.pipeline import StreamingVideoPipeline
    from memflow_train.memory import NAM
    from memflow_train.models.causal_wan import CausalWanTransformer
    from memflow_train.models.presets import wan_config
    from memflow_train.models.text_encoder import WanTextEncoder
    from memflow_train.rollout import StreamingGenerator
    from memflow_train.sampling import FlowMatchSchedule

    device = torch.device("cuda")
    memory = NAM(bank_size=2, record_interval=1, local_attn_size=6)
    model = CausalWanTransformer(**wan_config("tiny")).to(device).eval()
    sampler = StreamingGenerator(model, FlowMatchSchedule(5.0), [1000, 750, 500, 250], memory)
    pipeline = StreamingVideoPipeline(
        sampler, WanTextEncoder.tiny(16, 32).to(device), WanVAE.tiny(4).to(device), (4, 4)
    )
    tiny = {
        "clip": FeatureModelSpec(kind="clip", tiny=True),
        "subject_features": FeatureModelSpec(kind="dino", tiny=True),
    }
    evaluator = Evaluator(EvalProtocol(**tiny))
    with torch.no_grad():  # a first run leaves what CUDA keeps for good (cuBLAS workspaces) allocated
        evaluator.run_shard(pipeline)
    evaluator.compute()
    evaluator.release()
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        shard = evaluator.run_shard(pipeline)
    assert torch.cuda.memory_allocated(device) > before, "feature models and metric states were on the GPU"
    scalars = evaluator.compute()
    evaluator.release()
    assert len(shard.narratives) == 2 and scalars["subject_consistency"] is not None
    assert all(p.device.type == "cpu" for m in evaluator.models() for p in m.parameters())
    assert torch.cuda.memory_allocated(device) == before


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("count", [1, 3])
def test_two_process_zero3_evaluation_validation_and_checkpoint_finish(tmp_path: Path, count: int) -> None:
    """Narratives that do not split evenly over the ranks used to hang under ZeRO-3 (a rank waiting in a
    parameter gather for its second narrative while the other waited in the all-reduce)."""
    config = _config(tmp_path, {"every_n_steps": 2, "protocol": {"synthetic": {"count": count}}}, checkpoint=True)
    _, ranks = _two_ranks("zero3_collectives.py", config, tmp_path)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == STEPS
    assert ranks[0]["report_narratives"] == [f"synthetic:{i}" for i in range(count)]
    reports = sorted((tmp_path / "logs").rglob("report.json"))
    assert [p.parent.name for p in reports] == ["step_0000002", f"step_{STEPS:07d}"]
    # validation: every rank saw the same batches (the whole validation set, same order)
    assert ranks[0]["validation_batches"] == ranks[1]["validation_batches"] and ranks[0]["validation_batches"]
    assert (tmp_path / "ckpt" / f"epoch=0-step={STEPS}.ckpt").is_dir()
