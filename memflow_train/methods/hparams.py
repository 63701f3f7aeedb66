"""Hyperparameters as plain data: what checkpoints and loggers store, and back to specs.

LightningCLI hands the modules dataclass specs; checkpoints and W&B want plain dicts and lists
(a checkpoint then loads with torch.load(weights_only=True)), and load_from_checkpoint hands
those dicts back to the constructor, which coerces them into specs again.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def plain(value: Any) -> Any:
    from memflow_train.memory.policy import MemoryPolicy, plain_policy

    if isinstance(value, MemoryPolicy):  # selected by class_path: kept with it
        return plain_policy(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def coerce(cls: type[T], value: T | dict | None) -> T | None:
    """A spec from a spec or from its plain dict (tuple-typed fields are restored from lists)."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"expected {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {}
    for name, v in value.items():
        origin = typing.get_origin(hints.get(name))
        fields[name] = tuple(v) if origin is tuple and isinstance(v, list) else v
    return cls(**fields)


def save_plain_hyperparameters(module: Any, values: dict[str, Any]) -> None:
    """module.save_hyperparameters with plain data.

    Built by LightningCLI, the module takes the CLI's own record (the parsed config as plain data,
    with the class path that LightningCLI needs to resume from --ckpt_path); built in Python, the
    given init values turned into plain data.
    """
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    if _given_hyperparameters.get() is not None:
        module.save_hyperparameters()
    else:
        module.save_hyperparameters(plain({k: v for k, v in values.items() if k not in ("self", "__class__")}))
