"""One loader for the Wan transformer weights users arrive with.

Accepted sources:
- a diffusers folder (WanTransformer3DModel `save_pretrained`, or a pipeline folder with `transformer/`),
- an original-format Wan2.1 folder (`config.json` with dim/num_heads, original key names),
- a single weights file (.safetensors / .pt / .pth / .bin) in diffusers or original key names,
- a LongLive / Self-Forcing / MemFlow training checkpoint: a dict with `generator_ema`, `generator`
  or `model` entries whose keys carry the wrapper's `model.` prefix (and FSDP / compile
  wrapper pieces), optionally with a `generator_lora` PEFT state, or with LoRA in a second file,
- a memflow-train Lightning checkpoint (.ckpt file, or the directory DeepSpeed writes, whose
  ZeRO shards are consolidated): the generator (EMA weights when present) or another network by
  checkpoint_key, its LoRA adapters merged.

Original key names go through diffusers' own single-file conversion. Every source is checked
against the architecture before any weight is copied; a mismatch raises CheckpointMismatchError
listing the missing, unexpected and wrongly shaped keys.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file

from memflow_train.models.causal_wan import CausalWanTransformer, cast_keeping_fp32
from memflow_train.models.presets import wan_config
from memflow_train.models.trust import check_folder, load_client_state

# Entries of a training checkpoint that hold generator weights, in order of preference.
GENERATOR_KEYS = ("generator_ema", "generator", "model", "state_dict", "module")
LORA_KEYS = ("generator_lora", "lora")
# Name pieces added by wrappers (FSDP, activation checkpointing, torch.compile, DDP).
_WRAPPER_PIECES = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod|module)\.")
_MODEL_PREFIXES = ("base_model.model.", "model.diffusion_model.", "model.", "transformer.")


class CheckpointMismatchError(ValueError):
    """The weights do not fit the architecture; the message lists every offending key."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched

        def block(title: str, keys: list[str]) -> str:
            return f"\n  {title} ({len(keys)}):" + "".join(f"\n    {k}" for k in keys) if keys else ""

        super().__init__(
            f"weights from {source} do not match the Wan architecture:"
            + block("missing keys", missing)
            + block("unexpected keys", unexpected)
            + block("wrongly shaped keys (expected vs found)", mismatched)
        )


# ------------------------------------------------------------------------------------------ reading


def read_weights(path: str | Path) -> dict[str, Any]:
    """Load a .safetensors file or a torch pickle (tensors and plain containers only) on CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles with custom classes are refused by weights_only on purpose
        raise ValueError(f"cannot read {path} as a torch checkpoint of tensors: {err}") from err


def _is_tensor_dict(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def split_checkpoint(ckpt: dict[str, Any], key: str | None = None) -> tuple[dict, dict | None, float | None]:
    """Pick the generator weights, a LoRA state if present, and the LoRA alpha if recorded."""
    if "pytorch-lightning_version" in ckpt and isinstance(ckpt.get("state_dict"), dict):
        return _lightning_network(ckpt, key)
    lora = next((ckpt[k] for k in LORA_KEYS if _is_tensor_dict(ckpt.get(k))), None)
    if key is not None:
        if not _is_tensor_dict(ckpt.get(key)):
            raise KeyError(f"checkpoint has no tensor entry {key!r}; top-level keys: {sorted(ckpt)}")
        return ckpt[key], lora, None
    for k in GENERATOR_KEYS:
        if _is_tensor_dict(ckpt.get(k)):
            return ckpt[k], lora, None
    if _is_tensor_dict(ckpt):
        return ckpt, None, None
    if lora is not None:
        raise ValueError("checkpoint holds only a LoRA state: pass the base weights as source and this file as lora")
    raise ValueError(f"no generator weights found; top-level keys: {sorted(ckpt)}")


def _lightning_network(ckpt: dict[str, Any], key: str | None) -> tuple[dict, dict | None, float | None]:
    """split_checkpoint for a memflow-train Lightning checkpoint: key "generator" / "critic" / "model"
    (live weights) or "generator_ema" / "model_ema" (EMA required); default: the trained network, EMA if any."""
    nets = sorted({k.split(".", 1)[0] for k in ckpt["state_dict"]})
    net = key.removesuffix("_ema") if key else ("generator" if "generator" in nets else "model")
    return lightning_network(ckpt, net, None if key is None else key.endswith("_ema"))


class NoEmaWeightsWarning(UserWarning):
    """A checkpoint's EMA had not started (or was off): the live weights are used."""


