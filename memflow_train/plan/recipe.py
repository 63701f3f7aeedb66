"""A config's plan: its step traced with and without gradient checkpointing and, given a GPU's memory, a
verdict: fits, or the cheapest change that makes it fit (planned, not guessed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

from memflow_train.methods.specs import LoraSpec
from memflow_train.plan.batch import synthetic_batch
from memflow_train.plan.config import PlanSetup
from memflow_train.plan.planner import plan_module
from memflow_train.plan.report import Plan, Verdict, human
from memflow_train.plan.strategy import Strategy, deepspeed, parse_strategy


@dataclass
class _Candidate:
    change: str
    init_changes: dict[str, Any] = field(default_factory=dict)
    strategy: Strategy | None = None
    checkpointing: bool | None = None


def _lora_args(setup: PlanSetup) -> list[str]:
    return [k for k in setup.init_args if k == "lora" or k.endswith("_lora")]


def _frame_args(setup: PlanSetup) -> list[str]:
    """The settings that set how many frames a step rolls out or trains on."""
    if "frames_per_step" in setup.init_args:
        return ["frames_per_step", "window"]
    return [k for k in ("num_frames", "max_frames") if k in setup.init_args][:1]


def _candidates(setup: PlanSetup, strategy: Strategy, gpus: int, checkpointing: bool) -> list[_Candidate]:
    """The changes to try, cheapest first, each on top of the ones before: gradient checkpointing, parameter
    sharding (ZeRO-3), CPU offload of the optimizer, LoRA on the trained networks. Shorter rollouts follow
    (see _fewer_frames)."""
    out: list[_Candidate] = []
    if not checkpointing:
        out.append(
            _Candidate("gradient checkpointing (model.init_args.gradient_checkpointing: true)", checkpointing=True)
        )
    current = strategy
    if not strategy.shards_parameters and gpus > 1:
        current = deepspeed(3)
        out.append(_Candidate("DeepSpeed ZeRO-3 (--config configs/strategies/deepspeed_zero3.yaml)", strategy=current))
    if not (current.kind == "deepspeed" and current.offload_optimizer):
        current = deepspeed(3, offload_optimizer=True)
        out.append(
            _Candidate(
                "DeepSpeed ZeRO-3 with the optimizer on the CPU (--config configs/strategies/deepspeed_zero3_offload.yaml)",
                strategy=current,
            )
        )
    lora = [k for k in _lora_args(setup) if setup.init_args.get(k) is None]
    if lora:
        spec = asdict(LoraSpec())
        spec["target_modules"] = list(spec["target_modules"])
        names = ", ".join(f"{k}: {{rank: {spec['rank']}}}" for k in lora)
        out.append(_Candidate(f"LoRA rank {spec['rank']} ({names})", init_changes={k: spec for k in lora}))
    return out


def _fewer_frames(setup: PlanSetup) -> list[tuple[str, dict[str, Any]]]:
    """Shorter rollouts: the frame settings halved (whole chunks) down to one chunk."""
    keys = _frame_args(setup)
    chunk = int((setup.init_args.get("memory") or {}).get("num_frame_per_block", 3))
    frames = setup.init_args.get(keys[0]) if keys else None
    if frames is None and keys == ["max_frames"]:
        frames = setup.data.num_frames
    out = []
    while frames is not None and frames > chunk:
        frames = max(chunk, frames // 2 // chunk * chunk)
        changes = dict.fromkeys(keys, frames)
        out.append((", ".join(f"{k}: {frames}" for k in keys), changes))
    return out


def verdict(
    setup: PlanSetup, plan: Plan, gpus: int, gpu_memory: int, headroom: float, latent_frames: int | None
) -> Verdict:
    """Fits when the configured peak is within gpu_memory less the headroom; otherwise the changes of
    _candidates (cumulative) and then shorter rollouts are planned in turn until one fits."""
    out = Verdict(gpu_memory=gpu_memory, headroom=headroom, fits=plan.per_gpu_bytes <= gpu_memory * (1 - headroom))
    if out.fits:
        return out
    strategy = parse_strategy(setup.strategy, gpus)
    checkpointing = plan.variants[plan.chosen].checkpointing
    other = [v for v in plan.variants if v.checkpointing != checkpointing]
    changes: dict[str, Any] = {}
    names: list[str] = []
    steps = _candidates(setup, strategy, gpus, checkpointing)
    steps += [_Candidate(f"shorter rollout ({label})", init_changes=ch) for label, ch in _fewer_frames(setup)]
    for cand in steps:
        reuse = cand.checkpointing and not changes and not names and other
        trying = (
            cand.checkpointing if cand.checkpointing is not None else checkpointing,
            cand.strategy or strategy,
            {**changes, **cand.init_changes},
            [n for n in names if not (n.startswith("shorter") and cand.change.startswith("shorter"))] + [cand.change],
        )
        if reuse:
            size = other[0].per_gpu_bytes  # already traced for the table
        else:
            try:
                module = setup.build(**trying[2], gradient_checkpointing=trying[0])
                batch = synthetic_batch(module, setup.data, latent_frames)
                size = plan_module(module, gpus, trying[1], precision=setup.precision, batch=batch,
                                   target=_target(setup)).per_gpu_bytes  # fmt: skip
            except ValueError as err:  # a change this method or config cannot take: skipped, the others stand
                out.tried.append((" + ".join(trying[3]), None, f"not possible: {err}"))
                continue
        checkpointing, strategy, changes, names = trying
        fits = size <= out.usable
        out.tried.append((" + ".join(names), size, "fits" if fits else ""))
        if fits:
            out.answer = f"{' + '.join(names)}: {human(size)} per GPU"
            break
    return out


def _target(setup: PlanSetup) -> str:
    return "cpu" if setup.accelerator == "cpu" else "cuda"


def plan_config(
    setup: PlanSetup,
    gpus: int,
    gpu_memory: int | None = None,
    headroom: float = 0.1,
    latent_frames: int | None = None,
) -> Plan:
    """The plan of a parsed config (both checkpointing settings), with a verdict when gpu_memory is given."""
    module = setup.build()
    batch = synthetic_batch(module, setup.data, latent_frames)
    strategy = parse_strategy(setup.strategy, gpus)
    d = setup.data
    encoder_params, _, encoder_note = setup.text_encoder
    uses_negative = hasattr(module, "teacher")  # DMD's guidance reads the negative prompt's embeddings
    carried = "text" in d.fields and ("negative" in d.fields or not uses_negative)
    if not carried and setup.init_args.get("text_encoder") is None and encoder_note != "none configured":
        raise ValueError(
            f"the data ({d.source}, fields {list(d.fields)}) lacks text embeddings, so training runs the text "
            f"encoder, which cannot be planned here: {encoder_note}"
        )
    size = f"{encoder_params / 1e9:.2f} B parameters ({encoder_note})" if encoder_params else encoder_note
    if encoder_note == "none configured":
        encoder = "none configured"
    elif carried:
        encoder = f"not loaded, the data carries text embeddings ({size})"
    else:
        encoder = f"loaded on first use (the data lacks text embeddings): counted in the trace ({size})"
    facts = [
        f"config: {' + '.join(setup.configs)}",
        f"batch per GPU ({d.source}): {d.batch_size} sample(s), {_prompts(batch)} prompt(s) of {d.text_len} tokens, "
        f"data fields {list(d.fields)}",
        *[f"architecture: {a}" for a in setup.architectures],
        f"text encoder: {encoder}",
        "the traced step is the heaviest in steady state: a generator update with the critic's, EMA running, "
        "optimizer states present (memflow_train/plan/step.py)",
    ]
    plan = plan_module(module, gpus, strategy, precision=setup.precision, batch=batch, target=_target(setup),
                       compare_checkpointing=True, title=f"Memory plan: {setup.configs[0]}", facts=facts)  # fmt: skip
    if gpu_memory is not None:
        plan.verdict = verdict(setup, plan, gpus, gpu_memory, headroom, latent_frames)
    return plan


def _prompts(batch: SimpleNamespace) -> int:
    return len(batch.prompts[0]) if batch.prompts else 0
