"""One training step of a LightningModule, run by Lightning on meta weights under the tracer.

The step is the module's own `training_step` inside a real `Trainer.fit` (manual or automatic
optimization, the optimizer's step and clipping, EMA updates, Lightning's logging), so the trace follows
whatever the method does: rollout, exit steps, cache writes, teacher CFG, critic, backward. Planned is the
heaviest step in steady state:

- every step trains the generator (`gen_update_ratio` 1 in the traced copy) and the EMA runs
  (`start_update` 0; the EMA copy is counted at its final size from the step's start);
- the optimizer states exist before the step (one meta step on zero gradients creates them);
- a method that carries a sequence across steps (streaming long tuning) is stepped until its KV cache
  and bank stop growing and its prompt switch (with recache) has happened; the peak is over those steps
  (the traced sequence is shortened so that both happen early: memflow_train/plan/sequence.py).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from memflow_train.methods.specs import OnDemandTextEncoder
from memflow_train.plan.autocast import AutocastEmulation
from memflow_train.plan.functions import MetaFunctions, meta_parameters, tracing
from memflow_train.plan.labels import MAX_STEPS, PlanCallback
from memflow_train.plan.sequence import shorten_for_planning
from memflow_train.plan.settings import TraceSettings
from memflow_train.plan.trace import META, PERSISTENT, Profile, Tracer


@dataclass
class StepTrace:
    tracer: Tracer
    steps: int  # training steps traced (more than 1 only for a carried sequence)
    seconds: float
    settled: bool  # a carried sequence reached its steady state within MAX_STEPS


def meta_twin(module: L.LightningModule) -> L.LightningModule:
    """A deep copy of the module with its floating tensors (parameters, buffers, EMA copies, a carried
    rollout state) on the meta device, same shapes, dtypes and requires_grad, and its other tensors (masks,
    frame indices) on the CPU; no weight data is copied; detached from any trainer."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device=META), requires_grad=p.requires_grad)
    trainer = module.__dict__.get("_trainer")
    if trainer is not None:
        memo[id(trainer)] = None
    original = torch.Tensor.__deepcopy__

    def deepcopy_tensor(t: torch.Tensor, memo_: dict) -> torch.Tensor:
        if type(t) is not torch.Tensor:
            return original(t, memo_)
        copied = torch.empty_like(t, device=META) if t.is_floating_point() else t.detach().to("cpu", copy=True)
        copied.requires_grad_(t.requires_grad and t.is_leaf)
        memo_[id(t)] = copied
        return copied

    torch.Tensor.__deepcopy__ = deepcopy_tensor
    try:
        return copy.deepcopy(module, memo)
    finally:
        torch.Tensor.__deepcopy__ = original


@contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's start-up lines and per-run warnings say nothing about a plan."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextmanager
def _checkpoint_in_trace(functions: MetaFunctions) -> Iterator[None]:
    """Activation checkpointing recomputes a block in backward, where torch-function modes are not active:
    the backbone's checkpoint call is wrapped so the recompute runs under the trace's function mode again
    and under the autocast state of its forward (as torch.utils.checkpoint does for the real autocast)."""
    from memflow_train.models import causal_wan

    original = causal_wan.checkpoint
    autocast = functions.autocast

    def checkpoint(function: Callable, *args: Any, **kwargs: Any) -> Any:
        enabled = autocast is not None and autocast.enabled

        def run(*a: Any, **k: Any) -> Any:
            active = functions in torch.overrides._get_current_function_mode_stack()
            with contextlib.nullcontext() if active else functions:
                if autocast is None:
                    return function(*a, **k)
                before, autocast.enabled = autocast.enabled, enabled
                try:
                    return function(*a, **k)
                finally:
                    autocast.enabled = before

        return original(run, *args, **kwargs)

    causal_wan.checkpoint = checkpoint
    try:
        yield
    finally:
        causal_wan.checkpoint = original


def prepare_twin(module: L.LightningModule, settings: TraceSettings) -> L.LightningModule:
    """The meta copy the trace runs: cast, checkpointing as asked, every step a generator step."""
    twin = meta_twin(module)
    if settings.cast is not None:
        twin = twin.to(settings.cast)
    for child in twin.modules():
        if settings.checkpointing is not None and hasattr(child, "gradient_checkpointing"):
            child.gradient_checkpointing = settings.checkpointing
    if settings.steady:
        if "gen_update_ratio" in twin.hparams:
            twin.hparams.gen_update_ratio = 1
        shorten_for_planning(twin)
    return twin


def _text_encoder_on_meta(twin: L.LightningModule, batch: Any) -> None:
    """A batch without text embeddings makes the method run its text encoder: build it on meta weights first
    (the on-demand encoder would load its weight files)."""
    from memflow_train.plan.architecture import meta_text_encoder

    encoder = getattr(twin, "text_encoder", None)
    lacks = getattr(batch, "prompt_embeds", None) is None or getattr(batch, "negative_embeds", None) is None
    if isinstance(encoder, OnDemandTextEncoder) and encoder._encoder is None and lacks:
        encoder._encoder = meta_text_encoder(encoder.spec)


def trace_steps(module: L.LightningModule, batch: Any, profiles: list[Profile], settings: TraceSettings) -> StepTrace:
    """Run the module's steady-state training step under the tracer (see the module doc).

    module: a LightningModule with real or meta weights (it is not changed: a meta copy runs);
    batch: what its DataLoader would yield (real CPU tensors; counted, as a GPU would hold it).
    Raises whatever the step raises (e.g. ValueError for a batch the method cannot use)."""
    autocast = AutocastEmulation(settings.autocast) if settings.autocast is not None else None
    tracer = Tracer(profiles, PERSISTENT if settings.steady else ())
    callback = PlanCallback(tracer, settings, autocast)
    start = time.perf_counter()
    functions = MetaFunctions(autocast)
    with _quiet(), tracing(tracer, functions), _checkpoint_in_trace(functions):
        twin = prepare_twin(module, settings)
        batch = copy.deepcopy(batch)
        _text_encoder_on_meta(twin, batch)
        fit_on_batch(twin, batch, MAX_STEPS, callbacks=[callback])
    return StepTrace(tracer, callback.steps, time.perf_counter() - start, callback.settled)


def fit_on_batch(
    module: L.LightningModule,
    batch: Any,
    steps: int,
    accelerator: str = "cpu",
    precision: str = "32-true",
    callbacks: list[L.Callback] | None = None,
) -> L.Trainer:
    """`steps` training steps of module on the same batch, one device, nothing logged, saved or validated."""
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks or [],
    )
    trainer.fit(module, torch.utils.data.DataLoader([batch] * steps, batch_size=None, collate_fn=_same))
    return trainer


def _same(batch: Any) -> Any:
    return batch


__all__ = ["MAX_STEPS", "StepTrace", "fit_on_batch", "TraceSettings", "meta_parameters", "meta_twin", "trace_steps"]
