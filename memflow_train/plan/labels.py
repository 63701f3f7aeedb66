"""The Lightning callback of a traced step: what each tensor is (parameters, gradients, optimizer states,
EMA, KV cache, rollout state), the autocast region, the steady state's set-up, and when to stop."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from memflow_train.methods.ema import ParameterEMA
from memflow_train.methods.optim import MultiNetworkAdamW
from memflow_train.methods.specs import OnDemandTextEncoder
from memflow_train.plan.autocast import AutocastEmulation
from memflow_train.plan.inventory import owner_map
from memflow_train.plan.settings import TraceSettings
from memflow_train.plan.trace import Tracer
from memflow_train.rollout.streaming import StreamingGenerator

MAX_STEPS = 64  # a carried sequence that has not settled by then is reported as planned over these steps


def _streams_of(stream: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(KV cache + bank tensors, other rollout state) of a rollout.streaming.Stream."""
    cache = []
    for layer in stream.cache.layers:
        cache += layer.tensors()
        candidates = getattr(layer.memory, "_candidates", None)  # NAM's SMA candidates (views + mean keys)
        if candidates:
            cache += [t for t in candidates if isinstance(t, torch.Tensor)]
    recent = [stream.recent] if isinstance(stream.recent, torch.Tensor) else []
    return cache, recent


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []


class PlanCallback(L.Callback):
    """Labels what the step holds (parameters, gradients, optimizer states, EMA, KV cache, rollout state),
    switches the autocast emulation with Lightning's autocast region, and stops once the step is planned."""

    def __init__(self, tracer: Tracer, settings: TraceSettings, autocast: AutocastEmulation | None) -> None:
        self.tracer, self.settings, self.autocast = tracer, settings, autocast
        self.steps = 0
        self.settled = True
        self._cache_bytes: int | None = None
        self._streams: list[weakref.ref] = []

    # ------------------------------------------------------------------------------------ set-up

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        owners = owner_map(module)
        label = self.tracer.label
        for p in module.parameters():
            owner = owners.get(id(p), "module")
            label(p, f"{'param' if p.requires_grad else 'frozen'}:{owner}")
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda q, o=owner: label(q.grad, f"grad:{o}"))
        label(list(module.buffers()), "buffer")
        for value in list(vars(module).values()):
            if isinstance(value, OnDemandTextEncoder) and value._encoder is not None:
                label(list(value._encoder.parameters()), "frozen:text_encoder")
            if isinstance(value, ParameterEMA):
                if self.settings.steady:
                    value.start_update = 0
                self._watch_ema(value)
            if isinstance(value, StreamingGenerator):
                self._watch_generator(value)
        for optimizer in trainer.optimizers:
            self._create_states(optimizer, owners)

    def _create_states(self, optimizer: torch.optim.Optimizer, owners: dict[int, str]) -> None:
        """AdamW's states as in steady state (one step on zero meta gradients), then the step's phase hooks."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for group in optimizer.param_groups:
            group["foreach"] = self.settings.foreach
        if self.settings.steady:
            if isinstance(optimizer, MultiNetworkAdamW):
                optimizer.set_active([g["name"] for g in optimizer.param_groups])
            with self.tracer.phase_of("optim_temp"):
                for p in params:
                    p.grad = torch.zeros_like(p)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            self._label_states(optimizer, owners)

        def after(*_: Any) -> None:
            self.tracer.phase = "activation"
            self._label_states(optimizer, owners)

        optimizer.register_step_post_hook(after)

    def _label_states(self, optimizer: torch.optim.Optimizer, owners: dict[int, str]) -> None:
        for p, state in optimizer.state.items():
            self.tracer.label(_tensors(state), f"state:{owners.get(id(p), 'module')}")

    def _watch_ema(self, ema: ParameterEMA) -> None:
        tracer = self.tracer

        def around(update: Callable) -> Callable:
            def update_traced(*args: Any, **kwargs: Any) -> Any:
                with tracer.phase_of("ema"):
                    out = update(*args, **kwargs)
                tracer.label(list(ema.shadow.values()), "ema")
                return out

            return update_traced

        ema.update = around(ema.update)

    def _watch_generator(self, sampler: StreamingGenerator) -> None:
        """Label each stream's cache after every write, recache and memory intake."""
        tracer, streams = self.tracer, self._streams

        def relabel(stream: Any) -> None:
            cache, recent = _streams_of(stream)
            tracer.label(cache, "kv_cache")
            tracer.label(recent, "rollout")

        def after_write(method: Callable) -> Callable:
            def traced(stream: Any, *args: Any, **kwargs: Any) -> Any:
                out = method(stream, *args, **kwargs)
                relabel(stream)
                return out

            return traced

        def new_stream(method: Callable) -> Callable:
            def traced(*args: Any, **kwargs: Any) -> Any:
                stream = method(*args, **kwargs)
                # Weak references only: a cycle would keep the cache alive past its use (until a GC pass).
                prepare, cache, ref = type(stream.cache).prepare, weakref.ref(stream.cache), weakref.ref(stream)

                def prepare_traced(*a: Any, **k: Any) -> None:
                    prepare(cache(), *a, **k)
                    if ref() is not None:
                        relabel(ref())

                stream.cache.prepare = prepare_traced
                streams.append(weakref.ref(stream))
                return stream

            return traced

        sampler.new_stream = new_stream(sampler.new_stream)
        sampler.write_chunk = after_write(sampler.write_chunk)
        sampler.recache = after_write(sampler.recache)

    # ------------------------------------------------------------------------------------ the step

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.steps == 0:
            self.tracer.reset_peaks()
        if self.autocast is not None:
            self.autocast.enabled = True

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        """From here to the step's end: the update's temporaries (Lightning runs an automatic-optimization
        closure, forward and backward, inside optimizer.step, before this hook)."""
        self.tracer.phase = "optim_temp"

    def on_before_backward(self, trainer: L.Trainer, module: L.LightningModule, loss: torch.Tensor) -> None:
        if self.autocast is not None and module.automatic_optimization:  # Lightning's autocast ends before it
            self.autocast.enabled = False

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.autocast is not None:
            self.autocast.enabled = False
        self.steps += 1
        sequence = getattr(module, "sequence", None)
        if not self.settings.steady or sequence is None or not hasattr(sequence, "stream"):
            trainer.should_stop = True
            return
        cache, recent = _streams_of(sequence.stream)
        in_cache = {id(t) for t in cache}
        self.tracer.label([t for t in _tensors(sequence.state_dict()) if id(t) not in in_cache], "rollout")
        self.tracer.label(cache, "kv_cache")
        size = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in cache}.values())
        switched = sequence.length > sequence.switch_frame or sequence.switch_frame >= sequence.end
        settled = size == self._cache_bytes and switched
        self._cache_bytes = size
        if settled or sequence.length >= sequence.end or self.steps >= MAX_STEPS:
            self.settled = settled or sequence.length >= sequence.end
            trainer.should_stop = True
