"""YAML-facing specifications of the networks and optimizers a training method builds."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memflow_train.checks import number, whole
from memflow_train.models.causal_wan import CausalWanTransformer, cast_keeping_fp32
from memflow_train.models.loading import load_transformer
from memflow_train.models.presets import wan_config
from memflow_train.models.text_encoder import WanTextEncoder


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (use float32, bfloat16 or float16)")
    return dtype


# The numeric keys of a Wan transformer config (CausalWanTransformer's arguments) and their smallest value.
WAN_COUNTS = {
    "num_attention_heads": 1, "attention_head_dim": 6, "in_channels": 1, "out_channels": 1, "text_dim": 1,
    "freq_dim": 1, "ffn_dim": 1, "num_layers": 1, "rope_max_seq_len": 1,
}  # fmt: skip


def check_wan_config(config: dict[str, Any], name: str = "config") -> None:
    """A backbone's config overrides: known keys, whole numbers where the model needs them, finite and in range;
    ValueError naming the key otherwise."""
    if not isinstance(config, dict):
        raise ValueError(f"{name} must be a mapping of Wan config keys, got {config!r}")
    known = [k for k in inspect.signature(CausalWanTransformer.__init__).parameters if k != "self"]
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"{name}: unknown Wan config keys {unknown}; known: {known}")
    for key, low in WAN_COUNTS.items():
        if config.get(key) is not None:
            whole(f"{name}.{key}", config[key], low=low)
    head_dim = config.get("attention_head_dim")
    if head_dim is not None and head_dim % 2:
        raise ValueError(
            f"{name}.attention_head_dim must be even (RoPE rotates pairs over frames, height and width), got {head_dim}"
        )
    if "eps" in config:
        number(f"{name}.eps", config["eps"], low=0, low_open=True)
    if "patch_size" in config:
        patch = config["patch_size"]
        if not isinstance(patch, list | tuple) or len(patch) != 3:
            raise ValueError(f"{name}.patch_size must be (frames, height, width), got {patch!r}")
        for side in patch:
            whole(f"{name}.patch_size", side, low=1)
    if "cross_attn_norm" in config and not isinstance(config["cross_attn_norm"], bool):
        raise ValueError(f"{name}.cross_attn_norm must be true or false, got {config['cross_attn_norm']!r}")


@dataclass(frozen=True)
class BackboneSpec:
    """A Wan transformer: a preset (+ overrides) with random weights, or weights from a local path.

    weights accepts everything load_transformer does (diffusers or original Wan folders, single
    files, LongLive / Self-Forcing / MemFlow checkpoints) and our own training checkpoints (.ckpt
    files or DeepSpeed directories; checkpoint_key: generator, critic, model, +"_ema"; default: the
    trained network's EMA weights).
    """

    preset: str | None = "tiny"
    config: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    checkpoint_key: str | None = None
    lora_weights: str | None = None
    lora_alpha: float | None = None
    dtype: str = "float32"
    seed: int = 0
    trust_checkpoint: bool = False  # accept checkpoint files that could run code (memflow_train.models.trust)

    def __post_init__(self) -> None:
        torch_dtype(self.dtype)
        whole("seed", self.seed, low=0)
        if self.lora_alpha is not None:
            number("lora_alpha", self.lora_alpha, low=0, low_open=True)
        check_wan_config(self.config)

    def architecture(self) -> dict[str, Any]:
        return wan_config(self.preset, **self.config)

    def build(self) -> CausalWanTransformer:
        dtype = torch_dtype(self.dtype)
        if self.weights is not None:
            from memflow_train.methods.checkpoints import is_training_checkpoint, load_trained_network

            if is_training_checkpoint(self.weights):  # one of our runs: its recorded spec completes frozen weights
                key = self.checkpoint_key
                network = key.removesuffix("_ema") if key else None
                ema = None if key is None else key.endswith("_ema")
                return load_trained_network(self.weights, network, ema=ema, dtype=dtype, trust=self.trust_checkpoint)
            config = self.architecture() if (self.preset or self.config) else None
            return load_transformer(
                self.weights,
                config,
                checkpoint_key=self.checkpoint_key,
                lora=self.lora_weights,
                lora_alpha=self.lora_alpha,
                dtype=dtype,
                trust_checkpoint=self.trust_checkpoint,
            )
        if self.lora_weights is not None:
            raise ValueError("lora_weights need base weights: set weights too")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = CausalWanTransformer(**self.architecture())
        return cast_keeping_fp32(model, dtype)


@dataclass(frozen=True)
class TextEncoderSpec:
    """UMT5 from a local folder, or a tiny random encoder (tiny_d_model) for tests and the demo."""

    path: str | None = None
    tokenizer_path: str | None = None
    tiny_d_model: int | None = None
    text_len: int = 512
    dtype: str = "bfloat16"
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.path is None) == (self.tiny_d_model is None):
            raise ValueError("text_encoder: set exactly one of path (real UMT5) and tiny_d_model (random tiny)")
        whole("text_encoder.text_len", self.text_len, low=1)
        if self.tiny_d_model is not None:
            whole("text_encoder.tiny_d_model", self.tiny_d_model, low=1)
        whole("text_encoder.seed", self.seed, low=0)
        torch_dtype(self.dtype)

    def width(self) -> int:
        """The embedding width, read from the encoder's config.json without loading its weights."""
        if self.tiny_d_model is not None:
            return self.tiny_d_model
        folder = Path(self.path)
        config = folder / "text_encoder" / "config.json"
        config = config if config.is_file() else folder / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"text_encoder: no UMT5 config.json at {self.path} (or its text_encoder/)")
        return int(json.loads(config.read_text())["d_model"])

    def build(self) -> WanTextEncoder:
        if self.path is not None:
            return WanTextEncoder.from_pretrained(
                self.path, self.tokenizer_path, self.text_len, torch_dtype(self.dtype)
            )
        tiny = WanTextEncoder.tiny(d_model=self.tiny_d_model, text_len=self.text_len, seed=self.seed)
        return tiny.to(torch_dtype(self.dtype))  # the dtype a real encoder would load in


