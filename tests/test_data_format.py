"""Shard format v1: samples survive a write/read round trip; malformed ones are refused with a reason."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save as save_safetensors

from data.batch import BatchOrigin, collate
from data.format import FIELD_MEMBERS, FORMAT_VERSION, BadSample, Sample, SampleSpec, decode_sample, encode_sample
from data.video_io import decode_mp4, encode_mp4

ALL = SampleSpec(fields=tuple(FIELD_MEMBERS))


def full_sample(key: str = "k0") -> Sample:
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 255, (5, 16, 16, 3), dtype=torch.uint8, generator=g)
    return Sample(
        key=key,
        prompts=["a red circle", "a blue square"],
        switch_frames=[2],
        num_frames=3,
        text=[torch.randn(4, 8, generator=g).bfloat16(), torch.randn(6, 8, generator=g).bfloat16()],
        negative=torch.randn(2, 8, generator=g).half(),
        negative_prompt="blurry",
        latents=torch.randn(4, 3, 2, 2, generator=g).bfloat16(),
        mp4=encode_mp4(frames),
        ode_trajectory=torch.randn(2, 4, 3, 2, 2, generator=g),
        ode_timesteps=torch.tensor([1000.0, 500.0]),
        annotations=[{"frame": i, "subjects": []} for i in range(5)],
        info={"source": "test"},
    )


def test_round_trip_keeps_every_field() -> None:
    s = full_sample()
    raw = encode_sample(s)
    assert set(raw) == {"__key__", "json", *FIELD_MEMBERS.values()}
    back = decode_sample(raw, ALL)
    for name in ("key", "prompts", "switch_frames", "num_frames", "negative_prompt", "mp4", "annotations", "info"):
        assert getattr(back, name) == getattr(s, name), name
    for a, b in zip(back.text, s.text, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for name in ("negative", "latents", "ode_trajectory", "ode_timesteps"):
        a, b = getattr(back, name), getattr(s, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert back.video.shape == (5, 16, 16, 3) and back.video.dtype == torch.uint8
    assert json.loads(raw["json"])["format_version"] == FORMAT_VERSION


def test_reader_loads_only_requested_fields() -> None:
    back = decode_sample(encode_sample(full_sample()), SampleSpec(fields=("latents",)))
    assert back.latents is not None and back.text is None and back.mp4 is None and back.annotations is None


def _with_meta(raw: dict, **changes: object) -> dict:
    meta = json.loads(raw["json"])
    meta.update(changes)
    return {**raw, "json": json.dumps(meta).encode()}


@pytest.mark.parametrize(
    ("corrupt", "spec", "reason"),
    [
        (lambda r: {k: v for k, v in r.items() if k != "json"}, ALL, "no json metadata"),
        (lambda r: {**r, "json": b"\x00\xffnot json"}, ALL, "metadata is not JSON"),
        (lambda r: _with_meta(r, format_version=99), ALL, "format_version 99"),
        (lambda r: _with_meta(r, prompts=[]), ALL, "prompts must be"),
        (lambda r: _with_meta(r, switch_frames=[5]), ALL, "switch_frames"),
        (lambda r: {k: v for k, v in r.items() if k != "latents.safetensors"}, ALL, "incomplete sample"),
        (lambda r: {**r, "text.safetensors": b"garbage" * 10}, ALL, "not a readable safetensors"),
        (
            lambda r: {
                **r,
                "latents.safetensors": save_safetensors({"latents": torch.zeros(4, 3, 2, 2, dtype=torch.int32)}),
            },
            ALL,
            "dtype torch.int32",
        ),
        (
            lambda r: {**r, "latents.safetensors": save_safetensors({"latents": torch.zeros(4, 3, 2)})},
            ALL,
            "expected 4 non-empty dimensions",
        ),
        (
            lambda r: {**r, "latents.safetensors": save_safetensors({"latents": torch.zeros(4, 7, 2, 2)})},
            ALL,
            "latents have 7 frames",
        ),
        (
            lambda r: {
                **r,
                "text.safetensors": save_safetensors({"embeds": torch.zeros(10, 8), "lengths": torch.tensor([4, 5])}),
            },
            ALL,
            "do not split 10 tokens",
        ),
        (lambda r: {**r, "mp4": b"not a video"}, ALL, "mp4 cannot be decoded"),
        (lambda r: {**r, "annotations.json": b"{"}, ALL, "annotations are not JSON"),
        (lambda r: r, SampleSpec(fields=("text",), text_dim=16), "expected text_dim 16"),
        (lambda r: r, SampleSpec(fields=("text",), text_len=5), "more than text_len 5"),
        (lambda r: r, SampleSpec(fields=("latents",), latent_channels=16), "expected 16"),
        (lambda r: r, SampleSpec(fields=("latents",), latent_size=(4, 4)), "expected (4, 4)"),
    ],
)
def test_bad_samples_are_refused_with_a_reason(corrupt, spec: SampleSpec, reason: str) -> None:
    with pytest.raises(BadSample, match=re.escape(reason)):
        decode_sample(corrupt(encode_sample(full_sample())), spec)


def test_a_field_the_loader_requires_must_be_present() -> None:
    raw = encode_sample(Sample("p", ["only a prompt"]))
    with pytest.raises(BadSample, match="has no latents"):
        decode_sample(raw, SampleSpec(fields=("latents",)))


def test_writer_refuses_inconsistent_samples() -> None:
    s = full_sample()
    s.text = s.text[:1]
    with pytest.raises(BadSample, match="1 prompt embeddings for 2 prompts"):
        encode_sample(s)


def test_unknown_fields_fail_early() -> None:
    with pytest.raises(ValueError, match="unknown fields"):
        SampleSpec(fields=("text", "audio"))


def test_collate_pads_prompts_tokens_and_frames() -> None:
    long = full_sample("long")
    short = Sample(
        "short",
        ["one prompt"],
        None,
        2,
        text=[torch.ones(3, 8)],
        negative=torch.ones(1, 8),
        latents=torch.ones(4, 2, 2, 2),
    )
    for s in (long, short):
        s.mp4 = s.ode_trajectory = s.ode_timesteps = s.annotations = None
    batch = collate([long, short], text_len=10, dtype=torch.float32, default_num_frames=21, origin=BatchOrigin())
    assert batch.prompt_embeds.shape == (2, 2, 10, 8) and batch.prompt_embeds.dtype == torch.float32
    assert batch.prompt_mask.sum(-1).tolist() == [[4, 6], [3, 0]]
    assert torch.equal(batch.prompt_embeds[0, 1, :6], long.text[1].float())
    assert batch.prompt_embeds[0, 1, 6:].abs().sum() == 0 and batch.prompt_embeds[1, 1].abs().sum() == 0
    assert batch.segment_start.tolist() == [[0, 2], [0, 2]]  # the short one's empty slot starts at its end
    assert batch.num_frames.tolist() == [3, 2]
    assert batch.latents.shape == (2, 4, 3, 2, 2) and batch.latents[1, :, 2].abs().sum() == 0
    assert batch.negative_mask.sum(-1).tolist() == [2, 1]
    assert batch.prompt_at(1).tolist() == [0, 0] and batch.prompt_at(2)[0] == 1


def test_collate_marks_switches_left_to_the_method_and_defaults_the_length() -> None:
    pair = Sample("pair", ["first", "second"], switch_frames=None)
    batch = collate([pair], text_len=4, dtype=torch.float32, default_num_frames=21, origin=BatchOrigin())
    assert batch.segment_start.tolist() == [[0, -1]] and batch.num_frames.tolist() == [21]
    with pytest.raises(ValueError, match="not fixed by the data"):
        batch.prompt_at(3)


def test_mp4_round_trip_keeps_shape_and_roughly_the_pixels() -> None:
    frames = torch.zeros(9, 32, 32, 3, dtype=torch.uint8)
    frames[:, 8:24, 8:24] = torch.tensor([200, 40, 40], dtype=torch.uint8)
    back = decode_mp4(encode_mp4(frames))
    assert back.shape == frames.shape
    assert (back.float() - frames.float()).abs().mean() < 4  # H.264 at crf 18 on flat colours
