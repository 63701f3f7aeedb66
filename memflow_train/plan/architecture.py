"""A network's architecture from its config, without reading any weight data.

Mirrors where `BackboneSpec.build` would take the shapes from: a training checkpoint's recorded spec, a
weights folder's config.json, a single file's recorded config, header shapes or the configured preset.
When the weights path cannot be read here (the recipes name /path/to/... files), the configured preset
is used, else a preset whose size appears in the path's name (e.g. "14B" in Wan2.1-T2V-14B-Diffusers);
every such assumption is said in the plan.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from memflow_train.models.causal_wan import CausalWanTransformer
from memflow_train.models.loading import _original_folder_config, infer_wan_config, is_deepspeed_checkpoint
from memflow_train.models.presets import WAN_PRESETS, wan_config

WAN_KEYS = [k for k in inspect.signature(CausalWanTransformer.__init__).parameters if k != "self"]


def _describe(preset: str | None, config: dict[str, Any]) -> str:
    arch = wan_config(preset, **config)
    size = (
        f"{arch.get('num_layers')} blocks, {arch.get('num_attention_heads')} x {arch.get('attention_head_dim')} heads"
    )
    return f"{preset or 'config'}{' + overrides' if config and preset else ''} ({size})"


def _folder_config(folder: Path) -> dict[str, Any] | None:
    folder = folder / "transformer" if (folder / "transformer" / "config.json").is_file() else folder
    if not (folder / "config.json").is_file():
        return None
    raw = json.loads((folder / "config.json").read_text())
    if "num_heads" in raw and "dim" in raw:
        return _original_folder_config(raw)
    return {k: v for k, v in raw.items() if k in WAN_KEYS}


def _file_config(path: Path) -> dict[str, Any] | None:
    """A safetensors file's recorded config, else its architecture from header shapes (no data read)."""
    if path.suffix != ".safetensors":
        return None
    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get("memflow_train_config")
        if raw:
            return json.loads(raw)
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
    return infer_wan_config(shapes)


def _recorded_spec(path: Path, checkpoint_key: str | None) -> dict[str, Any] | None:
    """The network spec a memflow-train training checkpoint records (hyperparameters only)."""
    from memflow_train.models.loading import deepspeed_client_state
    from memflow_train.models.trust import safe_load

    ckpt = deepspeed_client_state(path) if is_deepspeed_checkpoint(path) else safe_load(path, mmap=True)
    hparams = ckpt.get("hyper_parameters") or {}
    network = checkpoint_key.removesuffix("_ema") if checkpoint_key else None
    network = network or ("generator" if "generator" in hparams else "model")
    spec = hparams.get(network) or (hparams.get("teacher") if network == "critic" else None)
    return spec if isinstance(spec, dict) else None


def _preset_in_name(path: str) -> str | None:
    """The preset whose size tag (its name's last part, e.g. 14b) appears in the path, if exactly one does."""
    name = path.lower().replace("_", "-")
    found = [p for p in WAN_PRESETS if "-" in p and p.rsplit("-", 1)[1] in name]
    return found[0] if len(found) == 1 else None


