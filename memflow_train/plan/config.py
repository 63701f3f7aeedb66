"""A training config read as `train.py fit` reads it (LightningCLI, several --config files, --key value
overrides), its LightningModule built on meta weights, and the facts of its data the step depends on."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningModule

from memflow_train.cli import MemflowCLI, _members
from memflow_train.errors import short_error
from memflow_train.methods.specs import BackboneSpec, TextEncoderSpec
from memflow_train.plan.architecture import resolve_backbone, text_encoder_parameters
from memflow_train.plan.functions import meta_parameters


@dataclass(frozen=True)
class DataFacts:
    """What a batch of the configured data holds (per rank)."""

    batch_size: int
    text_len: int
    fields: tuple[str, ...]
    num_frames: int  # latent frames of a sample whose data fixes no length
    latent_size: tuple[int, int] | None
    dtype: torch.dtype
    source: str


@dataclass
class PlanSetup:
    """Everything the planner reads from a config: the module class and its resolved init args (weights
    replaced by their architecture), the data, trainer precision / accelerator and the strategy."""

    model_class: type[LightningModule]
    init_args: dict[str, Any]
    data: DataFacts
    precision: str
    accelerator: str
    strategy: Any  # a name, or {"class_path": ..., "init_args": {...}}
    architectures: list[str] = field(default_factory=list)
    text_encoder: tuple[int, int, str] = (0, 0, "none configured")
    configs: list[str] = field(default_factory=list)

    def build(self, **changes: Any) -> LightningModule:
        """The module with meta parameters (init args changed by `changes`). Raises what its constructor does."""
        with meta_parameters():
            return self.model_class(**{**self.init_args, **changes})


def _hint_has(hint: Any, cls: type) -> bool:
    return hint is cls or cls in typing.get_args(hint)


def _importable(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def _strategies_not_importable(configs: list[str]) -> dict[str, Any] | None:
    """The last config file's trainer.strategy whose class cannot be imported here (a strategy another
    branch adds): the planner models it by name, and LightningCLI is told "auto" so it parses."""
    found = None
    for path in configs:
        if not Path(path).is_file():
            continue
        raw = yaml.safe_load(Path(path).read_text()) or {}
        strategy = (raw.get("trainer") or {}).get("strategy") if isinstance(raw, dict) else None
        if isinstance(strategy, dict) and "class_path" in strategy:
            found = None if _importable(strategy["class_path"]) else dict(strategy)
    return found


class _PlanCLI(MemflowCLI):
    """LightningCLI that instantiates the model on meta weights (architectures resolved, no file read)
    and the data module, never the trainer, its callbacks or its logger."""

    def instantiate_classes(self) -> None:
        config = self.config
        model = config.model
        target = importlib.import_module(model.class_path.rpartition(".")[0])
        self.model_class = getattr(target, model.class_path.rpartition(".")[2])
        members = _members(self.model_class) or {}
        self.architectures = []
        for name, hint in members.items():
            value = model.init_args.get(name)
            if _hint_has(hint, BackboneSpec) and value is not None:
                resolved, how = resolve_backbone(name, _plain(value))
                model.init_args[name] = type(value)(**resolved) if hasattr(value, "clone") else resolved
                self.architectures.append(how)
            if _hint_has(hint, TextEncoderSpec):
                self.text_encoder = text_encoder_parameters(_plain(value) if value is not None else None)
                if value is not None and not self.text_encoder[0] and _plain(value).get("path"):
                    model.init_args[name] = None  # unreadable here; counted as unknown in the plan
        stripped = config.clone()
        stripped.trainer.callbacks, stripped.trainer.logger, stripped.trainer.plugins = None, False, None
        stripped.trainer.strategy = "auto"
        with meta_parameters():
            self.config_init = self.parser.instantiate_classes(stripped)
        self.model, self.datamodule = self.config_init.model, self.config_init.data


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def data_facts(datamodule: Any, overrides: dict[str, Any]) -> DataFacts:
    """Batch facts from a ShardDataModule-like object (batch_size, spec.text_len, spec.fields, num_frames,
    spec.latent_size, dtype); `overrides` (planner flags) win. ValueError naming the flag when one is unknown."""
    spec = getattr(datamodule, "spec", None)
    found = {
        "batch_size": getattr(datamodule, "batch_size", None),
        "text_len": getattr(spec, "text_len", None),
        "fields": tuple(getattr(spec, "fields", ("text", "negative"))),
        "num_frames": getattr(datamodule, "num_frames", None),
        "latent_size": getattr(spec, "latent_size", None),
        "dtype": getattr(datamodule, "dtype", torch.float32),
    }
    found.update({k: v for k, v in overrides.items() if v is not None})
    for key, flag in (("batch_size", "--batch-size"), ("text_len", "--text-len"), ("num_frames", "--latent-frames")):
        if found[key] is None:
            raise ValueError(f"the data module {type(datamodule).__name__} does not say its {key}: pass {flag}")
    return DataFacts(source=type(datamodule).__name__, **found)


def read_config(configs: list[str], overrides: list[str], data_overrides: dict[str, Any]) -> PlanSetup:
    """Parse `fit --config ... overrides` with the project's CLI, without loading weights or starting a run.
    Raises ValueError (a bad key or value, with jsonargparse's message) or FileNotFoundError."""
    for path in configs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
    unimportable = _strategies_not_importable(configs)
    argv = [a for c in configs for a in ("--config", c)] + list(overrides)
    if unimportable is not None:
        argv += ["--trainer.strategy", "auto"]
    seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_logger.level
    seed_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = _PlanCLI(args=argv, run=False, parser_kwargs={"exit_on_error": False})
    except argparse.ArgumentError as err:
        raise ValueError("\n  ".join(short_error(str(err)))) from None
    finally:
        seed_logger.setLevel(level)
    trainer = cli.config.trainer
    strategy = unimportable if unimportable is not None else _plain(trainer.strategy)
    return PlanSetup(
        model_class=cli.model_class,
        init_args=_init_args(cli),
        data=data_facts(cli.datamodule, data_overrides),
        precision=str(trainer.precision),
        accelerator=str(trainer.accelerator),
        strategy=strategy,
        architectures=cli.architectures,
        text_encoder=getattr(cli, "text_encoder", (0, 0, "none configured")),
        configs=list(configs),
    )


def _init_args(cli: _PlanCLI) -> dict[str, Any]:
    """The model's init args as plain data (what the constructor coerces back into specs)."""
    args = _plain(cli.config.model.init_args)
    return {k: v for k, v in args.items() if k != "__path__"}
