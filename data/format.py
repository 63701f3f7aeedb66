"""Shard format v1: one sample of a narrative, how it is stored in a tar, and how it is checked on read.

A sample is a group of tar members sharing a key (WebDataset convention, `KEY.SUFFIX`):

    KEY.json                 always: metadata (format_version, prompts, switch_frames, num_frames, members, ...)
    KEY.text.safetensors     embeds (N, D) = the real tokens of all prompts, concatenated; lengths (P,) int64
    KEY.negative.safetensors embeds (N, D) of the negative prompt (real tokens only)
    KEY.latents.safetensors  latents (C, T, H, W), normalised VAE latents
    KEY.mp4                  the video (H.264)
    KEY.ode.safetensors      trajectory (S, C, T, H, W) and timesteps (S,) of a teacher's ODE solve
    KEY.annotations.json     per video frame ground truth (the synthetic world writes it)

Embeddings are stored without Wan's zero padding: the padding is rebuilt at collation for any text_len.
Frame counts and switch frames are in latent frames. The metadata lists every member the sample has, so
a sample cut short by a truncated shard is recognised as incomplete whatever the member order.
See data/README.md for the full description.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from data.video_io import decode_mp4

FORMAT_VERSION = 1
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Loadable optional parts of a sample (the DataModule's `fields`) and the tar member holding each.
FIELD_MEMBERS = {
    "text": "text.safetensors",
    "negative": "negative.safetensors",
    "latents": "latents.safetensors",
    "video": "mp4",
    "ode": "ode.safetensors",
    "annotations": "annotations.json",
}
META_MEMBER = "json"


class BadSample(ValueError):
    """A sample that cannot be used; the loader skips it with a warning and counts it."""


@dataclass
class Sample:
    """One narrative: prompts with their latent-frame segments and whatever was precomputed for it.

    switch_frames[i] is the latent frame where prompts[i + 1] starts; None when the data leaves the switch to
    the training method (LongLive-style prompt pairs). num_frames is None when the data fixes no length.
    text holds one (tokens_i, D) tensor per prompt, real tokens only.
    """

    key: str
    prompts: list[str]
    switch_frames: list[int] | None = None
    num_frames: int | None = None
    text: list[torch.Tensor] | None = None
    negative: torch.Tensor | None = None
    negative_prompt: str | None = None
    latents: torch.Tensor | None = None
    mp4: bytes | None = None
    video: torch.Tensor | None = None  # frames decoded from mp4 on read, uint8 (T, H, W, 3); never written
    ode_trajectory: torch.Tensor | None = None
    ode_timesteps: torch.Tensor | None = None
    annotations: list[dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # free-form provenance: source file, line, encoders

    def check(self) -> None:
        """Raise BadSample if the fields contradict each other (used on write and on read)."""
        _check_narrative(self.prompts, self.switch_frames, self.num_frames)
        if self.text is not None:
            if len(self.text) != len(self.prompts):
                raise BadSample(f"{len(self.text)} prompt embeddings for {len(self.prompts)} prompts")
            dims = {t.shape[-1] for t in self.text}
            for t in self.text:
                _check_tensor("prompt embedding", t, ndim=2)
            if len(dims) != 1:
                raise BadSample(f"prompt embeddings of different widths {sorted(dims)}")
        if self.negative is not None:
            _check_tensor("negative embedding", self.negative, ndim=2)
        if self.latents is not None:
            _check_tensor("latents", self.latents, ndim=4)
            if self.num_frames is not None and self.latents.shape[1] != self.num_frames:
                raise BadSample(f"latents have {self.latents.shape[1]} frames, the narrative {self.num_frames}")
        if (self.ode_trajectory is None) != (self.ode_timesteps is None):
            raise BadSample("ODE trajectory and timesteps come together")
        if self.ode_trajectory is not None:
            _check_tensor("ODE trajectory", self.ode_trajectory, ndim=5)
            if self.ode_timesteps.shape != self.ode_trajectory.shape[:1]:
                raise BadSample(
                    f"ODE timesteps {tuple(self.ode_timesteps.shape)} vs {self.ode_trajectory.shape[0]} steps"
                )
        if self.annotations is not None and not isinstance(self.annotations, list):
            raise BadSample("annotations must be a list with one entry per video frame")


def _check_narrative(prompts: Any, switch_frames: Any, num_frames: Any) -> None:
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise BadSample(f"prompts must be a non-empty list of non-empty strings, got {prompts!r:.200}")
    if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
        raise BadSample(f"num_frames must be a positive integer or null, got {num_frames!r}")
    if switch_frames is None:
        return
    if not isinstance(switch_frames, list) or len(switch_frames) != len(prompts) - 1:
        raise BadSample(f"switch_frames must list {len(prompts) - 1} frames for {len(prompts)} prompts")
    bounds = [0, *switch_frames] + ([num_frames] if num_frames is not None else [])
    if not all(isinstance(f, int) for f in switch_frames) or any(a >= b for a, b in pairwise(bounds)):
        raise BadSample(f"switch_frames {switch_frames} must increase strictly inside (0, {num_frames})")


def _check_tensor(name: str, t: Any, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise BadSample(f"{name} is not a tensor")
    if t.dtype not in FLOAT_DTYPES:
        raise BadSample(f"{name} has dtype {t.dtype}, expected one of float16, bfloat16, float32")
    if t.ndim != ndim or 0 in t.shape:
        raise BadSample(f"{name} has shape {tuple(t.shape)}, expected {ndim} non-empty dimensions")


# ------------------------------------------------------------------------------------------ encoding


def encode_sample(sample: Sample) -> dict[str, Any]:
    """Sample -> WebDataset dict (`__key__` plus member suffix -> bytes), ready for wds.TarWriter."""
    sample.check()
    members: dict[str, bytes] = {}
    if sample.text is not None:
        lengths = torch.tensor([t.shape[0] for t in sample.text], dtype=torch.int64)
        embeds = torch.cat([t.contiguous() for t in sample.text])
        members[FIELD_MEMBERS["text"]] = save_safetensors({"embeds": embeds, "lengths": lengths})
    if sample.negative is not None:
        members[FIELD_MEMBERS["negative"]] = save_safetensors({"embeds": sample.negative.contiguous()})
    if sample.latents is not None:
        members[FIELD_MEMBERS["latents"]] = save_safetensors({"latents": sample.latents.contiguous()})
    if sample.mp4 is not None:
        members[FIELD_MEMBERS["video"]] = bytes(sample.mp4)
    if sample.ode_trajectory is not None:
        members[FIELD_MEMBERS["ode"]] = save_safetensors(
            {"trajectory": sample.ode_trajectory.contiguous(), "timesteps": sample.ode_timesteps.contiguous()}
        )
    if sample.annotations is not None:
        members[FIELD_MEMBERS["annotations"]] = json.dumps(sample.annotations).encode()
    meta = {
        "format_version": FORMAT_VERSION,
        "prompts": sample.prompts,
        "switch_frames": sample.switch_frames,
        "num_frames": sample.num_frames,
        "negative_prompt": sample.negative_prompt,
        "members": sorted(members),
        "info": sample.info,
    }
    return {"__key__": sample.key, META_MEMBER: json.dumps(meta).encode(), **members}


# ------------------------------------------------------------------------------------------ decoding


@dataclass(frozen=True)
class SampleSpec:
    """What a reader loads and what shapes it accepts; None accepts any size."""

    fields: tuple[str, ...] = ("text",)
    text_dim: int | None = None
    text_len: int | None = None
    latent_channels: int | None = None
    latent_size: tuple[int, int] | None = None
    min_latent_frames: int | None = None  # shorter latents are bad samples (the method cannot train on them)

    def __post_init__(self) -> None:
        unknown = set(self.fields) - set(FIELD_MEMBERS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; known: {sorted(FIELD_MEMBERS)}")


def _load_tensors(raw: dict[str, bytes], member: str, names: Iterable[str]) -> dict[str, torch.Tensor]:
    try:
        tensors = load_safetensors(raw[member])
    except Exception as err:  # safetensors raises its own error type for any malformed header or payload
        raise BadSample(f"{member} is not a readable safetensors file ({err})") from err
    missing = [n for n in names if n not in tensors]
    if missing:
        raise BadSample(f"{member} lacks {missing}")
    return tensors


def decode_sample(raw: dict[str, Any], spec: SampleSpec) -> Sample:
    """Raw tar members of one key -> a checked Sample with the fields the spec asks for; BadSample otherwise."""
    key = raw.get("__key__", "?")
    if META_MEMBER not in raw:
        raise BadSample(
            f"no {META_MEMBER} metadata member (members: {sorted(k for k in raw if not k.startswith('__'))})"
        )
    try:
        meta = json.loads(raw[META_MEMBER])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadSample(f"metadata is not JSON ({err})") from err
    if not isinstance(meta, dict):
        raise BadSample("metadata is not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BadSample(f"format_version {meta.get('format_version')!r}, this reader reads {FORMAT_VERSION}")
    listed = meta.get("members")
    if not isinstance(listed, list):
        raise BadSample("metadata has no members list")
    missing = sorted(set(listed) - set(raw))
    if missing:
        raise BadSample(f"incomplete sample, missing {missing} (truncated shard?)")
    for name in spec.fields:
        if FIELD_MEMBERS[name] not in raw:
            raise BadSample(f"has no {name} ({FIELD_MEMBERS[name]}), which this loader requires")

    sample = Sample(
        key=key,
        prompts=meta.get("prompts"),
        switch_frames=meta.get("switch_frames"),
        num_frames=meta.get("num_frames"),
        negative_prompt=meta.get("negative_prompt"),
        info=meta.get("info") or {},
    )
    _check_narrative(sample.prompts, sample.switch_frames, sample.num_frames)
    if "text" in spec.fields:
        t = _load_tensors(raw, FIELD_MEMBERS["text"], ("embeds", "lengths"))
        sample.text = _split_prompts(t["embeds"], t["lengths"], len(sample.prompts))
        for emb in sample.text:
            _check_text(emb, spec, "prompt")
    if "negative" in spec.fields:
        sample.negative = _load_tensors(raw, FIELD_MEMBERS["negative"], ("embeds",))["embeds"]
        _check_tensor("negative embedding", sample.negative, ndim=2)
        _check_text(sample.negative, spec, "negative prompt")
    if "latents" in spec.fields:
        sample.latents = _load_tensors(raw, FIELD_MEMBERS["latents"], ("latents",))["latents"]
        _check_latents("latents", sample.latents, spec, channel_dim=0)
        if spec.min_latent_frames is not None and sample.latents.shape[1] < spec.min_latent_frames:
            raise BadSample(
                f"latents have {sample.latents.shape[1]} frames, fewer than min_latent_frames "
                f"{spec.min_latent_frames} (too short for the method)"
            )
    if "ode" in spec.fields:
        t = _load_tensors(raw, FIELD_MEMBERS["ode"], ("trajectory", "timesteps"))
        sample.ode_trajectory, sample.ode_timesteps = t["trajectory"], t["timesteps"]
        _check_latents("ODE trajectory", sample.ode_trajectory, spec, channel_dim=1)
    if "video" in spec.fields:
        sample.mp4 = raw[FIELD_MEMBERS["video"]]
        try:
            sample.video = decode_mp4(sample.mp4)
        except Exception as err:  # PyAV raises per-codec error types for broken streams
            raise BadSample(f"mp4 cannot be decoded ({err})") from err
    if "annotations" in spec.fields:
        try:
            sample.annotations = json.loads(raw[FIELD_MEMBERS["annotations"]])
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadSample(f"annotations are not JSON ({err})") from err
    sample.check()
    return sample


def _split_prompts(embeds: torch.Tensor, lengths: torch.Tensor, num_prompts: int) -> list[torch.Tensor]:
    if lengths.dtype not in (torch.int32, torch.int64) or lengths.ndim != 1:
        raise BadSample(f"text lengths must be a 1-D integer tensor, got {lengths.dtype} {tuple(lengths.shape)}")
    _check_tensor("prompt embeddings", embeds, ndim=2)
    if len(lengths) != num_prompts or bool((lengths < 1).any()) or int(lengths.sum()) != embeds.shape[0]:
        raise BadSample(f"text lengths {lengths.tolist()} do not split {embeds.shape[0]} tokens into {num_prompts}")
    return list(embeds.split(lengths.tolist()))


def _check_text(emb: torch.Tensor, spec: SampleSpec, what: str) -> None:
    if spec.text_dim is not None and emb.shape[1] != spec.text_dim:
        raise BadSample(f"{what} embedding width {emb.shape[1]}, expected text_dim {spec.text_dim}")
    if spec.text_len is not None and emb.shape[0] > spec.text_len:
        raise BadSample(f"{what} has {emb.shape[0]} tokens, more than text_len {spec.text_len}")


def _check_latents(name: str, t: torch.Tensor, spec: SampleSpec, channel_dim: int) -> None:
    _check_tensor(name, t, ndim=4 + channel_dim)
    if spec.latent_channels is not None and t.shape[channel_dim] != spec.latent_channels:
        raise BadSample(f"{name} have {t.shape[channel_dim]} channels, expected {spec.latent_channels}")
    if spec.latent_size is not None and tuple(t.shape[-2:]) != tuple(spec.latent_size):
        raise BadSample(f"{name} are {tuple(t.shape[-2:])} latent pixels, expected {tuple(spec.latent_size)}")
