"""Streaming long tuning: the sequence grows across steps, switches prompt once, restarts at max length."""

from __future__ import annotations

import pytest
import torch

from memflow_train.memory import NAM
from memflow_train.methods import StreamingLongTuning
from tests.method_helpers import dmd_module, fit


def test_sequence_grows_switches_once_with_recache_and_restarts() -> None:
    module = dmd_module(StreamingLongTuning, max_length=18, frames_per_step=6, window=9, min_switch_frame=6)
    lengths, switches, recaches = [], [], []
    original_recache = module.sampler.recache

    def spy_recache(stream, text, rows=None):
        recaches.append(stream.next_frame)
        original_recache(stream, text, rows)

    module.sampler.recache = spy_recache
    original_step = module.training_step

    def step(batch, batch_idx):
        original_step(batch, batch_idx)
        lengths.append(module.sequence.length)
        switches.append(module.sequence.switch_frame)

    module.training_step = step
    fit(module, steps=7, prompts=2)
    assert lengths == [6, 12, 18, 6, 12, 18, 6]
    # One switch frame per sequence, on the chunk grid, drawn once when the sequence starts.
    assert switches[0] == switches[1] == switches[2] and switches[3] == switches[4] == switches[5]
    assert all(6 <= s < 18 and s % 3 == 0 for s in switches)
    # Exactly one recache per completed sequence, at its switch frame.
    assert recaches == [switches[0], switches[3]]


def test_memory_stays_bounded_over_long_sequences() -> None:
    memory = NAM(record_interval=1, bank_size=2, sma=True, sma_topk=2)
    module = dmd_module(StreamingLongTuning, memory=memory, max_length=60, frames_per_step=6, window=9)
    sizes = []
    original_step = module.training_step

    def step(batch, batch_idx):
        original_step(batch, batch_idx)
        sizes.append(module.sequence.stream.cache.nbytes())
        for layer in module.sequence.stream.cache.layers:
            assert len(layer.memory) <= 2

    module.training_step = step
    fit(module, steps=9, prompts=2)
    assert module.sequence.length == 54
    assert len(module.sequence.stream.cache[0].memory) == 2
    assert sizes[-1] == sizes[-3]  # steady state


def test_loss_reaches_only_the_new_frames() -> None:
    module = dmd_module(StreamingLongTuning, max_length=18, frames_per_step=6, window=9)
    fit(module, steps=1, prompts=2)
    state = module.sequence
    window, mask = module.continue_sequence(state, step=1, grad=True)
    assert window.shape[2] == 9 and mask[0, 0, :, 0, 0].tolist() == [False] * 3 + [True] * 6
    assert window.requires_grad
    loss, _ = module.distribution_matching_loss(window, state.texts.embeds[:, 0], state.texts.negative, 1, mask)
    (grad,) = torch.autograd.grad(loss, window)
    assert torch.equal(grad[:, :, :3], torch.zeros_like(grad[:, :, :3]))
    assert grad[:, :, 3:].abs().sum() > 0


def test_single_prompt_samples_keep_their_prompt_after_the_switch() -> None:
    module = dmd_module(StreamingLongTuning, max_length=18, frames_per_step=6, window=9)
    from tests.method_helpers import prompt_batch

    batch = prompt_batch(prompts=2)
    batch.prompt_embeds[1, 1] = 0
    batch.prompt_mask[1, 1] = False
    state = module._start_sequence(batch, step=0)
    assert torch.equal(state.texts.embeds[1, 1], state.texts.embeds[1, 0])
    assert not torch.equal(state.texts.embeds[0, 1], state.texts.embeds[0, 0])


def test_changed_memory_at_resume_drops_the_carried_sequence() -> None:
    from memflow_train.methods.hparams import plain

    module = dmd_module(StreamingLongTuning, max_length=18, frames_per_step=6, window=9)
    checkpoint = {"hyper_parameters": {"memory": plain(module.memory)}, "sequence_state": {"stream": {}}}
    module.on_load_checkpoint(dict(checkpoint))
    assert module._pending_state is not None  # same memory: the sequence continues
    other = dmd_module(StreamingLongTuning, max_length=18, frames_per_step=6, window=9,
                       memory=NAM(record_interval=1, sma=True))  # fmt: skip
    with pytest.warns(UserWarning, match="memory settings changed at resume"):
        other.on_load_checkpoint(dict(checkpoint))
    assert other._pending_state is None


def test_each_sample_follows_its_fixed_switches_or_the_drawn_one() -> None:
    """A batch mixing a narrative with fixed switches and a prompt pair: the narrative keeps its own switch and
    per-frame prompts in the window; the pair switches at the drawn frame and is scored under the prompt at the
    window's end. The sequence ends with the fixed narrative."""
    from tests.method_helpers import prompt_batch

    module = dmd_module(StreamingLongTuning, max_length=18, frames_per_step=6, window=9, min_switch_frame=6)
    batch = prompt_batch(prompts=2)
    batch.segment_start[0, 1], batch.segment_start[1, 1] = 3, -1
    batch.num_frames = torch.tensor([12, 99])
    state = module._start_sequence(batch, step=0)
    assert state.end == 12 and state.drawn.tolist() == [False, True] and state.texts.fixed.all()
    assert state.texts.starts().tolist() == [[0, 3], [0, state.switch_frame]] and state.switch_frame in (6, 9)
    module.sequence = state
    module.continue_sequence(state, step=0, grad=False)
    module.continue_sequence(state, step=1, grad=False)
    end_slot = 1 if state.switch_frame < 12 else 0
    whole = module._window_condition(state, 12)  # frames 0..11: row 0 switches at 3
    assert whole.frame_prompt.tolist() == [[0] * 3 + [1] * 9, [end_slot] * 12]
    window = module._window_condition(state, 9)  # frames 3..11: no row switches inside, the plain states
    assert torch.equal(window, torch.stack([state.texts.embeds[0, 1], state.texts.embeds[1, end_slot]]))


def test_a_sequence_cut_short_by_a_fixed_narrative_names_the_switch_it_skips() -> None:
    from tests.method_helpers import prompt_batch

    module = dmd_module(StreamingLongTuning, max_length=18, frames_per_step=6, window=9, min_switch_frame=9)
    batch = prompt_batch(prompts=2)
    batch.segment_start[0, 1], batch.segment_start[1, 1] = 3, -1
    batch.num_frames = torch.tensor([6, 99])
    with pytest.warns(UserWarning, match="ends at frame 6 .* before min_switch_frame takes effect \\(frame 9\\)"):
        state = module._start_sequence(batch, step=0)
    assert state.end == 6 and state.texts.starts()[1].tolist() == [0, state.switch_frame] and state.switch_frame >= 9
