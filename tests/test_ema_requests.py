"""An explicit EMA request never returns live weights; the default says when it falls back to them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from memflow_train.export import main as export_main
from memflow_train.methods.checkpoints import load_trained_network
from memflow_train.methods.specs import BackboneSpec
from memflow_train.models.loading import NoEmaWeightsWarning, load_transformer
from tests.method_helpers import dmd_module, fit


def _checkpoint(tmp_path: Path, ema_start_step: int, steps: int = 2) -> Path:
    module = dmd_module(ema_start_step=ema_start_step)  # the generator is updated every 2nd step
    trainer = fit(module, steps=steps)
    path = tmp_path / f"ema_from_{ema_start_step}.ckpt"
    trainer.save_checkpoint(path)
    return path


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_ema_before_its_start_is_refused_when_asked_for_and_warned_about_by_default(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, ema_start_step=100)  # 2 steps: the EMA has not started
    live = load_trained_network(path, "generator", ema=False)
    for ask in (
        lambda: load_trained_network(path, "generator", ema=True),
        lambda: load_transformer(path, checkpoint_key="generator_ema"),
        lambda: BackboneSpec(weights=str(path), checkpoint_key="generator_ema").build(),
    ):
        with pytest.raises(KeyError, match=r"no generator_ema weights \(EMA starts at step 100"):
            ask()
    with pytest.warns(NoEmaWeightsWarning, match="using the live generator weights"):
        default = load_trained_network(path)
    assert _same(default, live)
    with pytest.raises(KeyError, match="generator_ema"):
        export_main([str(path), str(tmp_path / "out"), "--ema"])
    with pytest.warns(NoEmaWeightsWarning):
        export_main([str(path), str(tmp_path / "out")])


def test_started_ema_is_what_the_default_and_the_explicit_request_load(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, ema_start_step=0, steps=6)  # 3 generator updates: the EMA lags the live weights
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoEmaWeightsWarning)
        default = load_trained_network(path)
    explicit = load_trained_network(path, "generator", ema=True)
    live = load_trained_network(path, "generator", ema=False)
    assert _same(default, explicit) and not _same(default, live)


def test_export_help_names_the_command(capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit):
        export_main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m memflow_train.export") and "--trust-checkpoint" in out and "--ema" in out