class OnDemandTextEncoder:
    """The text encoder, built the first time a batch comes without precomputed embeddings.

    Runs on precomputed shards never load it. Not a registered submodule: it is frozen, and stays
    out of checkpoints, optimizers and DeepSpeed's engine.
    """

    def __init__(self, spec: TextEncoderSpec) -> None:
        self.spec = spec
        self.width = spec.width()
        self._encoder: WanTextEncoder | None = None

    def __call__(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._encoder is None:
            self._encoder = self.spec.build().to(device)
        return self._encoder(prompts)


@dataclass(frozen=True)
class OptimizerSpec:
    """One network's AdamW and its schedule: linear warmup over its own updates, then constant."""

    lr: float = 2e-6
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float | None = 10.0
    warmup_updates: int = 0

    def __post_init__(self) -> None:
        number("optimizer.lr", self.lr, low=0, low_open=True)
        if len(self.betas) != 2:
            raise ValueError(f"optimizer.betas must be two numbers, got {self.betas}")
        for beta in self.betas:
            number("optimizer.betas", beta, low=0, high=1, high_open=True)
        number("optimizer.weight_decay", self.weight_decay, low=0)
        number("optimizer.eps", self.eps, low=0, low_open=True)
        if self.grad_clip is not None:
            number("optimizer.grad_clip (positive, or null for none)", self.grad_clip, low=0, low_open=True)
        whole("optimizer.warmup_updates", self.warmup_updates, low=0)

    def lr_factor(self, updates: int) -> float:
        return min(1.0, (updates + 1) / self.warmup_updates) if self.warmup_updates > 0 else 1.0


@dataclass(frozen=True)
class LoraSpec:
    """PEFT LoRA on the named Linear layers of every block (default: all attention and FFN linears)."""

    rank: int = 256
    alpha: float | None = None  # None: alpha = rank (scale 1), as LongLive and MemFlow train
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2")

    def __post_init__(self) -> None:
        whole("lora.rank", self.rank, low=1)
        if self.alpha is not None:
            number("lora.alpha", self.alpha, low=0, low_open=True)
        number("lora.dropout", self.dropout, low=0, high=1, high_open=True)


def check_method_numbers(
    *,
    timestep_shift: float,
    context_timestep: float,
    ema_decay: float | None,
    ema_start_step: int,
    seed: int,
    num_frames: int | None = None,
    latent_size: tuple[int, int] | None = None,
) -> None:
    """The numeric init arguments every method shares: finite and in range, named when not."""
    number("timestep_shift", timestep_shift, low=0, low_open=True)
    number("context_timestep", context_timestep, low=0, high=1000)
    if ema_decay is not None:
        number("ema_decay (null for no EMA)", ema_decay, low=0, high=1, low_open=True, high_open=True)
    whole("ema_start_step", ema_start_step, low=0)
    whole("seed", seed, low=0)
    if num_frames is not None:
        whole("num_frames", num_frames, low=1)
    if latent_size is not None:
        if len(latent_size) != 2:
            raise ValueError(f"latent_size must be (height, width), got {latent_size}")
        for side in latent_size:
            whole("latent_size", side, low=1)
