"""The networks and sampling settings a generation run uses, from a checkpoint and/or a training config.

Settings come, in order of precedence, from the command's flags, the training config (--config, its
model.init_args) or a memflow-train Lightning checkpoint's hyperparameters, then MemFlow's defaults.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from memflow_train.checks import IgnoredSettingWarning
from memflow_train.memory import NAM, MemoryFree, MemoryPolicy, memory_policy
from memflow_train.memory.policy import GEOMETRY
from memflow_train.methods.hparams import coerce
from memflow_train.methods.specs import BackboneSpec, TextEncoderSpec, torch_dtype
from memflow_train.models.causal_wan import CausalWanTransformer, cast_keeping_fp32
from memflow_train.models.loading import load_transformer
from memflow_train.models.text_encoder import WanTextEncoder
from memflow_train.models.vae import VideoAutoencoder
from memflow_train.models.vae import load_vae as load_autoencoder

MEMORY_KNOBS = (  # the built-in policies' options, each a flag (refused, named, where the policy does not read it)
    "bank_size",
    "record_interval",
    "prototype",
    "relevance_softmax",
    "sma_topk",
    "sma_include_sink",
    "sink_size",
    "local_attn_size",
    "num_frame_per_block",
    "record_cadence",
    "recache",
    "recache_sink",
    "context_noise",
    "novelty_threshold",
    "read_topk",
    "slow_size",
    "surprise_threshold",
)


@dataclass(frozen=True)
class Recipe:
    """What a training run fixed that generation must match."""

    generator: BackboneSpec | None = None
    memory: MemoryPolicy = NAM()  # noqa: RUF009 (frozen dataclass)
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    timestep_shift: float = 5.0
    context_timestep: float = 0.0
    latent_size: tuple[int, int] | None = None
    text_encoder: TextEncoderSpec | None = None

    @classmethod
    def from_init_args(cls, args: dict[str, Any]) -> Recipe:
        """From a method's init args (a config's model.init_args or a checkpoint's hyper_parameters)."""
        net = args.get("generator", args.get("model"))
        fields: dict[str, Any] = {
            "generator": coerce(BackboneSpec, net) if isinstance(net, dict | BackboneSpec) else None,
            "memory": memory_policy(args.get("memory")) or NAM(),
            "text_encoder": coerce(TextEncoderSpec, args.get("text_encoder")),
        }
        for key in ("denoising_steps", "latent_size"):
            if args.get(key) is not None:
                fields[key] = tuple(args[key])
        for key in ("timestep_shift", "context_timestep"):
            if args.get(key) is not None:
                fields[key] = float(args[key])
        return cls(**fields)


def recipe_from_config(path: str | Path) -> Recipe:
    """A training YAML (LightningCLI): model.init_args holds the generator spec and sampling settings."""
    config = yaml.safe_load(Path(path).read_text())
    model = (config or {}).get("model") if isinstance(config, dict) else None
    args = model.get("init_args", model) if isinstance(model, dict) else None
    if not isinstance(args, dict) or not isinstance(args.get("generator", args.get("model")), dict):
        raise ValueError(f"{path}: expected model.init_args.generator (or .model) with the backbone spec")
    return Recipe.from_init_args(args)


def recipe_from_checkpoint(path: str | Path) -> Recipe | None:
    """The hyperparameters of a memflow-train Lightning checkpoint (None for other weight sources)."""
    path = Path(path)
    if path.suffix != ".ckpt" or not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    return Recipe.from_init_args(hparams) if isinstance(hparams, dict) else None


def _memory_for_mode(memory: MemoryPolicy, mode: str | None) -> MemoryPolicy:
    """The policy --memory asks for: on / sma (NAM without / with SMA, the recipe's NAM options kept), off
    (MemoryFree), or a policy class (memflow_train.memory.NAME, or a dotted path) with the recipe's shared
    options; the recipe's geometry is kept in every case."""
    if mode is None:
        return memory
    if mode == "off":
        return memory.memory_free()
    if mode in ("on", "sma"):
        nam = memory if isinstance(memory, NAM) else NAM(**{k: getattr(memory, k) for k in GEOMETRY})
        if mode == "sma":
            return replace(nam, sma=True)
        with warnings.catch_warnings():  # the recipe's SMA options, idle with SMA off: back to their defaults
            warnings.simplefilter("ignore", IgnoredSettingWarning)
            nam = replace(nam, sma=False)
        defaults = {f.name: f.default for f in dataclasses.fields(nam)}
        return replace(nam, **{k: defaults[k] for k in nam.unused_options() if k.startswith("sma_")})
    cls = type(memory_policy({"class_path": mode}))
    shared = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in memory.options().items() if k in shared})


def with_memory_flags(memory: MemoryPolicy, mode: str | None, **knobs: Any) -> MemoryPolicy:
    """memory with --memory (on / off / sma / a policy class) and the knobs that were given (None = keep). A knob
    the resulting policy does not read (--bank-size with the memory off, --sma-topk without SMA, --slow-size with
    NAM) is refused, named: it would change nothing."""
    unknown = set(knobs) - set(MEMORY_KNOBS)
    if unknown:
        raise ValueError(f"unknown memory knobs {sorted(unknown)}")
    given = {k: v for k, v in knobs.items() if v is not None}
    base = _memory_for_mode(memory, mode)
    takes = {f.name for f in dataclasses.fields(base)}
    idle = [k for k in given if k not in takes]
    with warnings.catch_warnings(record=True) as caught:  # what the policy says about idle options, below
        warnings.simplefilter("always")
        try:
            out = replace(base, **{k: v for k, v in given.items() if k in takes})
        except ValueError as error:  # the policy names its option; the user typed the flag
            message = str(error)
            for key in given:
                message = message.replace(f"memory.{key}", f"--{key.replace('_', '-')}")
            raise ValueError(message) from None
    idle += [k for k in given if k in takes and k in out.unused_options()]
    for warning in caught if not idle else ():
        warnings.warn(warning.message, warning.category, stacklevel=2)
    if idle:
        flags = ", ".join(f"--{k.replace('_', '-')} {given[k]}" for k in idle)
        source = f"--memory {mode}" if mode is not None else "the recipe's memory settings"
        if isinstance(out, MemoryFree):
            state, how = "the memory is off", "--memory on, --memory sma or another policy that reads them"
        elif isinstance(out, NAM) and out.bank_size and all(k.startswith("sma_") for k in idle):
            state, how = "SMA is off", "--memory sma"
        else:
            state, how = f"the memory is {type(out).__name__}, which does not read them", "another --memory"
        raise ValueError(f"{flags}: no effect, {state} ({source}); drop them or pass {how}")
    return out