def resolve_backbone(name: str, spec: dict[str, Any], depth: int = 2) -> tuple[dict[str, Any], str]:
    """A BackboneSpec dict without weights (random meta initialisation of the same shapes) and how its
    architecture was found. Raises ValueError when nothing tells the architecture."""
    preset, overrides, weights = spec.get("preset"), dict(spec.get("config") or {}), spec.get("weights")
    plain = {**spec, "weights": None, "lora_weights": None, "checkpoint_key": None, "trust_checkpoint": False}
    if weights is None:
        return plain, f"{name}: {_describe(preset, overrides)}, random weights"
    path = Path(weights)
    if path.exists():
        if (path.is_file() and path.suffix == ".ckpt") or is_deepspeed_checkpoint(path):
            recorded = _recorded_spec(path, spec.get("checkpoint_key"))
            if recorded is not None and depth:
                inner, how = resolve_backbone(name, {**recorded, "dtype": spec.get("dtype", "float32")}, depth - 1)
                return inner, f"{how} (recorded in {weights})"
        found = _folder_config(path) if path.is_dir() else None
        if found is None and path.is_file() and not (preset or overrides):
            found = _file_config(path)
        if found is not None:
            return {**plain, "preset": None, "config": found}, f"{name}: {_describe(None, found)}, from {weights}"
    if preset or overrides:
        why = "not readable here" if not path.exists() else "a weights file"
        return plain, f"{name}: {_describe(preset, overrides)} (weights {weights}: {why}; shapes from the config)"
    guessed = _preset_in_name(str(weights))
    if guessed is None:
        raise ValueError(
            f"{name}.weights {weights}: cannot read its architecture here and no preset is given; set "
            f"--model.init_args.{name}.preset (one of {sorted(WAN_PRESETS)})"
        )
    return (
        {**plain, "preset": guessed},
        f"{name}: {_describe(guessed, {})} ASSUMED from the path name ({weights} is not readable here; "
        f"set {name}.preset to choose another)",
    )


def text_encoder_parameters(spec: dict[str, Any] | None) -> tuple[int, int, str]:
    """(parameters, bytes per parameter, note) of a TextEncoderSpec, from its config (no weights read);
    parameters 0 when its config cannot be read here."""
    if spec is None:
        return 0, 0, "none configured"
    from transformers import UMT5Config, UMT5EncoderModel

    from memflow_train.methods.specs import torch_dtype
    from memflow_train.models.text_encoder import WanTextEncoder
    from memflow_train.plan.functions import meta_parameters

    size = torch.empty((), dtype=torch_dtype(spec.get("dtype", "bfloat16"))).element_size()
    if spec.get("tiny_d_model"):
        with meta_parameters():
            encoder = WanTextEncoder.tiny(d_model=spec["tiny_d_model"], text_len=spec.get("text_len", 512)).encoder
        return sum(p.numel() for p in encoder.parameters()), size, f"tiny UMT5 (d_model {spec['tiny_d_model']})"
    folder = Path(spec["path"])
    folder = folder / "text_encoder" if (folder / "text_encoder" / "config.json").is_file() else folder
    if not (folder / "config.json").is_file():
        return 0, size, f"{spec['path']} has no config.json here: its size is unknown and NOT counted"
    with meta_parameters():
        encoder = UMT5EncoderModel(UMT5Config.from_pretrained(folder, local_files_only=True))
    return sum(p.numel() for p in encoder.parameters()), size, f"UMT5 from {folder / 'config.json'}"


def meta_text_encoder(spec: Any) -> Any:
    """A WanTextEncoder with meta weights of the configured architecture (TextEncoderSpec; no weight read)
    and its real tokenizer, for a trace in which the data carries no text embeddings. Raises
    FileNotFoundError when the encoder's config or tokenizer cannot be read here."""
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from memflow_train.methods.specs import torch_dtype
    from memflow_train.models.text_encoder import WanTextEncoder
    from memflow_train.plan.functions import meta_parameters

    if spec.tiny_d_model is not None:
        with meta_parameters():
            return spec.build()
    folder = Path(spec.path)
    encoder_dir = folder / "text_encoder" if (folder / "text_encoder" / "config.json").is_file() else folder
    tokenizer_dir = spec.tokenizer_path or (folder / "tokenizer" if (folder / "tokenizer").is_dir() else encoder_dir)
    if not (encoder_dir / "config.json").is_file():
        raise FileNotFoundError(f"text_encoder {spec.path}: no config.json here, so the encoder cannot be planned")
    with meta_parameters():
        encoder = UMT5EncoderModel(UMT5Config.from_pretrained(encoder_dir, local_files_only=True))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return WanTextEncoder(encoder.to(torch_dtype(spec.dtype)), tokenizer, spec.text_len)
