"""The planner: the per-GPU memory of a module's training step under a strategy (plan_module)."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import torch
from lightning.pytorch import LightningModule

from memflow_train.methods.specs import TextEncoderSpec
from memflow_train.plan.batch import synthetic_batch
from memflow_train.plan.config import DataFacts
from memflow_train.plan.inventory import networks
from memflow_train.plan.report import Plan, Variant
from memflow_train.plan.step import trace_steps
from memflow_train.plan.strategy import Strategy, parse_strategy, profile, trace_settings


def configured_checkpointing(module: LightningModule) -> bool:
    """Whether any of the module's networks recomputes its blocks in backward (gradient_checkpointing)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())


def default_target(module: LightningModule) -> str:
    """cpu for a module whose weights are on the CPU; cuda otherwise (on a GPU, or meta weights to plan)."""
    return "cpu" if {p.device.type for p in module.parameters()} == {"cpu"} else "cuda"


def default_data(module: LightningModule) -> DataFacts:
    """The data a module's own settings imply: batch 1, the text encoder spec's default prompt length, its
    rollout length (num_frames, or max_length carried), latents for a method that trains on them (max_frames
    long). Raises ValueError when a length is not in the module's settings (pass batch= then)."""
    hp = module.hparams
    trains_on_latents = not hasattr(module, "generator")
    frames = hp.get("max_length") or hp.get("num_frames") or hp.get("max_frames")
    if frames is None:
        raise ValueError(f"{type(module).__name__} does not say how many latent frames a sample has: pass batch=")
    size = getattr(module, "latent_size", None)
    if trains_on_latents and size is None:
        raise ValueError(f"{type(module).__name__}'s latent size is set by its data: pass batch=")
    return DataFacts(
        batch_size=1,
        text_len=TextEncoderSpec.__dataclass_fields__["text_len"].default,
        fields=("text", "negative", "latents") if trains_on_latents else ("text", "negative"),
        num_frames=int(frames),
        latent_size=tuple(size) if size is not None else None,
        dtype=torch.float32,
        source="the module's settings",
    )


def _variant(
    module: LightningModule,
    batch: Any,
    strategy: Strategy,
    gpus: int,
    precision: str,
    target: str,
    checkpointing: bool,
    steady_state: bool = True,
) -> Variant:
    settings = replace(trace_settings(strategy, precision, target, checkpointing), steady=steady_state)
    prof = profile(strategy, gpus, networks(module), settings)
    traced = trace_steps(module, batch, [prof], settings)
    tracer = traced.tracer
    return Variant(
        checkpointing=bool(settings.checkpointing),
        per_gpu_bytes=tracer.peak_bytes(prof),
        parts=tracer.composition(prof),
        largest={k: v for k, v in tracer.largest.items() if k in ("kv_cache", "rollout")},
        steps=traced.steps,
        seconds=traced.seconds,
        operators=tracer.operators,
        settled=traced.settled,
    )


def plan_module(
    module: LightningModule,
    gpus: int = 1,
    strategy: Strategy | str | dict | None = None,
    *,
    precision: str = "32-true",
    batch: Any = None,
    target: str | None = None,
    compare_checkpointing: bool = False,
    steady_state: bool = True,
    title: str | None = None,
    facts: list[str] | None = None,
) -> Plan:
    """The per-GPU memory of one training step of `module` (real or meta weights; it is not changed).

    gpus: ranks sharing the step (>= 1); strategy: None (single device / DDP), a Lightning strategy name
    (ddp, deepspeed_stage_3, ...), a {class_path, init_args} mapping as in YAML, or a parsed Strategy;
    precision: Lightning's trainer.precision; batch: what one rank's DataLoader yields (default: the
    module's own lengths, see default_data); target: "cuda" (GPU semantics: multi-tensor AdamW,
    autocast) or "cpu" (default: where the weights are, cuda for meta weights); compare_checkpointing:
    also trace the step with gradient checkpointing switched the other way; steady_state: plan the heaviest
    step of a run in steady state (optimizer states and EMA present, a generator step; memflow_train/plan/
    step.py), or, False, the next step of the module exactly as it is (a fresh module's first step, as a
    one-step measurement of it sees).
    Returns a Plan (per_gpu_bytes, rows, to_markdown()). Raises ValueError for a bad argument."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a whole number >= 1, got {gpus!r}")
    strat = strategy if isinstance(strategy, Strategy) else parse_strategy(strategy, gpus)
    target = target or default_target(module)
    if target not in ("cpu", "cuda"):
        raise ValueError(f"target must be 'cpu' or 'cuda', got {target!r}")
    batch = batch if batch is not None else synthetic_batch(module, default_data(module))
    configured = configured_checkpointing(module) or strat.activation_checkpointing
    order = (
        [configured, not configured] if compare_checkpointing and not strat.activation_checkpointing else [configured]
    )
    variants = []
    for checkpointing in order:
        _progress(f"tracing {type(module).__name__}, {strat.label}, checkpointing {'on' if checkpointing else 'off'}")
        variants.append(_variant(module, batch, strat, gpus, precision, target, checkpointing, steady_state))
    variants.sort(key=lambda v: v.checkpointing)
    chosen = next(i for i, v in enumerate(variants) if v.checkpointing == configured)
    facts = list(facts or [])
    facts.insert(0, f"{type(module).__name__}, {strat.label} on {gpus} GPU(s), precision {precision}, target {target}")
    if not any(":" not in c and c not in _TRACED for v in variants for c in v.parts):
        facts.append(f"communication buffers: none under {strat.label}")
    return Plan(title or "Memory plan", facts, variants, chosen, list(networks(module)))


_TRACED = ("activation", "buffer", "kv_cache", "rollout", "optim_temp", "ema")


def _progress(message: str) -> None:
    print(f"plan: {message} ...", file=sys.stderr, flush=True)
