"""The memory planner (python -m memflow_train.plan): its estimate against the measured peak of the same tiny
training steps, the plan_module API, strategy models, architecture resolution and what it refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memflow_train.benchmarks import plan_check
from memflow_train.plan import parse_size, plan_module
from memflow_train.plan.__main__ import main
from memflow_train.plan.architecture import resolve_backbone
from memflow_train.plan.config import read_config
from memflow_train.plan.inventory import Network
from memflow_train.plan.recipe import plan_config, verdict
from memflow_train.plan.settings import TraceSettings
from memflow_train.plan.strategy import parse_strategy, profile
from tests.method_helpers import dmd_module, prompt_batch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("case", ["tiny-dmd", "tiny-dmd-ckpt", "tiny-long", "tiny-finetune"])
def test_tiny_configs_within_15_percent_of_the_measured_peak(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner's per-GPU estimate of a demo config's step against PeakTensorMemory on the real steps."""
    monkeypatch.chdir(REPO)
    _, configs, overrides, data = plan_check.CASES[case]
    setup = read_config(configs, overrides, data)
    planned, steps, _ = plan_check.estimate(setup, "cpu")
    measured, _ = plan_check.measure(setup, steps, "cpu")
    assert abs(planned / measured - 1) < 0.15, (case, planned, measured)


def test_plan_module_api_leaves_the_module_as_it_was() -> None:
    module = dmd_module(gen_update_ratio=1, ema_start_step=0)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    plan = plan_module(module, gpus=1, strategy=None, batch=prompt_batch())
    assert isinstance(plan.per_gpu_bytes, int) and plan.per_gpu_bytes > 0
    assert sum(size for _, size in plan.rows) == plan.per_gpu_bytes
    names = [name for name, _ in plan.rows]
    assert "generator parameters" in names and "teacher parameters (frozen)" in names
    assert "| **peak per GPU** |" in plan.to_markdown()
    assert all(not p.is_meta and torch.equal(p, before[n]) for n, p in module.named_parameters())
    assert module._trainer is None and module.ema.shadow == {}
    first = plan_module(module, batch=prompt_batch(), steady_state=False)  # no optimizer states yet
    assert first.per_gpu_bytes < plan.per_gpu_bytes