def load_generator(
    spec: BackboneSpec | None,
    checkpoint: str | None,
    checkpoint_key: str | None,
    dtype: torch.dtype,
    device: torch.device,
    trust_checkpoint: bool = False,
) -> CausalWanTransformer:
    """The causal generator: the checkpoint's weights (the architecture of `spec`, a config's generator,
    when given; else what the checkpoint records or its shapes say), or `spec` alone (its own weights,
    else random ones, with a warning). trust_checkpoint: see memflow_train.models.trust.

    checkpoint_key names an entry of `checkpoint`: without a checkpoint it is refused (ValueError), as is
    trust_checkpoint when nothing is loaded from a file. The spec's own weights, checkpoint_key and LoRA, which
    a checkpoint replaces, are named in an IgnoredSettingWarning."""
    if checkpoint is not None:
        if spec is not None:
            replaced = {k: getattr(spec, k) for k in ("weights", "checkpoint_key", "lora_weights")}
            replaced = {k: v for k, v in replaced.items() if v is not None}
            if replaced:
                named = ", ".join(f"{k} {v}" for k, v in replaced.items())
                warnings.warn(
                    f"--checkpoint {checkpoint} replaces the config generator's {named} (only its architecture "
                    "is used)",
                    IgnoredSettingWarning,
                    stacklevel=2,
                )
        config = spec.architecture() if spec is not None else None
        model = load_transformer(
            checkpoint, config, checkpoint_key=checkpoint_key, dtype=dtype, trust_checkpoint=trust_checkpoint
        )
    elif spec is not None:
        if checkpoint_key is not None:
            raise ValueError(
                f"--checkpoint-key {checkpoint_key} names an entry of --checkpoint, and no --checkpoint was given "
                "(the config's generator loads its own weights: set checkpoint_key in its spec instead)"
            )
        if trust_checkpoint:
            if spec.weights is None:
                raise ValueError("--trust-checkpoint: no checkpoint is loaded (no --checkpoint, no generator weights)")
            spec = replace(spec, trust_checkpoint=True)  # the permission applies to the weights the config names
        if spec.weights is None:
            warnings.warn("the config's generator has no weights: generating with random weights", stacklevel=2)
        model = cast_keeping_fp32(spec.build(), dtype)
    else:
        raise ValueError("pass --checkpoint and/or --config")
    return model.to(device).eval().requires_grad_(False)


def load_text_encoder(
    recipe: Recipe,
    path: str | None,
    tokenizer: str | None,
    text_len: int | None,
    dtype: torch.dtype | None,
    device: torch.device,
    default_dtype: torch.dtype = torch.float32,
) -> WanTextEncoder:
    """The text encoder of `path` (a Wan or UMT5 folder), else the recipe's (a config's text_encoder spec). The
    given tokenizer, text_len and dtype (None: the spec's, else default_dtype) apply on either path; a
    tokenizer folder for the recipe's tiny random encoder, which has its own, is refused."""
    if path is not None:
        spec_len = recipe.text_encoder.text_len if recipe.text_encoder is not None else 512
        length = spec_len if text_len is None else text_len
        encoder = WanTextEncoder.from_pretrained(path, tokenizer, length, dtype or default_dtype)
    elif recipe.text_encoder is not None:
        spec, changes = recipe.text_encoder, {}
        if text_len is not None:
            changes["text_len"] = text_len
        if tokenizer is not None:
            if spec.path is None:
                raise ValueError(
                    f"--tokenizer {tokenizer}: the config's text encoder is the tiny random one (tiny_d_model), "
                    "which has its own tokenizer; drop --tokenizer, or pass --text-encoder"
                )
            changes["tokenizer_path"] = tokenizer
        if dtype is not None:
            changes["dtype"] = str(dtype).removeprefix("torch.")
        encoder = replace(spec, **changes).build()
        if dtype is not None:
            encoder = encoder.to(dtype)  # the tiny encoder is built in float32 whatever the spec says
    else:
        raise ValueError("pass --text-encoder (a Wan folder with text_encoder/ and tokenizer/, or a UMT5 folder)")
    return encoder.to(device)


def load_vae(
    path: str | None, text_encoder_path: str | None, dtype: torch.dtype, device: torch.device
) -> VideoAutoencoder:
    """--vae, else the text encoder's folder when it holds vae/ too (a Wan diffusers folder, the demo data)."""
    if path is None and text_encoder_path is not None and (Path(text_encoder_path) / "vae").is_dir():
        path = text_encoder_path
    if path is None:
        raise ValueError("pass --vae (a Wan folder with vae/, or a VAE folder)")
    return load_autoencoder(path, dtype).to(device)


def parse_dtype(name: str | None, default: str) -> torch.dtype:
    return torch_dtype(name or default)
