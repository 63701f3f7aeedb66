"""A prompt per frame (narratives whose prompt switches inside a sequence): full-sequence forwards, streaming
rollouts with different switches per sample, and the methods that use them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from memflow_train.memory import NAM, MemoryFree
from memflow_train.memory.window import AttentionWindow
from memflow_train.methods import FlowMatchingFinetune
from memflow_train.models.causal_wan import CausalWanTransformer, FramePrompts, TextContext
from memflow_train.models.presets import wan_config
from memflow_train.rollout import PromptSchedule, StreamingGenerator
from memflow_train.sampling import FlowMatchSchedule
from tests.method_helpers import dmd_module, prompt_batch


def _model() -> CausalWanTransformer:
    torch.manual_seed(0)
    return CausalWanTransformer(**wan_config("tiny")).eval()


@torch.no_grad()
def test_each_frame_is_conditioned_by_its_own_prompt() -> None:
    """Oracle: with a window of one frame and no sink every frame attends only itself, so frame f of a mixed
    sequence equals frame f of the whole sequence under prompt frame_prompt[f] alone."""
    model, g = _model(), torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 4, 4, generator=g)
    t = torch.rand(2, 5, generator=g) * 1000
    embeds = torch.randn(2, 3, 6, 16, generator=g)
    mask = torch.ones(2, 3, 6, dtype=torch.bool)
    frame_prompt = torch.tensor([[0, 0, 1, 2, 2], [2, 1, 1, 0, 1]])
    alone = AttentionWindow(num_frame_per_block=1, local_attn_size=1, sink_size=0)
    mixed = model(x, t, FramePrompts(embeds, mask, frame_prompt), window=alone)
    for p in range(3):
        whole = model(x, t, embeds[:, p], window=alone)
        chosen = (frame_prompt == p)[:, None, :, None, None].expand_as(whole)
        assert torch.equal(mixed[chosen], whole[chosen])


@torch.no_grad()
def test_one_prompt_for_every_frame_equals_the_plain_forward() -> None:
    model, g = _model(), torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 6, 4, 4, generator=g), torch.tensor([500.0, 20.0])
    embeds, mask = torch.randn(2, 2, 6, 16, generator=g), torch.ones(2, 2, 6, dtype=torch.bool)
    plain = model(x, t, embeds[:, 1])
    assert torch.allclose(model(x, t, FramePrompts(embeds, mask, torch.ones(2, 6, dtype=torch.long))), plain, atol=1e-6)
    assert torch.equal(model(x, t, FramePrompts.single(embeds[:, 1], mask[:, 1], 6)), plain)


def test_segments_give_each_frame_its_prompt_and_bad_input_is_refused() -> None:
    starts = torch.tensor([[0, 3, 7], [0, 5, 9]])
    prompts = FramePrompts.from_segments(torch.zeros(2, 3, 4, 16), torch.ones(2, 3, 4, dtype=torch.bool), starts, 9)
    assert prompts.frame_prompt.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1]]
    offset = FramePrompts.from_segments(prompts.embeds, prompts.mask, starts, 3, offset=6)
    assert offset.frame_prompt.tolist() == [[1, 2, 2], [1, 1, 1]]
    with pytest.raises(ValueError, match="fixed"):
        FramePrompts.from_segments(prompts.embeds, prompts.mask, torch.tensor([[0, -1, 7], [0, 5, 9]]), 9)
    with pytest.raises(ValueError, match="outside"):
        FramePrompts(prompts.embeds, prompts.mask, torch.full((2, 9), 3))
    with pytest.raises(ValueError, match="covers 9 frames, the input has 5"):
        _model()(torch.zeros(2, 4, 5, 4, 4), torch.zeros(2), prompts)
    with pytest.raises(ValueError, match="streaming takes one prompt per chunk"):
        model = _model()
        model(torch.zeros(2, 4, 3, 4, 4), torch.zeros(2), prompts, cache=model.new_kv_cache(NAM()))


@torch.no_grad()
@pytest.mark.parametrize("different", [False, True])
def test_a_batch_of_narratives_equals_each_narrative_generated_alone(different: bool) -> None:
    """Samples with their own prompts, switching at the same or at different frames (each recaches only its own
    cache), give what each gives alone."""
    model, g = _model(), torch.Generator().manual_seed(3)
    memory = NAM(bank_size=2, record_interval=1, sink_size=3, local_attn_size=6, num_frame_per_block=3)
    sampler = StreamingGenerator(model, FlowMatchSchedule(), [1000], memory)  # one step: no renoising draws
    texts = [model.encode_text(torch.randn(2, 6, 16, generator=g)) for _ in range(3)]
    starts = torch.tensor([[0, 6, 12], [0, 9, 18]] if different else [[0, 6, 12], [0, 6, 12]])
    real = torch.tensor([[True, True, True], [True, True, not different]])
    noise = torch.randn(2, 4, 18, 4, 4, generator=g)
    both = sampler.rollout(sampler.new_stream(), noise, PromptSchedule.per_sample(texts, starts, real))
    for b in range(2):
        one = [TextContext([k[b : b + 1] for k in c.keys], [v[b : b + 1] for v in c.values]) for c in texts]
        segments = [(int(f), t) for f, t, r in zip(starts[b], one, real[b], strict=True) if r]
        alone = sampler.rollout(sampler.new_stream(), noise[b : b + 1], PromptSchedule(segments))
        assert torch.allclose(both[b : b + 1], alone, atol=1e-5)


def test_per_sample_schedules_refuse_what_they_cannot_follow() -> None:
    text = _model().encode_text(torch.zeros(2, 6, 16))
    both = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="increase strictly"):
        PromptSchedule.per_sample([text, text], torch.tensor([[0, 0], [0, 3]]), both)
    with pytest.raises(ValueError, match="fixed"):
        PromptSchedule.per_sample([text, text], torch.tensor([[0, -1], [0, 3]]), both)
    with pytest.raises(ValueError, match="frame 0"):
        PromptSchedule.per_sample([text, text], torch.tensor([[1, 4], [0, 3]]), both)
    shared = PromptSchedule.per_sample([text, text], torch.tensor([[0, 3], [0, 3]]), both)
    assert shared.sample_starts is None and shared.switches_in(0, 10) == [3] and shared.at(4) is text
    padded = PromptSchedule.per_sample(
        [text, text], torch.tensor([[0, -1], [0, 3]]), torch.tensor([[1, 0], [1, 1]]).bool()
    )
    assert padded.slots(5).tolist() == [0, 1] and padded.switching(3, 3).tolist() == [False, True]


def test_a_recache_that_moves_the_sink_of_some_samples_only_is_refused() -> None:
    model, g = _model(), torch.Generator().manual_seed(4)
    memory = MemoryFree(sink_size=3, local_attn_size=6, num_frame_per_block=3, recache_sink="replace")
    sampler = StreamingGenerator(model, FlowMatchSchedule(), [1000], memory)
    texts = [model.encode_text(torch.randn(2, 6, 16, generator=g)) for _ in range(2)]
    schedule = PromptSchedule.per_sample(texts, torch.tensor([[0, 6], [0, 9]]), torch.ones(2, 2, dtype=torch.bool))
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot share a stream in this mode"):
        sampler.rollout(sampler.new_stream(), torch.randn(2, 4, 12, 4, 4, generator=g), schedule)


def _narrative_batch(switch: int) -> SimpleNamespace:
    batch = prompt_batch(batch=2, prompts=2, latents=True)
    batch.segment_start[:, 1] = switch
    return batch


def test_dmd_follows_the_narratives_switches() -> None:
    """With fixed switch frames the rollout switches prompt (recache) and the teacher and critic see each frame's
    prompt: changing the second prompt changes the frames after the switch and the DMD loss, not those before.
    Without fixed switches (-1) prompt 0 conditions everything, as before."""
    module = dmd_module()
    fixed = module._texts(_narrative_batch(3))
    assert fixed.fixed.all() and module.condition(fixed, 6).frame_prompt.tolist() == [[0, 0, 0, 1, 1, 1]] * 2
    free = module._texts(prompt_batch(batch=2, prompts=2))
    assert not free.fixed.any() and torch.equal(module.condition(free, 6), free.embeds[:, 0])
    with torch.no_grad():
        x = module.rollout(fixed, 0, "t", grad=False)
        loss, _ = module.distribution_matching_loss(x, module.condition(fixed, 6), fixed.negative, 0)
        other = _narrative_batch(3)
        other.prompt_embeds[:, 1] += 1.0
        changed = module._texts(other)
        x2 = module.rollout(changed, 0, "t", grad=False)
        assert torch.equal(x[:, :, :3], x2[:, :, :3]) and not torch.equal(x[:, :, 3:], x2[:, :, 3:])
        loss2, _ = module.distribution_matching_loss(x, module.condition(changed, 6), fixed.negative, 0)
    assert not torch.equal(loss, loss2)


def test_dmd_decides_per_sample_whether_it_follows_switches() -> None:
    """A batch mixing a narrative with fixed switches and a sample without: each is conditioned as it would be in
    a batch of its own kind (so ranks holding different mixes train like one process), with a warning naming
    the sample left to its first prompt."""
    module = dmd_module()
    mixed_batch = _narrative_batch(3)
    mixed_batch.segment_start[1, 1] = -1
    with pytest.warns(UserWarning, match="1 samples of a batch have several prompts but no switch frames fixed"):
        mixed = module._texts(mixed_batch)
    assert mixed.fixed.tolist() == [True, False]
    assert module.condition(mixed, 6).frame_prompt.tolist() == [[0, 0, 0, 1, 1, 1], [0] * 6]
    fixed, free = module._texts(_narrative_batch(3)), module._texts(_narrative_batch(-1))
    with torch.no_grad():
        x = module.rollout(mixed, 0, "t", grad=False)
        assert torch.allclose(x[0], module.rollout(fixed, 0, "t", grad=False)[0], atol=1e-5)
        assert torch.allclose(x[1], module.rollout(free, 0, "t", grad=False)[1], atol=1e-5)


def test_every_prompt_slot_is_encoded_in_one_forward() -> None:
    """Under parameter sharding every forward is a collective: the slot count of a rank's batch must not change
    how many forwards the text projection runs. The slots' contexts equal one encode_text per slot."""
    model = _model()
    calls = []
    model.condition_embedder.text_embedder.register_forward_hook(lambda *_: calls.append(1))
    states, mask = torch.randn(2, 3, 6, 16), torch.ones(2, 3, 6, dtype=torch.bool)
    contexts = model.encode_text_slots(states, mask)
    assert len(calls) == 1 and len(contexts) == 3
    for p, context in enumerate(contexts):
        alone = model.encode_text(states[:, p], mask[:, p])
        for a, b in zip(context.keys + context.values, alone.keys + alone.values, strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    calls.clear()
    model.encode_text_slots(states[:, :1], mask[:, :1])
    assert len(calls) == 1


@pytest.mark.parametrize("attention", ["streaming", "bidirectional"])
def test_flow_matching_conditions_each_chunk_with_its_prompt(attention: str) -> None:
    module = FlowMatchingFinetune(model={"preset": "tiny"}, attention=attention, memory=NAM(record_interval=1))
    batch = _narrative_batch(3)
    with torch.no_grad():
        embeds, mask, starts = module._prompts(batch)
        assert starts is not None and starts.tolist() == [[0, 3], [0, 3]]
        frames, chunks = module._frames(batch)
        loss = module.flow_matching_loss(frames, embeds, mask, 0, chunks, starts)
        first_only = module.flow_matching_loss(frames, embeds[:, :1], mask[:, :1], 0, chunks, None)
        late = module.flow_matching_loss(frames, embeds, mask, 0, chunks, torch.tensor([[0, 99], [0, 99]]))
    assert not torch.equal(loss, first_only) and torch.allclose(late, first_only, atol=1e-6)


def test_bidirectional_flow_matching_trains_samples_of_each_length_alone() -> None:
    module = FlowMatchingFinetune(model={"preset": "tiny"}, attention="bidirectional")
    batch = prompt_batch(batch=2, latents=True)
    frames, _ = module._frames(batch)
    embeds, mask, _ = module._prompts(batch)
    with torch.no_grad():
        mixed = module.flow_matching_loss(frames, embeds, mask, 0, torch.tensor([2, 1]))
        padded = frames.clone()
        padded[1, :, 3:] = 7.0  # the short sample's padding never reaches it
        assert torch.equal(mixed, module.flow_matching_loss(padded, embeds, mask, 0, torch.tensor([2, 1])))
    with pytest.raises(ValueError, match="attention must be"):
        FlowMatchingFinetune(model={"preset": "tiny"}, attention="causal")