def test_config_plan_with_verdict_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    out = tmp_path / "plan.json"
    plan = main(["--config", "configs/demo.yaml", "--gpu-memory", "1GiB", "--json", str(out)])
    assert plan.verdict is not None and plan.verdict.fits
    saved = json.loads(out.read_text())
    assert saved["per_gpu_bytes"] == plan.per_gpu_bytes and [v["checkpointing"] for v in saved["variants"]] == [
        False,
        True,
    ]
    # A budget only the checkpointed step fits in: the verdict names checkpointing, the cheapest change.
    off, on = (v.per_gpu_bytes for v in plan.variants)
    assert on < off
    setup = read_config(["configs/demo.yaml"], [], {})
    tight = verdict(setup, plan, 1, gpu_memory=(on + off) // 2, headroom=0.0, latent_frames=None)
    assert not tight.fits and tight.answer.startswith("gradient checkpointing")
    assert [(size, note) for _, size, note in tight.tried] == [(on, "fits")]  # the traced variant, reused


def _net(name: str, params: int, trainable: int, size: int = 4) -> Network:
    return Network(name, params, trainable, trainable * size, (params - trainable) * size, params // 10,
                   trainable // 10, params // 5, params // 10, (params,))  # fmt: skip


def test_strategy_models_shard_what_they_shard() -> None:
    nets = {"generator": _net("generator", 1000, 1000), "teacher": _net("teacher", 4000, 0)}
    fp32 = TraceSettings()
    ddp = profile(parse_strategy("ddp", 8), 8, nets, fp32)
    assert ddp.factor("param:generator") == 1 and ddp.constants == {"gradient buckets (DDP)": 4000}
    fsdp = parse_strategy({"class_path": "memflow_train.strategies.MemflowFSDP2Strategy", "init_args": {}}, 8)
    sharded = profile(fsdp, 8, nets, fp32)
    assert sharded.factor("param:generator") == sharded.factor("frozen:teacher") == 1 / 8
    assert sharded.factor("state:generator") == 1 / 8 and sharded.factor("ema") == 1
    assert parse_strategy(None, 1).kind == "single" and parse_strategy("auto", 4).kind == "ddp"
    zero3 = profile(parse_strategy("deepspeed_stage_3", 4), 4, nets, TraceSettings(cast=torch.bfloat16))
    assert zero3.factor("frozen:teacher") == 1 / 4 and zero3.factor("grad:generator") == 1 / 4
    assert zero3.factor("state:generator") == 8 / (2 * 2) / 4  # fp32 Adam moments of bf16-traced weights
    assert zero3.constants["fp32 master weights (DeepSpeed)"] == 4 * 1000 // 4


def test_architecture_from_config_preset_or_path_name() -> None:
    spec, how = resolve_backbone("teacher", {"preset": None, "weights": "/nowhere/Wan2.1-T2V-14B-Diffusers"})
    assert spec["preset"] == "wan2.1-t2v-14b" and spec["weights"] is None and "ASSUMED" in how
    spec, how = resolve_backbone("generator", {"preset": "tiny", "config": {"num_layers": 1}, "weights": "/x.pt"})
    assert spec["preset"] == "tiny" and spec["weights"] is None and "not readable here" in how
    with pytest.raises(ValueError, match="teacher.weights /nowhere/model.pt: cannot read its architecture"):
        resolve_backbone("teacher", {"preset": None, "weights": "/nowhere/model.pt"})


@pytest.mark.parametrize(
    ("text", "size"), [("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("81920MiB", 80 * 2**30), ("1.5TB", 15 * 10**11)]
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["-5GiB", "80", "80XB", "0GiB", "GiB", "eighty GB", "80 iB"])
def test_bad_sizes_are_refused_naming_the_value(text: str) -> None:
    with pytest.raises(ValueError, match=rf"--gpu-memory '{text}'"):
        parse_size(text)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gpus", "0"], "--gpus must be >= 1, got 0"),
        (["--gpus", "two"], "--gpus must be a whole number >= 1, got 'two'"),
        (["--gpus", "1.5"], "--gpus must be an integer, got 1.5"),
        (["--gpu-memory", "80"], "--gpu-memory '80'"),
        (["--headroom", "1"], "--headroom must be"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ],
)
def test_bad_flags_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        main(["--config", "configs/demo.yaml", *flags])


def test_bad_configs_and_strategies_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(FileNotFoundError, match="--config nowhere.yaml: no such file"):
        main(["--config", "nowhere.yaml"])
    with pytest.raises(ValueError, match="memory planner has no model of this strategy"):
        parse_strategy("horovod", 2)
    with pytest.raises(ValueError, match="memory planner has no model of this strategy"):
        parse_strategy({"class_path": "somewhere.FancyStrategy", "init_args": {}}, 2)
    with pytest.raises(ValueError, match="bank_sise"):
        read_config(["configs/demo.yaml"], ["--model.init_args.memory.bank_sise", "3"], {})


def test_command_reports_an_error_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "memflow_train.plan", "--config", "configs/demo.yaml", "--gpus", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stderr.splitlines()[0] == "error: --gpus must be >= 1, got 0"


def test_a_config_that_does_not_fit_walks_the_changes_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each change is planned on top of the cheaper ones until one fits (or none does)."""
    monkeypatch.chdir(REPO)
    setup = read_config(["configs/demo.yaml"], [], {})
    plan = plan_config(setup, 1, gpu_memory=2**20, headroom=0.0)  # 1 MiB: less than the weights and states
    tried = [change for change, _, _ in plan.verdict.tried]
    assert not plan.verdict.fits and plan.verdict.answer is None
    assert tried[0].startswith("gradient checkpointing") and "optimizer on the CPU" in tried[1]
    assert "LoRA rank" in tried[2] and tried[-1].endswith("shorter rollout (num_frames: 3)")
    sizes = [size for _, size, _ in plan.verdict.tried]
    assert all(isinstance(s, int) and s > 0 for s in sizes)
    assert sizes[1] > 2**28  # ZeRO-3's reduce bucket alone (2e8 elements) dwarfs a tiny model
