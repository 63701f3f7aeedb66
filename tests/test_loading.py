"""Every weight format users arrive with loads into the backbone and reproduces the source model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from memflow_train.models.causal_wan import CausalWanTransformer
from memflow_train.models.loading import CheckpointMismatchError, load_transformer
from tests.wan_helpers import tiny_inputs, tiny_model, to_original_keys

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"]


@pytest.fixture
def source() -> CausalWanTransformer:
    return tiny_model()


def _same_output(a: torch.nn.Module, b: torch.nn.Module) -> float:
    x, t, text = tiny_inputs(frames=3)
    with torch.no_grad():
        return (a(x, t, text) - b(x, t, text)).abs().max().item()


def test_inverse_key_helper_roundtrips_through_diffusers_conversion(source) -> None:
    state = source.state_dict()
    converted = convert_wan_transformer_to_diffusers(to_original_keys(state))
    assert converted.keys() == state.keys()


def test_diffusers_folder(source, tmp_path: Path) -> None:
    source.save_pretrained(tmp_path / "transformer")
    assert _same_output(load_transformer(tmp_path / "transformer"), source) == 0.0
    # A pipeline folder (model_index.json + transformer/) is found too.
    (tmp_path / "model_index.json").write_text("{}")
    assert _same_output(load_transformer(tmp_path), source) == 0.0


def test_original_key_safetensors_file(source, tmp_path: Path) -> None:
    path = tmp_path / "wan_original.safetensors"
    save_file({k: v.contiguous() for k, v in to_original_keys(source.state_dict()).items()}, path)
    assert _same_output(load_transformer(path, "tiny"), source) == 0.0


def test_original_wan_release_folder(source, tmp_path: Path) -> None:
    cfg = source.config
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "WanModel",
                "model_type": "t2v",
                "dim": cfg.num_attention_heads * cfg.attention_head_dim,
                "num_heads": cfg.num_attention_heads,
                "ffn_dim": cfg.ffn_dim,
                "num_layers": cfg.num_layers,
                "in_dim": cfg.in_channels,
                "out_dim": cfg.out_channels,
                "freq_dim": cfg.freq_dim,
                "text_dim": cfg.text_dim,
                "eps": cfg.eps,
            }
        )
    )
    original = {k: v.contiguous() for k, v in to_original_keys(source.state_dict()).items()}
    keys = sorted(original)
    half = len(keys) // 2
    save_file({k: original[k] for k in keys[:half]}, tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_file({k: original[k] for k in keys[half:]}, tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors")
    assert _same_output(load_transformer(tmp_path), source) == 0.0


def test_longlive_style_checkpoint_prefers_ema(source, tmp_path: Path) -> None:
    ema = {f"model.{k}": v for k, v in to_original_keys(source.state_dict()).items()}
    # LongLive's EMA shadow keeps FSDP wrapper pieces in its names.
    ema = {
        k.replace("blocks.", "blocks._fsdp_wrapped_module.", 1) if "blocks.0." in k else k: v for k, v in ema.items()
    }
    other = {k: torch.zeros_like(v) for k, v in ema.items()}
    path = tmp_path / "model.pt"
    torch.save({"generator": other, "generator_ema": ema, "critic": other, "step": 700}, path)
    assert _same_output(load_transformer(path, "tiny"), source) == 0.0
    assert _same_output(load_transformer(path, "tiny", checkpoint_key="generator_ema"), source) == 0.0
    zeros = load_transformer(path, "tiny", checkpoint_key="generator")
    assert all(p.abs().sum() == 0 for p in zeros.parameters())
    with pytest.raises(KeyError, match="no tensor entry 'critic_ema'"):
        load_transformer(path, "tiny", checkpoint_key="critic_ema")


def _peft_lora_model(source: CausalWanTransformer, rank: int, alpha: int) -> torch.nn.Module:
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS)
    model = peft.get_peft_model(copy.deepcopy(source), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def _longlive_lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA state as LongLive saves it: PEFT names over the original Wan module names."""
    state = peft.get_peft_model_state_dict(model)
    prefix = "base_model.model."
    return {prefix + k: v for k, v in to_original_keys({k[len(prefix) :]: v for k, v in state.items()}).items()}


@pytest.mark.parametrize("alpha", [4, 8])
def test_lora_in_checkpoint_and_in_separate_file_merge_to_peft_output(source, tmp_path: Path, alpha: int) -> None:
    lora_model = _peft_lora_model(source, rank=4, alpha=alpha)
    lora_state = _longlive_lora_state(lora_model)
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in lora_state)
    base = {f"model.{k}": v for k, v in to_original_keys(source.state_dict()).items()}
    combined = tmp_path / "with_lora.pt"
    torch.save({"generator": base, "generator_lora": lora_state}, combined)
    assert _same_output(load_transformer(combined, "tiny", lora_alpha=alpha), lora_model) <= 1e-5

    base_path, lora_path = tmp_path / "base.pt", tmp_path / "lora.pt"
    torch.save({"generator": base}, base_path)
    torch.save({"generator_lora": lora_state, "critic_lora": lora_state}, lora_path)
    merged = load_transformer(base_path, "tiny", lora=lora_path, lora_alpha=alpha)
    assert _same_output(merged, lora_model) <= 1e-5
    assert _same_output(merged, source) > 1e-3  # the adapter really changed the model


def test_lora_only_file_is_refused_as_base(source, tmp_path: Path) -> None:
    lora_state = _longlive_lora_state(_peft_lora_model(source, rank=2, alpha=2))
    path = tmp_path / "lora.pt"
    torch.save({"generator_lora": lora_state}, path)
    with pytest.raises(ValueError, match="only a LoRA state"):
        load_transformer(path, "tiny")


def test_wrong_shapes_fail_with_key_list(source, tmp_path: Path) -> None:
    state = to_original_keys(source.state_dict())
    state["blocks.0.ffn.0.weight"] = torch.zeros(3, 3)
    state.pop("head.head.bias")
    state["blocks.0.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save({"generator_ema": {f"model.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_transformer(path, "tiny")
    assert err.value.missing == ["proj_out.bias"]
    assert err.value.unexpected == ["blocks.0.extra.weight"]
    assert err.value.mismatched == ["blocks.0.ffn.net.0.proj.weight: (32, 24) vs (3, 3)"]
    message = str(err.value)
    assert "proj_out.bias" in message and "blocks.0.extra.weight" in message and "(3, 3)" in message


def test_folder_with_wrong_shapes_lists_all_keys(source, tmp_path: Path) -> None:
    source.save_pretrained(tmp_path)
    state = dict(source.state_dict())
    state["proj_out.weight"] = torch.zeros(2, 2)
    del state["blocks.1.norm2.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        load_transformer(tmp_path)
    assert err.value.missing == ["blocks.1.norm2.weight"]
    assert err.value.mismatched == ["proj_out.weight: (16, 24) vs (2, 2)"]


def test_bf16_load_keeps_wan_fp32_modules(source, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), path)
    model = load_transformer(path, "tiny", dtype=torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].norm2.weight.dtype == torch.float32
    assert model.blocks[0].scale_shift_table.dtype == torch.float32
    assert model.condition_embedder.time_embedder.linear_2.weight.dtype == torch.float32


def test_missing_sources_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_transformer(tmp_path / "nope.pt", "tiny")
    with pytest.raises(FileNotFoundError, match="without config.json"):
        load_transformer(tmp_path, "tiny")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_transformer(tmp_path / "junk.pt", "tiny")
