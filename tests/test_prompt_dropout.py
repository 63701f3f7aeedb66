"""Prompt dropout in flow matching (what classifier-free guidance needs) and guided full-sequence evaluation."""

from __future__ import annotations

import pytest
import torch

from callbacks.evaluate import build_parser, check_args
from callbacks.long_video.protocol import EvalProtocol, Evaluator
from memflow_train.methods import FlowMatchingFinetune
from memflow_train.sampling import seeded
from tests.method_helpers import fit, prompt_batch


def _expected_drops(p: float, step: int, count: int, seed: int = 0) -> list[bool]:
    """The rule written out: sample i is dropped when its own uniform draw, keyed (seed, step, purpose, i),
    is below p."""
    return [float(torch.rand(1, generator=seeded(seed, step, "prompt_dropout", i))) < p for i in range(count)]


def test_dropped_samples_get_the_negative_in_every_real_slot_and_padding_stays() -> None:
    module = FlowMatchingFinetune(model={"preset": "tiny"}, prompt_dropout=0.5)
    batch = prompt_batch(batch=16, prompts=3)
    batch.prompt_mask[:, 2] = False  # slot 2 is padding
    embeds, mask = batch.prompt_embeds.clone(), batch.prompt_mask.clone()
    out, out_mask = module._drop_prompts(batch, embeds, mask, step=7)
    expected = _expected_drops(0.5, 7, 16)
    assert 0 < sum(expected) < 16  # the seed gives both kinds
    for b, dropped in enumerate(expected):
        for slot in range(3):
            real = slot < 2
            if dropped and real:
                assert torch.equal(out[b, slot], batch.negative_embeds[b])
                assert torch.equal(out_mask[b, slot], batch.negative_mask[b])
            else:
                assert torch.equal(out[b, slot], batch.prompt_embeds[b, slot])
                assert torch.equal(out_mask[b, slot], batch.prompt_mask[b, slot])


def test_negative_of_another_length_is_padded_with_masked_zeros() -> None:
    module = FlowMatchingFinetune(model={"preset": "tiny"}, prompt_dropout=0.999)
    batch = prompt_batch(batch=2)
    batch.negative_embeds, batch.negative_mask = batch.negative_embeds[:, :2], batch.negative_mask[:, :2]
    out, out_mask = module._drop_prompts(batch, batch.prompt_embeds, batch.prompt_mask, step=0)
    assert _expected_drops(0.999, 0, 2) == [True, True]
    assert torch.equal(out[:, 0, :2], batch.negative_embeds) and not bool(out[:, 0, 2:].any())
    assert out_mask[:, 0].tolist() == [[True, True, False, False, False, False]] * 2


def test_the_draw_depends_on_the_global_sample_index_not_the_rank_batch() -> None:
    """Rank 1 of two, with 8 samples each, drops exactly samples 8..15 of what one process with 16 drops."""

    class SecondRank(FlowMatchingFinetune):
        global_rank = property(lambda self: 1)

    expected = _expected_drops(0.3, 4, 16)
    assert expected[:8] != expected[8:]
    module = SecondRank(model={"preset": "tiny"}, prompt_dropout=0.3)
    batch = prompt_batch(batch=8)
    out, _ = module._drop_prompts(batch, batch.prompt_embeds, batch.prompt_mask, step=4)
    assert [torch.equal(out[b, 0], batch.negative_embeds[b]) for b in range(8)] == expected[8:]


def _trained(**options) -> FlowMatchingFinetune:
    """A tiny bidirectional flow-matching module after 3 steps from the same initial weights and data."""
    torch.manual_seed(0)
    module = FlowMatchingFinetune(model={"preset": "tiny"}, attention="bidirectional", **options)
    fit(module, 3, latents=True)
    return module


def test_zero_dropout_is_the_conditional_training_bit_for_bit() -> None:
    plain, zero = _trained(), _trained(prompt_dropout=0.0)
    for a, b in zip(plain.parameters(), zero.parameters(), strict=True):
        assert torch.equal(a, b)


def test_training_with_dropout_differs_and_stays_finite() -> None:
    plain, dropped = _trained(), _trained(prompt_dropout=0.5)
    assert all(torch.isfinite(p).all() for p in dropped.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), dropped.parameters(), strict=True))


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan"), True])
def test_bad_dropout_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="prompt_dropout"):
        FlowMatchingFinetune(model={"preset": "tiny"}, prompt_dropout=value)


def test_dropout_without_an_unconditional_prompt_is_named_on_the_first_batch() -> None:
    """Refused at once, also on a batch where no sample happens to be dropped."""
    module = FlowMatchingFinetune(model={"preset": "tiny"}, prompt_dropout=0.001)
    batch = prompt_batch(batch=2)
    assert _expected_drops(0.001, 0, 2) == [False, False]
    batch.negative_embeds = batch.negative_mask = None
    with pytest.raises(ValueError, match="prompt_dropout needs an unconditional prompt"):
        module._drop_prompts(batch, batch.prompt_embeds, batch.prompt_mask, step=0)


def test_a_negative_prompt_that_is_not_used_is_named() -> None:
    with pytest.warns(UserWarning, match="negative_prompt 'blurry' is not used: .* prompt_dropout, which is 0"):
        FlowMatchingFinetune(model={"preset": "tiny"}, negative_prompt="blurry")
    module = FlowMatchingFinetune(model={"preset": "tiny"}, prompt_dropout=0.5, negative_prompt="blurry")
    batch = prompt_batch(batch=2)
    with pytest.warns(UserWarning, match="negative_prompt 'blurry' is not used: the batch's negative embeddings"):
        module._drop_prompts(batch, batch.prompt_embeds, batch.prompt_mask, step=0)


def test_guidance_is_refused_for_streaming_evaluation() -> None:
    with pytest.raises(ValueError, match="guidance_scale 3.0 applies to full-sequence sampling only"):
        Evaluator(EvalProtocol(), guidance_scale=3.0)
    parser = build_parser()
    args = parser.parse_args(["--checkpoint", "x", "--out", "y", "--guidance_scale", "3"])
    with pytest.raises(ValueError, match="--guidance_scale 3.0 applies to full-sequence sampling only"):
        check_args(args)
    args = parser.parse_args(
        ["--checkpoint", "x", "--out", "y", "--guidance_scale", "-1", "--full_sequence_steps", "2"]
    )
    with pytest.raises(ValueError, match="--guidance_scale"):
        check_args(args)


def test_a_negative_prompt_without_guidance_is_refused_by_the_evaluation() -> None:
    """Unguided sampling (guidance_scale 1) never reads the negative prompt: asking for one is refused."""
    with pytest.raises(ValueError, match="negative_prompt 'blurry' is the unconditional prompt of guided sampling"):
        Evaluator(EvalProtocol(), full_sequence_steps=2, negative_prompt="blurry")
    given = ["--checkpoint", "x", "--out", "y", "--full_sequence_steps", "2", "--negative_prompt", "blurry"]
    with pytest.raises(ValueError, match="--negative_prompt 'blurry' is the unconditional prompt of guided sampling"):
        check_args(build_parser().parse_args(given))
    check_args(build_parser().parse_args([*given, "--guidance_scale", "3"]))  # guided: read
