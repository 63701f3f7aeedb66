"""Flow matching on a batch of mixed lengths: each sample trains on its own whole chunks, never the shortest's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from memflow_train.methods import FlowMatchingFinetune


def _batch(lengths: list[int], padding: float = 0.0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(len(lengths), 4, max(lengths), 4, 4, generator=g)
    for i, n in enumerate(lengths):
        latents[i, :, n:] = padding
    return SimpleNamespace(
        keys=[f"s{i}" for i in range(len(lengths))],
        prompts=[["p"]] * len(lengths),
        latents=latents,
        num_frames=torch.tensor(lengths),
        prompt_embeds=torch.randn(len(lengths), 1, 6, 16, generator=g),
        prompt_mask=torch.ones(len(lengths), 1, 6, dtype=torch.bool),
    )


def test_each_sample_keeps_its_own_chunks_and_padding_never_counts() -> None:
    module = FlowMatchingFinetune(model={"preset": "tiny"})
    batch = _batch([12, 3])
    frames, chunks = module._frames(batch)
    assert frames.shape[2] == 12 and chunks.tolist() == [4, 1]  # not cut to the 3-frame sample
    caption, mask = batch.prompt_embeds, batch.prompt_mask
    with torch.no_grad():
        loss = module.flow_matching_loss(frames, caption, mask, step=0, sample_chunks=chunks)
        other, _ = module._frames(_batch([12, 3], padding=5.0))
        assert torch.equal(loss, module.flow_matching_loss(other, caption, mask, step=0, sample_chunks=chunks))
        everything = module.flow_matching_loss(frames, caption, mask, step=0)
    assert not torch.equal(loss, everything)  # the padded chunks of the short sample were left out
    capped = FlowMatchingFinetune(model={"preset": "tiny"}, max_frames=6)
    assert capped._frames(batch)[1].tolist() == [2, 1]


def test_a_sample_shorter_than_a_chunk_is_named() -> None:
    with pytest.raises(
        ValueError, match=r"samples \['s1'\] have fewer latent frames than one chunk .*min_latent_frames"
    ):
        FlowMatchingFinetune(model={"preset": "tiny"})._frames(_batch([12, 2]))
