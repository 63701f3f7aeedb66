"""The trust boundary of checkpoint files: nothing from a checkpoint runs code unless the user says so.

Unpickling a torch file with weights_only=False can run any code the file names. Every checkpoint
file memflow-train reads is loaded with weights_only=True, allowing besides tensors and plain
containers only the DeepSpeed data classes its ZeRO optimizer-state files hold (SAFE_DEEPSPEED_GLOBALS).
DeepSpeed's own loaders (zero_to_fp32, engine.load_checkpoint) unpickle without that guard, so
every file of a DeepSpeed checkpoint folder is first proven loadable under it; a file that is not
is refused (UntrustedCheckpointError) unless the caller passes trust=True (--trust-checkpoint in
the commands, trust_checkpoint in YAML).
"""

from __future__ import annotations

import functools
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

# Classes DeepSpeed pickles into ZeRO optimizer-state files (checked with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-2 and ZeRO-3 checkpoints).
SAFE_DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds objects outside the allow-list: loading it could run code."""


@functools.cache
def _allowed() -> tuple[Any, ...]:
    import importlib

    out = []
    for name in SAFE_DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class is not needed
            continue
    return tuple(out)


def safe_load(path: str | Path, mmap: bool = False, deepspeed: bool = False) -> Any:
    """torch.load with weights_only=True (and, for files DeepSpeed wrote, its allow-list: importing
    DeepSpeed only then); UntrustedCheckpointError otherwise."""
    try:
        with torch.serialization.safe_globals(list(_allowed()) if deepspeed else []):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UntrustedCheckpointError(
            f"{path} holds objects outside the safe allow-list, so loading it could run code "
            f"({str(err).splitlines()[0]}). If you trust this file, pass --trust-checkpoint "
            "(trust_checkpoint: true in YAML)"
        ) from err


def check_folder(folder: str | Path, trust: bool = False) -> None:
    """Prove every torch file under a checkpoint folder safe before a loader without the guard reads it.

    Only the pickles are read (mmap: tensor data stays on disk). With trust=True an unsafe file is
    accepted with a warning naming it.
    """
    for path in sorted(Path(folder).rglob("*.pt")):
        try:
            safe_load(path, mmap=True, deepspeed=True)
        except UntrustedCheckpointError as err:
            if not trust:
                raise
            warnings.warn(f"loading a checkpoint file that could run code, as trusted: {err}", stacklevel=2)


def load_client_state(path: str | Path, trust: bool = False) -> Any:
    """A checkpoint file's contents: safely, or (trust=True) as a full pickle after a warning."""
    try:
        return safe_load(path, deepspeed=True)
    except UntrustedCheckpointError as err:
        if not trust:
            raise
        warnings.warn(f"loading a checkpoint file that could run code, as trusted: {err}", stacklevel=2)
        return torch.load(path, map_location="cpu", weights_only=False)