def lightning_network(ckpt: dict[str, Any], net: str, ema: bool | None) -> tuple[dict, dict | None, float | None]:
    """Weights, LoRA state and alpha of network `net` of a memflow-train Lightning checkpoint.

    ema: True requires the EMA weights (KeyError when the checkpoint has none, e.g. saved before
    ema_start_step); False takes the live weights; None takes the EMA when there is one and
    otherwise warns (NoEmaWeightsWarning) and takes the live weights.
    """
    state = ckpt["state_dict"]
    nets = sorted({k.split(".", 1)[0] for k in state})
    if net not in nets:
        raise KeyError(f"checkpoint has no network {net!r}; it holds {nets}")
    weights = {k[len(net) + 1 :]: v for k, v in state.items() if k.startswith(net + ".")}
    ema_state = ckpt.get(f"{net}_ema")
    shadow = ema_state.get("shadow") if isinstance(ema_state, dict) else None
    if ema is not False and not shadow:
        why = (
            "EMA was off in this run"
            if ema_state is None
            else f"EMA starts at step {ema_state.get('start_update')}, the checkpoint is at step {ckpt.get('global_step')}"
        )
        if ema:
            raise KeyError(
                f"checkpoint has no {net}_ema weights ({why}); use the live weights instead "
                f"(export --live-weights, checkpoint_key / --checkpoint-key {net})"
            )
        warnings.warn(
            f"checkpoint has no {net}_ema weights ({why}): using the live {net} weights",
            NoEmaWeightsWarning,
            stacklevel=3,
        )
    elif ema is not False:
        weights.update(shadow)
    lora = {k: weights.pop(k) for k in [k for k in weights if ".lora_" in k]}
    spec = (ckpt.get("hyper_parameters") or {}).get(f"{net}_lora") or (ckpt.get("hyper_parameters") or {}).get("lora")
    alpha = (spec.get("alpha") or spec.get("rank")) if isinstance(spec, dict) else None
    return weights, lora or None, alpha


def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper pieces and the wrapper's model prefix; convert original Wan names to diffusers names."""
    out = {}
    for name, tensor in state.items():
        name = _WRAPPER_PIECES.sub(r"\1", name)
        for prefix in _MODEL_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        out[name.replace(".default.", ".").replace(".base_layer.", ".")] = tensor  # PEFT adapter pieces
    if any(k.startswith("head.") or ".self_attn." in k or ".cross_attn." in k for k in out):
        out = convert_wan_transformer_to_diffusers(out)
    return out


def is_deepspeed_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint directory as Lightning writes it (`latest` + the tag folder)."""
    return path.is_dir() and (path / "latest").is_file()


def deepspeed_client_state(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """The Lightning client state (hyperparameters, EMA, loops, ...) rank 0 saved in a DeepSpeed folder. The
    rank-0 model-states file's name tells the ZeRO stage: no optimizer-state file is read for it."""
    from lightning.pytorch.utilities.deepspeed import ds_checkpoint_dir

    folder = Path(ds_checkpoint_dir(str(path)))
    names = ("zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt")
    client_file = next((folder / n for n in names if (folder / n).is_file()), None)
    if client_file is None:
        raise FileNotFoundError(f"{folder} has no rank-0 model-states file: not a DeepSpeed checkpoint")
    return load_client_state(client_file, trust)


