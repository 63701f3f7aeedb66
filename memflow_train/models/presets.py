"""Named Wan transformer architectures (diffusers WanTransformer3DModel config keys)."""

from __future__ import annotations

from typing import Any

_WAN21_COMMON: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

WAN_PRESETS: dict[str, dict[str, Any]] = {
    # Published Wan2.1-T2V configs (Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers transformer/config.json).
    "wan2.1-t2v-1.3b": {**_WAN21_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "wan2.1-t2v-14b": {**_WAN21_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
    # The synthetic permanence world (data.synthetic.permanence_data): 64-channel patch latents of 64x64 px
    # frames (16 tokens a frame of 2x2x64 = 256 values), a 32-wide word-level text encoder; 3 M parameters.
    # The width is the token's 256 values: a narrower model cannot pass a token's noise through to the flow
    # it predicts (its input and output projections would have lower rank), and its samples keep that noise.
    "world": {
        **_WAN21_COMMON,
        "num_attention_heads": 4,
        "attention_head_dim": 64,
        "in_channels": 64,
        "out_channels": 64,
        "text_dim": 32,
        "freq_dim": 64,
        "ffn_dim": 512,
        "num_layers": 3,
    },
    # Tests and the CPU demo: same structure, a few thousand parameters.
    "tiny": {
        **_WAN21_COMMON,
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 4,
        "out_channels": 4,
        "text_dim": 16,
        "freq_dim": 16,
        "ffn_dim": 32,
        "num_layers": 2,
    },
}


def wan_config(preset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """A preset's config with overrides applied (e.g. num_layers=2 for a CPU benchmark)."""
    if preset is None:
        config: dict[str, Any] = {}
    elif preset in WAN_PRESETS:
        config = dict(WAN_PRESETS[preset])
    else:
        raise ValueError(f"unknown Wan preset {preset!r}; known: {sorted(WAN_PRESETS)}")
    config.update(overrides)
    return config
