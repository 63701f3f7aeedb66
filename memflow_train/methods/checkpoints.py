"""Networks out of memflow-train training checkpoints (Lightning .ckpt files or DeepSpeed directories).

A checkpoint may leave out frozen weights: the teacher always, and under DeepSpeed the frozen
base weights of a LoRA-trained network. Those come back from the network's spec recorded in the
checkpoint's hyperparameters (its weights path, or its seeded random initialisation), the
trained weights (EMA by default) go on top, and LoRA adapters are merged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from memflow_train.methods.hparams import coerce
from memflow_train.methods.specs import BackboneSpec
from memflow_train.models.causal_wan import CausalWanTransformer, cast_keeping_fp32
from memflow_train.models.loading import (
    check_state_dict,
    is_deepspeed_checkpoint,
    lightning_network,
    merge_lora,
    normalize_keys,
    read_deepspeed_checkpoint,
    read_weights,
)


def read_training_checkpoint(path: str | Path, trust: bool = False) -> dict[str, Any]:
    path = Path(path)
    ckpt = read_deepspeed_checkpoint(path, trust) if is_deepspeed_checkpoint(path) else read_weights(path)
    if "pytorch-lightning_version" not in ckpt:
        raise ValueError(f"{path} is not a memflow-train training checkpoint (no Lightning state)")
    return ckpt


def network_spec(ckpt: dict[str, Any], network: str) -> BackboneSpec:
    hparams = ckpt.get("hyper_parameters") or {}
    spec = hparams.get(network)
    if spec is None and network == "critic":  # the critic started as a copy of the teacher
        spec = hparams.get("teacher")
    if spec is None:
        raise KeyError(f"the checkpoint records no spec for {network!r}; networks: generator, critic, model")
    return coerce(BackboneSpec, spec)


def is_training_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return is_deepspeed_checkpoint(path) or (path.is_file() and path.suffix == ".ckpt")


def load_trained_network(
    path: str | Path,
    network: str | None = None,
    ema: bool | None = None,
    dtype: torch.dtype | None = None,
    trust: bool = False,
) -> CausalWanTransformer:
    """The trained network, frozen weights completed, LoRA merged.

    network: generator, critic or model (FlowMatchingFinetune); default: whichever the run trained.
    ema: True requires its EMA weights (KeyError if the run has none yet), False takes the live
    ones, None the EMA when there is one (with a warning when there is not). trust: accept
    DeepSpeed files that could run code when unpickled (memflow_train.models.trust).
    """
    ckpt = read_training_checkpoint(path, trust)
    if network is None:
        network = "generator" if "generator" in (ckpt.get("hyper_parameters") or {}) else "model"
    trained, lora, alpha = lightning_network(ckpt, network, ema)
    model = network_spec(ckpt, network).build()  # the architecture, and every weight the checkpoint left out
    state = {**model.state_dict(), **normalize_keys(trained)}
    if lora:
        state = merge_lora(state, lora, alpha)
    check_state_dict(model, {k: v.shape for k, v in state.items()}, str(path))
    model.load_state_dict(state, strict=True)
    return cast_keeping_fp32(model, dtype or torch.float32)
