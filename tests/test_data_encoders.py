"""Text encoder and VAE wrappers: same numbers as diffusers' Wan pipeline, local loading, clear shape errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers.pipelines.wan.pipeline_wan import WanPipeline

from memflow_train.models.text_encoder import WanTextEncoder
from memflow_train.models.vae import WanVAE

PROMPTS = ["A red circle drifts across the night sky.", "  two   words ", "Ünïcödé prompt, 你好"]


def test_text_embeddings_equal_wan_pipeline() -> None:
    enc = WanTextEncoder.tiny(d_model=16, text_len=24)
    embeds, mask = enc(PROMPTS)
    pipe = SimpleNamespace(tokenizer=enc.tokenizer, text_encoder=enc.encoder, _execution_device=torch.device("cpu"))
    ref = WanPipeline._get_t5_prompt_embeds(pipe, PROMPTS, max_sequence_length=24, device=torch.device("cpu"))
    assert embeds.shape == (3, 24, 16) and torch.equal(embeds, ref)
    lengths = mask.sum(1)
    assert lengths[0] == 24 and lengths[1] == len("two words") + 1  # truncated; cleaned + end-of-sequence token
    assert all(embeds[i, n:].abs().sum() == 0 and embeds[i, :n].abs().sum() > 0 for i, n in enumerate(lengths))


def test_unpadded_embeddings_are_the_real_tokens() -> None:
    enc = WanTextEncoder.tiny(d_model=8, text_len=32)
    embeds, mask = enc(PROMPTS, batch_size=2)
    trimmed = enc.encode_unpadded(PROMPTS)
    for e, m, t in zip(embeds, mask, trimmed, strict=True):
        assert torch.equal(e[m], t)


def test_tiny_text_encoder_is_deterministic_and_saves_like_wan(tmp_path: Path) -> None:
    a, b = WanTextEncoder.tiny(seed=3), WanTextEncoder.tiny(seed=3)
    assert torch.equal(a(PROMPTS)[0], b(PROMPTS)[0])
    assert not torch.equal(a(PROMPTS)[0], WanTextEncoder.tiny(seed=4)(PROMPTS)[0])
    a.save_pretrained(tmp_path)
    loaded = WanTextEncoder.from_pretrained(tmp_path, text_len=a.text_len, dtype=torch.float32)
    assert torch.equal(loaded(PROMPTS)[0], a(PROMPTS)[0])
    with pytest.raises(FileNotFoundError, match="no UMT5 encoder"):
        WanTextEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(TypeError, match="list of prompts"):
        a("one string")


def test_vae_normalises_latents_like_wan_pipeline() -> None:
    vae = WanVAE.tiny(z_dim=4)
    vae.vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 0.5, 1.0, 4.0])
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    z = vae.encode(video)
    raw = vae.vae.encode(video).latent_dist.mode()
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
    std = torch.tensor([2.0, 0.5, 1.0, 4.0]).view(1, 4, 1, 1, 1)
    assert z.shape == (2, 4, 2, 2, 2)
    torch.testing.assert_close(z, (raw - mean) / std)
    torch.testing.assert_close(vae.decode(z), vae.vae.decode(raw).sample.clamp(-1, 1))


def test_vae_reads_uint8_channels_last_videos() -> None:
    vae = WanVAE.tiny(z_dim=4)
    frames = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    as_float = frames.permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1
    torch.testing.assert_close(vae.encode(frames), vae.encode(as_float))
    out = WanVAE.to_uint8(vae.decode(vae.encode(frames)))
    assert out.shape == (1, 5, 16, 16, 3) and out.dtype == torch.uint8


@pytest.mark.parametrize(
    ("video", "message"),
    [
        (torch.zeros(6, 16, 16, 3, dtype=torch.uint8), "frames must be 1 \\+ k\\*4"),
        (torch.zeros(5, 12, 16, 3, dtype=torch.uint8), "multiples of 8"),
        (torch.zeros(5, 16, 16, 4, dtype=torch.uint8), "uint8 videos are"),
        (torch.zeros(1, 5, 16, 16, 3), "float videos are"),
    ],
)
def test_vae_rejects_bad_layouts(video: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WanVAE.tiny().encode(video)


def test_vae_calibration_gives_unit_statistics_and_round_trips(tmp_path: Path) -> None:
    vae = WanVAE.tiny(z_dim=4, seed=1)
    videos = torch.randint(0, 256, (3, 9, 16, 16, 3), dtype=torch.uint8)
    vae.calibrate(videos)
    z = vae.encode(videos)
    torch.testing.assert_close(z.mean((0, 2, 3, 4)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3, 4)), torch.ones(4), atol=1e-4, rtol=0)
    vae.save_pretrained(tmp_path)
    torch.testing.assert_close(WanVAE.from_pretrained(tmp_path).encode(videos), z)
