"""Every configs/*.yaml parses with the CLI: class paths resolve and every value fits its type."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from memflow_train.cli import MemflowCLI

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/*.yaml"))
SNIPPETS = sorted(ROOT.glob("configs/*/*.yaml"))


class ParseOnlyCLI(MemflowCLI):
    """Parses and validates without building models (the real recipes point at weights we lack)."""

    def instantiate_classes(self) -> None:
        pass


def test_there_are_configs() -> None:
    names = {p.name for p in CONFIGS}
    assert {
        "demo.yaml",
        "memflow_wan1.3b_stage1.yaml",
        "memflow_wan1.3b_long.yaml",
        "finetune_flow_matching.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path: Path) -> None:
    cli = ParseOnlyCLI(args=["--config", str(path)], run=False)
    assert cli.config.model.class_path.startswith("memflow_train.methods.")
    assert cli.config.data.class_path.startswith("data.")


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_snippet_composes_with_a_recipe(path: Path) -> None:
    """Strategy and logger snippets go on top of a recipe as a second --config."""
    cli = ParseOnlyCLI(args=["--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(path)], run=False)
    key = "strategy" if path.parent.name == "strategies" else "logger"
    assert cli.config.trainer[key] not in (None, "auto")


def test_a_wrong_key_is_rejected_with_its_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS[0].parent / "demo.yaml").read_text().replace("gen_update_ratio:", "gen_update_ration:"))
    with pytest.raises(SystemExit):
        ParseOnlyCLI(args=["--config", str(bad)], run=False)
    assert "gen_update_ration" in capsys.readouterr().err


def test_readme_yaml_snippets_compose_with_a_recipe(tmp_path: Path) -> None:
    """The YAML the README shows users is valid on top of the demo recipe (its class paths and keys)."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    for i, block in enumerate(blocks):
        snippet = tmp_path / f"readme_{i}.yaml"
        snippet.write_text(block)
        ParseOnlyCLI(args=["--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(snippet)], run=False)


def test_world_stages_guide_only_with_a_teacher_that_has_an_unconditional_score() -> None:
    """DMD's guidance follows Self-Forcing, cond + s * (cond - uncond), so s = 0 (not 1) is no guidance. A
    world teacher trained without prompt_dropout has no unconditional score: stages 1 and 2 must not use it."""
    import yaml

    from memflow_train.methods.dmd_losses import guided

    cond, uncond = torch.randn(3), torch.randn(3)
    assert torch.equal(guided(cond, uncond, 0.0), cond) and not torch.equal(guided(cond, uncond, 1.0), cond)
    world = ROOT / "configs" / "world"
    dropout = yaml.safe_load((world / "teacher.yaml").read_text())["model"]["init_args"].get("prompt_dropout", 0.0)
    for stage in ("stage1", "stage2"):
        scale = yaml.safe_load((world / f"{stage}.yaml").read_text())["model"]["init_args"]["guidance_scale"]
        assert dropout > 0 or scale == 0, f"{stage}.yaml guides (scale {scale}) with a teacher that has no uncond"