def read_deepspeed_checkpoint(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """Consolidate a (ZeRO-sharded) DeepSpeed checkpoint directory into one Lightning-style dict.

    fp32 weights gathered from every rank's partitions under "state_dict" (frozen parameters the
    run excluded are absent), plus the Lightning client state saved by rank 0 (hyperparameters,
    EMA, loops, ...). Nothing is written to disk. Every file is proven safe to unpickle first
    (memflow_train.models.trust); UntrustedCheckpointError unless trust.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(path)
    check_folder(path, trust)
    state = get_fp32_state_dict_from_zero_checkpoint(str(path))
    client = deepspeed_client_state(path, trust)
    engine_keys = {"module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps", "global_steps",
                   "dp_world_size", "mp_world_size", "buffer_names", "param_shapes", "frozen_param_shapes",
                   "shared_params", "frozen_param_fragments", "ds_config", "ds_version"}  # fmt: skip
    checkpoint = {k: v for k, v in client.items() if k not in engine_keys}
    checkpoint["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    return checkpoint


# ------------------------------------------------------------------------------------------ LoRA


def merge_lora(
    state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """Fold PEFT LoRA pairs into the base weights: W + (alpha / r) * B @ A.

    PEFT state dicts do not store alpha; LongLive and MemFlow train with alpha = rank (scale 1),
    which is the default here.
    """
    lora = normalize_keys(lora)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in lora.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if m is None:
            raise ValueError(f"unsupported LoRA entry {name!r}: only lora_A/lora_B weights of Linear layers merge")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    merged = dict(state)
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA for {module} lacks its lora_{'B' if 'A' in ab else 'A'} weight")
        target = f"{module}.weight"
        if target not in merged:
            raise CheckpointMismatchError("the LoRA state", [], [f"{module}.lora_A.weight (no base {target})"], [])
        a, b = ab["A"].float(), ab["B"].float()
        scale = (alpha if alpha is not None else a.shape[0]) / a.shape[0]
        w = merged[target]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise CheckpointMismatchError(
                "the LoRA state", [], [], [f"{module}: base {tuple(w.shape)} vs B@A {(b.shape[0], a.shape[1])}"]
            )
        merged[target] = (w.float() + scale * (b @ a)).to(w.dtype)
    return merged


# ------------------------------------------------------------------------------------------ checks


def check_state_dict(model: torch.nn.Module, shapes: dict[str, torch.Size], source: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    ignored = tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(k for k in set(shapes) - set(expected) if not any(p in k for p in ignored))
    mismatched = sorted(
        f"{k}: {tuple(expected[k])} vs {tuple(shapes[k])}"
        for k in set(expected) & set(shapes)
        if tuple(expected[k]) != tuple(shapes[k])
    )
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)


def infer_wan_config(state: dict[str, torch.Tensor], attention_head_dim: int = 128) -> dict[str, Any]:
    """Architecture from diffusers-named weights (head dim is not recoverable from shapes: Wan uses 128)."""
    try:
        patch = state["patch_embedding.weight"]
        if patch.shape[0] % attention_head_dim:
            raise ValueError(
                f"model width {patch.shape[0]} is not a multiple of head dim {attention_head_dim}: pass config explicitly"
            )
        blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
        dim = patch.shape[0]
        return wan_config(
            "wan2.1-t2v-1.3b",
            patch_size=tuple(patch.shape[2:]),
            in_channels=patch.shape[1],
            out_channels=state["proj_out.weight"].shape[0] // patch.shape[2:].numel(),
            text_dim=state["condition_embedder.text_embedder.linear_1.weight"].shape[1],
            freq_dim=state["condition_embedder.time_embedder.linear_1.weight"].shape[1],
            ffn_dim=state["blocks.0.ffn.net.0.proj.weight"].shape[0],
            num_layers=max(blocks) + 1,
            num_attention_heads=dim // attention_head_dim,
            attention_head_dim=attention_head_dim,
            cross_attn_norm="blocks.0.norm2.weight" in state,
        )
    except KeyError as err:
        raise ValueError(f"cannot infer the Wan architecture: weights lack {err}; pass config explicitly") from err


def _recorded_architecture(ckpt: dict[str, Any], key: str | None) -> dict[str, Any] | None:
    """The architecture a memflow-train checkpoint's hyperparameters name (preset + overrides)."""
    hparams = ckpt.get("hyper_parameters") if "pytorch-lightning_version" in ckpt else None
    if not isinstance(hparams, dict):
        return None
    net = key.removesuffix("_ema") if key else ("generator" if "generator" in hparams else "model")
    spec = hparams.get(net) or (hparams.get("teacher") if net == "critic" else None)
    if not isinstance(spec, dict):
        return None
    if spec.get("weights") is not None and spec.get("preset") is None and not spec.get("config"):
        return None  # weights from a path alone: that source defined the architecture; infer it from shapes
    return wan_config(spec.get("preset"), **(spec.get("config") or {}))  # as BackboneSpec.build built it


def _original_folder_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Translate an original Wan2.1 config.json (WanModel) into diffusers' config keys."""
    if cfg.get("model_type", "t2v") != "t2v":
        raise NotImplementedError(f"only text-to-video Wan is supported, not model_type={cfg['model_type']!r}")
    return wan_config(
        "wan2.1-t2v-1.3b",
        num_attention_heads=cfg["num_heads"],
        attention_head_dim=cfg["dim"] // cfg["num_heads"],
        ffn_dim=cfg["ffn_dim"],
        num_layers=cfg["num_layers"],
        in_channels=cfg.get("in_dim", 16),
        out_channels=cfg.get("out_dim", 16),
        freq_dim=cfg.get("freq_dim", 256),
        text_dim=cfg.get("text_dim", 4096),
        eps=cfg.get("eps", 1e-6),
    )


# ------------------------------------------------------------------------------------------ loading


def _from_state(
    state: dict[str, torch.Tensor], config: dict[str, Any], source: str, dtype: torch.dtype | None
) -> CausalWanTransformer:
    with torch.device("meta"):
        model = CausalWanTransformer(**config)
    check_state_dict(model, {k: v.shape for k, v in state.items()}, source)
    expected = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
    return cast_keeping_fp32(model, dtype if dtype is not None else torch.float32)


def _folder_shapes(folder: Path) -> dict[str, torch.Size]:
    shapes = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[k] = torch.Size(sf.get_slice(k).get_shape())
    return shapes


def _recorded_file_config(path: Path) -> dict[str, Any] | None:
    """The architecture `memflow_train.export --format safetensors` stores in the file's metadata."""
    if path.suffix != ".safetensors":
        return None
    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get("memflow_train_config")
    return json.loads(raw) if raw else None


def _from_checkpoint(
    ckpt: dict[str, Any],
    source: Path,
    config: dict[str, Any] | None,
    checkpoint_key: str | None,
    lora_alpha: float | None,
    dtype: torch.dtype | None,
) -> CausalWanTransformer:
    state, lora_state, recorded_alpha = split_checkpoint(ckpt, checkpoint_key)
    state = normalize_keys(state)
    if lora_state is not None:
        state = merge_lora(state, lora_state, lora_alpha if lora_alpha is not None else recorded_alpha)
    config = config or _recorded_architecture(ckpt, checkpoint_key) or _recorded_file_config(source)
    return _from_state(state, config or infer_wan_config(state), str(source), dtype)


def load_transformer(
    source: str | Path,
    config: dict[str, Any] | str | None = None,
    *,
    checkpoint_key: str | None = None,
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
    dtype: torch.dtype | None = None,
    trust_checkpoint: bool = False,
) -> CausalWanTransformer:
    """Build a CausalWanTransformer from any supported weight source (see module docstring).

    Torch pickles load with weights_only=True; a DeepSpeed folder whose files hold other objects is
    refused (memflow_train.models.trust.UntrustedCheckpointError) unless trust_checkpoint.

    config: architecture (a preset name or diffusers config keys) for single files; folders
    carry their own. Without it, a file's architecture is inferred from its shapes.
    checkpoint_key: which entry of a training checkpoint to use (default: generator_ema,
    then generator, then model). lora: a LoRA state file to merge (a `generator_lora` entry of
    the checkpoint itself is merged too); lora_alpha defaults to the rank (scale 1).
    """
    source = Path(source)
    if isinstance(config, str):
        config = wan_config(config)
    if is_deepspeed_checkpoint(source):
        ckpt = read_deepspeed_checkpoint(source, trust_checkpoint)
        model = _from_checkpoint(ckpt, source, config, checkpoint_key, lora_alpha, dtype)
    elif source.is_dir():
        folder = source / "transformer" if (source / "transformer" / "config.json").is_file() else source
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{source} is a folder without config.json (or transformer/config.json)")
        folder_cfg = json.loads((folder / "config.json").read_text())
        if "num_heads" in folder_cfg and "dim" in folder_cfg:  # original Wan2.1 release folder
            state: dict[str, torch.Tensor] = {}
            for f in sorted(folder.glob("*.safetensors")):
                state.update(load_file(f))
            model = _from_state(normalize_keys(state), _original_folder_config(folder_cfg), str(folder), dtype)
        else:
            with torch.device("meta"):
                skeleton = CausalWanTransformer.from_config(CausalWanTransformer.load_config(folder))
            check_state_dict(skeleton, _folder_shapes(folder), str(folder))
            model = CausalWanTransformer.from_pretrained(folder, torch_dtype=dtype or torch.float32)
    else:
        model = _from_checkpoint(read_weights(source), source, config, checkpoint_key, lora_alpha, dtype)
    if lora is not None:
        extra = read_weights(lora)
        extra = next((extra[k] for k in LORA_KEYS if _is_tensor_dict(extra.get(k))), extra)
        merged = merge_lora(dict(model.state_dict()), extra, lora_alpha)
        model.load_state_dict(merged, strict=True)
    return model
