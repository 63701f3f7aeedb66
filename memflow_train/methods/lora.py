"""LoRA through PEFT, injected in place so the backbone keeps its own forward methods."""

from __future__ import annotations

import re

import peft
import torch
from peft.tuners.lora import LoraLayer

from memflow_train.methods.specs import LoraSpec


def add_lora(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """Wrap the target Linear layers of model.blocks with LoRA adapters; only adapters stay trainable."""
    # A string target is a regex PEFT full-matches against module names: only Linears inside blocks.
    names = "|".join(re.escape(t) for t in spec.target_modules)
    config = peft.LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha if spec.alpha is not None else spec.rank,
        lora_dropout=spec.dropout,
        target_modules=rf"blocks\.\d+\.(?:.*\.)?(?:{names})",
    )
    peft.inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    if not any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError(f"no layer matched the LoRA target modules {spec.target_modules}")
    return model


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base weight and put the plain Linear back (PEFT's own merge math)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model
