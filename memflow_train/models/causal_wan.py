"""Causal streaming Wan2.1 transformer.

Parameter names and shapes are exactly those of diffusers' WanTransformer3DModel (the blocks
reuse its attention, feed-forward and norm modules), so diffusers folders load with
`from_pretrained` and state dicts move between the two without renaming. What differs is the
forward: per-frame timesteps, RoPE at absolute frame indices, and three self-attention
patterns over the same weights:

- bidirectional full sequence (teacher, critic),
- block-causal full sequence with sink + local window (generator training without cache),
- streaming: one chunk at a time against a per-layer KV cache (generation, self-forcing).

Full-sequence forwards take one prompt per sample, or several with the prompt of every frame
(`FramePrompts`: a narrative whose prompt switches inside the sequence); each frame's queries
cross-attend to its own prompt.

Every forward returns the flow. With prediction_type "sample" the network predicts the clean
latents and the forward converts them (JiT's x-prediction: a network narrower than its tokens
cannot reproduce their noise, which a flow prediction must carry). With "preconditioned" the
network's output is mixed with its input by EDM's preconditioning (Karras et al. 2022): the input
carries the noise, the network predicts a target of unit variance at every noise level. The
conversions live in memflow_train.models.prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanAttention, WanTimeTextImageEmbedding
from torch.utils.checkpoint import checkpoint

from memflow_train.memory.kv_cache import StreamingKVCache
from memflow_train.memory.policy import MemoryPolicy
from memflow_train.memory.relevance import TextKeys
from memflow_train.memory.window import AttentionWindow
from memflow_train.models.attention import get_attention_backend, sdpa_attention
from memflow_train.models.prediction import check_prediction, flow_of_preconditioned, flow_of_sample
from memflow_train.models.rope import WanRope3D, apply_rotary

# attend(q, k, v) -> out for the current call's self-attention, heads-first tensors.
SelfAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TextContext:
    """Cross-attention keys/values of one prompt (batch), per layer, computed once and reused.

    mask marks real (non-padding) text tokens; Wan itself attends to all tokens, the memory
    uses the mask to score frames against the prompt.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor | None = None

    def layer(self, i: int) -> TextKeys:
        return TextKeys(self.keys[i], self.mask)

    def for_layer(self, i: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K/V (B, H, L, D) of layer i, shared by every frame."""
        return self.keys[i], self.values[i]


@dataclass
class FramePrompts:
    """Text encoder states of several prompts per sample and the prompt conditioning each frame.

    embeds (B, P, L, text_dim), mask (B, P, L) (real tokens), frame_prompt (B, F) long in [0, P): the prompt
    slot of every frame of the sequence the forward sees."""

    embeds: torch.Tensor
    mask: torch.Tensor
    frame_prompt: torch.Tensor

    def __post_init__(self) -> None:
        b, p = self.embeds.shape[:2]
        if self.mask.shape != self.embeds.shape[:3] or self.frame_prompt.ndim != 2 or self.frame_prompt.shape[0] != b:
            raise ValueError(
                f"FramePrompts: embeds (B, P, L, D) {tuple(self.embeds.shape)}, mask (B, P, L) "
                f"{tuple(self.mask.shape)} and frame_prompt (B, F) {tuple(self.frame_prompt.shape)} do not agree"
            )
        if self.frame_prompt.numel() and not 0 <= int(self.frame_prompt.min()) <= int(self.frame_prompt.max()) < p:
            raise ValueError(f"frame_prompt holds slots outside [0, {p})")

    @classmethod
    def from_segments(
        cls, embeds: torch.Tensor, mask: torch.Tensor, segment_start: torch.Tensor, frames: int, offset: int = 0
    ) -> FramePrompts:
        """Prompt p conditions the frames from segment_start[:, p] (B, P) on, for absolute frames
        offset .. offset + frames - 1. Raises ValueError when a start is negative (not fixed by the data)."""
        if bool((segment_start < 0).any()):
            raise ValueError("per-frame prompts need every switch frame fixed (got -1)")
        absolute = torch.arange(offset, offset + frames, device=segment_start.device)
        frame_prompt = (segment_start[:, None, :] <= absolute[None, :, None]).sum(-1) - 1
        return cls(embeds, mask, frame_prompt.clamp_min(0))

    @classmethod
    def single(cls, embeds: torch.Tensor, mask: torch.Tensor, frames: int) -> FramePrompts:
        """One prompt (B, L, D) for every frame."""
        zeros = torch.zeros(embeds.shape[0], frames, dtype=torch.long, device=embeds.device)
        return cls(embeds[:, None], mask[:, None], zeros)

    def to(self, dtype: torch.dtype) -> FramePrompts:
        return FramePrompts(self.embeds.to(dtype), self.mask, self.frame_prompt)

    def collapsed(self) -> torch.Tensor | FramePrompts:
        """The text states (B, L, D) of each sample's one prompt when no sample switches prompt inside these
        frames (the same conditioning through the plain, cheaper path), else self."""
        if self.frame_prompt.shape[1] == 0 or bool((self.frame_prompt != self.frame_prompt[:, :1]).any()):
            return self
        rows = torch.arange(self.embeds.shape[0], device=self.embeds.device)
        return self.embeds[rows, self.frame_prompt[:, 0]]

    @staticmethod
    def cat(parts: list[FramePrompts]) -> FramePrompts:
        """Along the batch; prompt slots padded to the most (padding slots are never selected)."""
        p = max(x.embeds.shape[1] for x in parts)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros((t.shape[0], p - t.shape[1], *t.shape[2:]))], 1)

        return FramePrompts(
            torch.cat([pad(x.embeds) for x in parts]),
            torch.cat([pad(x.mask) for x in parts]),
            torch.cat([x.frame_prompt for x in parts]),
        )


@dataclass
class PromptTrack:
    """Encoded FramePrompts: per layer the K/V of every prompt slot (B, P, H, L, D) and each frame's slot."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    frame_prompt: torch.Tensor  # (B, F)

    def for_layer(self, i: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K/V per frame (B, F, H, L, D) of layer i; a single slot gives (B, H, L, D)."""
        if self.frame_prompt.shape[1] != frames:
            raise ValueError(f"frame_prompt covers {self.frame_prompt.shape[1]} frames, the input has {frames}")
        if self.keys[i].shape[1] == 1:
            return self.keys[i][:, 0], self.values[i][:, 0]
        rows = torch.arange(self.frame_prompt.shape[0], device=self.frame_prompt.device)[:, None]
        return self.keys[i][rows, self.frame_prompt], self.values[i][rows, self.frame_prompt]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D)."""
    return x.unflatten(2, (heads, -1)).transpose(1, 2)


def _per_frame(x: torch.Tensor, frames: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply fn to x viewed as (B, frames, tokens_per_frame, D), for per-frame modulation."""
    return fn(x.unflatten(1, (frames, -1))).flatten(1, 2)


class CausalWanBlock(torch.nn.Module):
    """One Wan block (same submodules as diffusers' WanTransformerBlock) with per-frame modulation."""

    _sharded_entry_points = ("text_kv",)  # called outside forward: parameter sharding gathers for it too

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, cross_attn_norm: bool, eps: float) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim=dim, heads=num_heads, dim_head=head_dim, eps=eps)
        self.attn2 = WanAttention(
            dim=dim, heads=num_heads, dim_head=head_dim, eps=eps, cross_attention_dim_head=head_dim
        )
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else torch.nn.Identity()
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = torch.nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.heads = num_heads

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.attn2.norm_k(self.attn2.to_k(context))
        return _heads(k, self.heads), _heads(self.attn2.to_v(context), self.heads)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        text_k: torch.Tensor,
        text_v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: SelfAttend,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, F*T, D); e: (B, F, 6, D) modulation; text_k / text_v: (B, H, L, D), or (B, F, H, L, D) for a
        prompt per frame. Returns x and this call's post-RoPE self-attn K, V."""
        frames = e.shape[1]
        mod = (self.scale_shift_table.unsqueeze(0) + e.float()).unsqueeze(3)  # (B, F, 6, 1, D)
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = mod.unbind(2)

        # 1. Self-attention (norm and modulation in fp32, as Wan does).
        h = _per_frame(self.norm1(x.float()), frames, lambda t: t * (1 + scale_msa) + shift_msa).type_as(x)
        a = self.attn1
        q = apply_rotary(_heads(a.norm_q(a.to_q(h)), self.heads), cos, sin)
        k = apply_rotary(_heads(a.norm_k(a.to_k(h)), self.heads), cos, sin)
        v = _heads(a.to_v(h), self.heads)
        out = attend(q, k, v).transpose(1, 2).flatten(2).type_as(q)
        out = a.to_out[1](a.to_out[0](out))
        x = (x.float() + _per_frame(out, frames, lambda t: t * gate_msa)).type_as(x)

        # 2. Cross-attention to the prompt.
        h = self.norm2(x.float()).type_as(x)
        c = self.attn2
        q = _heads(c.norm_q(c.to_q(h)), self.heads)
        if text_k.ndim == 5:  # a prompt per frame (B, F, H, L, D): each frame's queries attend their own
            qf = q.unflatten(2, (frames, -1)).transpose(1, 2).flatten(0, 1)  # (B*F, H, T, D)
            out = sdpa_attention(qf, text_k.flatten(0, 1), text_v.flatten(0, 1))
            out = out.unflatten(0, (x.shape[0], frames)).transpose(1, 2).flatten(2, 3)  # (B, H, F*T, D)
        else:
            out = sdpa_attention(q, text_k, text_v)
        out = out.transpose(1, 2).flatten(2).type_as(q)
        x = x + c.to_out[1](c.to_out[0](out))

        # 3. Feed-forward.
        h = _per_frame(self.norm3(x.float()), frames, lambda t: t * (1 + c_scale) + c_shift).type_as(x)
        ff = self.ffn(h)
        x = (x.float() + _per_frame(ff.float(), frames, lambda t: t * c_gate)).type_as(x)
        return x, k, v


class CausalWanTransformer(ModelMixin, ConfigMixin):
    """Wan2.1 text-to-video transformer with bidirectional, block-causal and streaming forwards.

    The constructor takes diffusers' WanTransformer3DModel config (so `from_pretrained` reads
    a diffusers folder as is); image conditioning (I2V) is not supported.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["CausalWanBlock"]
    _keep_in_fp32_modules = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]
    # Called outside forward (text is encoded once per prompt): parameter sharding (FSDP2) gathers for them too.
    # None of them calls another, nor is one called inside forward (they share _encode_text).
    _sharded_entry_points = ("encode_text", "encode_text_slots", "encode_prompts")

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        prediction_type: str = "flow_prediction",
        sample_sigma_floor: float = 0.05,
        sigma_data: float | list[float] = 1.0,
    ) -> None:
        super().__init__()
        check_prediction(prediction_type, sample_sigma_floor, sigma_data, out_channels or in_channels)
        if image_dim is not None or added_kv_proj_dim is not None or pos_embed_seq_len is not None:
            raise NotImplementedError("image-conditioned Wan (I2V/FLF2V) is not supported: text-to-video only")
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm must be 'rms_norm_across_heads' (Wan2.1), got {qk_norm!r}")
        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels

        # rope_max_seq_len is kept for config compatibility: positions here are computed, not tabulated.
        self.rope = WanRope3D(attention_head_dim)
        self.patch_embedding = torch.nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim, time_freq_dim=freq_dim, time_proj_dim=inner_dim * 6, text_embed_dim=text_dim
        )
        self.blocks = torch.nn.ModuleList(
            CausalWanBlock(inner_dim, ffn_dim, num_attention_heads, cross_attn_norm, eps) for _ in range(num_layers)
        )
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = torch.nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = torch.nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)

        self.gradient_checkpointing = False
        self.attention_backend = "sdpa"

    # ----------------------------------------------------------------------------------- helpers

    def set_attention_backend(self, name: str) -> None:
        """Self-attention kernel by registered name (see memflow_train.models.attention)."""
        get_attention_backend(name)
        self.attention_backend = name

    def new_kv_cache(self, config: MemoryPolicy | AttentionWindow) -> StreamingKVCache:
        """An empty streaming cache for this model: sink + window, plus NAM/SMA if config enables them."""
        return StreamingKVCache(len(self.blocks), config)

    def encode_text(self, text_states: torch.Tensor, mask: torch.Tensor | None = None) -> TextContext:
        """Per-layer cross-attention K/V of text encoder states (B, L, text_dim): compute once per prompt."""
        return self._encode_text(text_states, mask)

    def _encode_text(self, text_states: torch.Tensor, mask: torch.Tensor | None) -> TextContext:
        context = self.condition_embedder.text_embedder(text_states)
        kv = [block.text_kv(context) for block in self.blocks]
        return TextContext([k for k, _ in kv], [v for _, v in kv], mask)

    def encode_text_slots(self, text_states: torch.Tensor, mask: torch.Tensor) -> list[TextContext]:
        """Per-layer cross-attention K/V of every prompt slot of text encoder states (B, P, L, text_dim) with
        mask (B, P, L), in ONE forward whatever P is (under parameter sharding every rank must run the same
        forwards, and ranks' batches may hold different numbers of prompts): one TextContext per slot."""
        b, p = text_states.shape[:2]
        flat = self._encode_text(text_states.flatten(0, 1), mask.flatten(0, 1))
        keys = [k.unflatten(0, (b, p)) for k in flat.keys]
        values = [v.unflatten(0, (b, p)) for v in flat.values]
        return [TextContext([k[:, i] for k in keys], [v[:, i] for v in values], mask[:, i]) for i in range(p)]

    def encode_prompts(self, prompts: FramePrompts) -> PromptTrack:
        """Per-layer cross-attention K/V of every prompt slot, and each frame's slot."""
        return self._encode_prompts(prompts)

    def _encode_prompts(self, prompts: FramePrompts) -> PromptTrack:
        b, p = prompts.embeds.shape[:2]
        flat = self._encode_text(prompts.embeds.flatten(0, 1), prompts.mask.flatten(0, 1))
        keys = [k.unflatten(0, (b, p)) for k in flat.keys]
        return PromptTrack(keys, [v.unflatten(0, (b, p)) for v in flat.values], prompts.frame_prompt)

    def _as_text(self, text: torch.Tensor | TextContext | FramePrompts | PromptTrack) -> TextContext | PromptTrack:
        if isinstance(text, TextContext | PromptTrack):
            return text
        if isinstance(text, FramePrompts):
            return self._encode_prompts(text)
        return self._encode_text(text, None)

    def _time_embedding(self, timestep: torch.Tensor, batch: int, frames: int, dtype: torch.dtype):
        """Per-frame temb (B, F, D) and block modulation (B, F, 6, D) from timesteps (B,) or (B, F)."""
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(batch, frames)
        if timestep.shape != (batch, frames):
            raise ValueError(f"timestep must be (B,) or (B, F) = ({batch}, {frames}), got {tuple(timestep.shape)}")
        ce = self.condition_embedder
        t = ce.timesteps_proj(timestep.reshape(-1))
        embedder_dtype = next(ce.time_embedder.parameters()).dtype
        temb = ce.time_embedder(t.to(embedder_dtype)).to(dtype)
        e = ce.time_proj(ce.act_fn(temb))
        return temb.unflatten(0, (batch, frames)), e.unflatten(0, (batch, frames)).unflatten(2, (6, -1))

    def _patchify(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        if hidden_states.ndim != 5:
            raise ValueError(f"expected latents (B, C, F, H, W), got shape {tuple(hidden_states.shape)}")
        p_t, p_h, p_w = self.config.patch_size
        _, c, f, h, w = hidden_states.shape
        if c != self.config.in_channels or f % p_t or h % p_h or w % p_w:
            raise ValueError(
                f"latents (C={c}, F={f}, H={h}, W={w}) do not fit in_channels={self.config.in_channels} "
                f"and patch_size={tuple(self.config.patch_size)}"
            )
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        return x, (f // p_t, h // p_h, w // p_w)

    def _unpatchify(self, x: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        f, h, w = grid
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unsqueeze(3).unbind(2)
        x = _per_frame(self.norm_out(x.float()), f, lambda t: t * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        p_t, p_h, p_w = self.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _run(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        text: TextContext | PromptTrack,
        frame_offset: int,
        make_attend: Callable[[int, int, int], SelfAttend],
        on_layer_kv: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Shared body of every forward. make_attend(layer, frames, tokens_per_frame) picks the pattern."""
        x, grid = self._patchify(hidden_states)
        f, h, w = grid
        temb, e = self._time_embedding(timestep, x.shape[0], f, x.dtype)
        frames = torch.arange(frame_offset, frame_offset + f, device=x.device)
        cos, sin = self.rope(frames, h, w)
        for i, block in enumerate(self.blocks):
            attend = make_attend(i, f, h * w)
            args = (x, e, *text.for_layer(i, f), cos, sin, attend)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, k, v = checkpoint(block, *args, use_reentrant=False)
            else:
                x, k, v = block(*args)
            if on_layer_kv is not None:
                on_layer_kv(i, k, v)
        out = self._unpatchify(x, temb, grid)
        if self.config.prediction_type == "sample":
            return flow_of_sample(out, hidden_states, timestep, self.config.sample_sigma_floor)
        if self.config.prediction_type == "preconditioned":
            return flow_of_preconditioned(out, hidden_states, timestep, self.config.sigma_data)
        return out

    # ----------------------------------------------------------------------------------- forwards

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor | TextContext | FramePrompts | PromptTrack,
        window: AttentionWindow | None = None,
        frame_offset: int | None = None,
        cache: StreamingKVCache | None = None,
        update_cache: bool = False,
        write_from: int | None = None,
    ) -> torch.Tensor:
        """Flow prediction for latents (B, C, F, H, W); every mode goes through here, so parameter
        sharding (ZeRO-3, FSDP) sees one forward.

        Full sequence (cache=None): window=None is bidirectional; otherwise block-causal, each
        chunk of window.num_frame_per_block frames attending to its sink and local window,
        exactly what streaming the same frames would see. frame_offset (default 0) is the
        absolute index of the first frame (RoPE position and chunk grid).

        text: one prompt per sample (encoder states (B, L, text_dim) or a TextContext), or a prompt per
        frame (FramePrompts / PromptTrack; full-sequence forwards only).

        Streaming (cache given): see forward_chunk.
        """
        text = self._as_text(text)
        attn = get_attention_backend(self.attention_backend)
        if cache is not None:
            if isinstance(text, PromptTrack):
                raise ValueError("streaming takes one prompt per chunk (a TextContext), not a prompt per frame")
            if window is not None:
                raise ValueError("streaming takes its window from the cache; pass window or cache, not both")
            return self._streaming(hidden_states, timestep, text, cache, frame_offset, update_cache, write_from, attn)
        offset = 0 if frame_offset is None else frame_offset
        if window is None:
            return self._run(hidden_states, timestep, text, offset, lambda i, f, t: attn)
        if hidden_states.shape[2] % window.num_frame_per_block:
            raise ValueError(
                f"{hidden_states.shape[2]} frames are not a whole number of chunks of {window.num_frame_per_block}"
            )
        make = partial(_block_causal_attend, attn=attn, window=window, frame_offset=offset)
        return self._run(hidden_states, timestep, text, offset, make)

    def forward_chunk(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor | TextContext,
        cache: StreamingKVCache,
        frame_offset: int | None = None,
        update_cache: bool = False,
        write_from: int | None = None,
    ) -> torch.Tensor:
        """Streaming flow prediction for one chunk (B, C, F, H, W) at absolute frame frame_offset.

        The chunk attends to what the cache assembles (sink, memory, local window) plus itself.
        With update_cache=True its keys/values are written to the cache afterwards (the clean
        re-run at timestep 0 does this); the denoising steps only read it. Before the chunk,
        the cache's memory takes in pending frames, retrieving with this text's keys: at a
        prompt switch, the new prompt's. frame_offset defaults to the cache's next frame.
        write_from: with update_cache, the frames before it are context only (a joint recache
        re-reads frames the window no longer keeps); default: every frame is written.
        """
        if write_from is not None and not update_cache:
            raise ValueError("write_from is for forwards that write the cache (update_cache=True)")
        return self(
            hidden_states,
            timestep,
            text,
            frame_offset=frame_offset,
            cache=cache,
            update_cache=update_cache,
            write_from=write_from,
        )

    def _streaming(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        text: TextContext,
        cache: StreamingKVCache,
        frame_offset: int | None,
        update_cache: bool,
        write_from: int | None,
        attn: Callable,
    ) -> torch.Tensor:
        if self.config.patch_size[0] != 1:
            raise ValueError("streaming needs temporal patch size 1")
        offset = cache.next_frame if frame_offset is None else frame_offset
        frames = hidden_states.shape[2]
        cache.prepare(offset, frames, [text.layer(i) for i in range(len(self.blocks))])

        def make_attend(i: int, f: int, tpf: int) -> SelfAttend:
            read = cache[i].reader(offset, frames)  # the cache as it is now, also when checkpointing recomputes

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return attn(q, *read(q, k, v))

            return attend

        def write(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            cache[i].append(k, v, offset, frames, text.layer(i), write_from=write_from)

        return self._run(hidden_states, timestep, text, offset, make_attend, write if update_cache else None)


def cast_keeping_fp32(model: CausalWanTransformer, dtype: torch.dtype) -> CausalWanTransformer:
    """Cast parameters to dtype, keeping norms, time embedder and modulation tables in fp32 as Wan does."""
    keep = set(model._keep_in_fp32_modules)
    for name, param in model.named_parameters():
        target = torch.float32 if keep & set(name.split(".")) else dtype
        if param.dtype != target:
            param.data = param.data.to(target)
    return model


def _block_causal_attend(
    layer: int, frames: int, tpf: int, *, attn, window: AttentionWindow, frame_offset: int
) -> SelfAttend:
    """Block-causal self-attention as one attention call per chunk over its visible key frames.

    Exact (no mask materialised) and memory-light: keys are gathered per chunk, like the cache does.
    """

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = window.num_frame_per_block
        outs = []
        for c in range(0, frames, n):
            ranges = window.visible_ranges(frame_offset + c + n)
            idx = [(max(lo - frame_offset, 0) * tpf, (hi - frame_offset) * tpf) for lo, hi in ranges]
            idx = [(a, b) for a, b in idx if b > a]
            kc = torch.cat([k[:, :, a:b] for a, b in idx], 2)
            vc = torch.cat([v[:, :, a:b] for a, b in idx], 2)
            outs.append(attn(q[:, :, c * tpf : (c + n) * tpf], kc, vc))
        return torch.cat(outs, 2)

    return attend
