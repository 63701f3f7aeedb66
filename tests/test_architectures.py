"""The named presets have exactly the parameters of diffusers' Wan2.1 models (built on the meta device)."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from memflow_train.models.causal_wan import CausalWanTransformer
from memflow_train.models.presets import WAN_PRESETS, wan_config

# transformer/config.json of Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers, as published.
_PUBLISHED_COMMON = {
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
PUBLISHED = {
    "wan2.1-t2v-1.3b": {**_PUBLISHED_COMMON, "ffn_dim": 8960, "num_attention_heads": 12, "num_layers": 30},
    "wan2.1-t2v-14b": {**_PUBLISHED_COMMON, "ffn_dim": 13824, "num_attention_heads": 40, "num_layers": 40},
}


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_matches_published_diffusers_model(preset: str) -> None:
    with torch.device("meta"):
        reference = WanTransformer3DModel(**PUBLISHED[preset])
        ours = CausalWanTransformer(**wan_config(preset))
    assert _shapes(ours) == _shapes(reference)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in reference.named_parameters()]
    expected_billions = {"wan2.1-t2v-1.3b": 1.42, "wan2.1-t2v-14b": 14.29}[preset]
    assert round(count / 1e9, 2) == expected_billions


def test_published_config_dict_builds_our_model_directly() -> None:
    """A diffusers config.json feeds our constructor unchanged (this is what from_pretrained does)."""
    with torch.device("meta"):
        model = CausalWanTransformer(**PUBLISHED["wan2.1-t2v-1.3b"])
    assert model.config.num_layers == 30


def test_unknown_preset_is_named() -> None:
    with pytest.raises(ValueError, match="unknown Wan preset 'wan9'"):
        wan_config("wan9")
    assert set(WAN_PRESETS) >= {"tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"}
