"""The object-permanence world the study trains on: its autoencoder's round trip, its data, the teacher's
sampler, the comparison report, and the study pipeline end to end at test scale."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from callbacks.long_video.world import WorldConsistency, autoencoder_readback, bootstrap_interval
from data.synthetic.autoencoder import AutoencoderSpec, fit_autoencoder, world_frames
from data.synthetic.permanence_data import PermanenceSpec, build_permanence_world
from data.synthetic.world import permanence_narrative, render, vocabulary, window
from memflow_train.models.text_encoder import WanTextEncoder
from memflow_train.models.vae import PatchAutoencoder, load_vae
from memflow_train.sampling import FlowMatchSchedule
from memflow_train.sampling.full_sequence import sample_full_sequence

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def autoencoder() -> PatchAutoencoder:
    return fit_autoencoder(AutoencoderSpec())


def test_the_world_autoencoder_round_trip_reads_back(autoencoder: PatchAutoencoder) -> None:
    """The bound the study needs: encoding and decoding held-out ground truth reads back with scene accuracy
    >= 0.99, subject recall >= 0.98 and size error <= 0.5 px at the study's resolution."""
    frames, notes = world_frames(AutoencoderSpec(), 40, seed=123)  # narratives the fit never saw
    values = autoencoder_readback(autoencoder, frames, notes)
    assert values["scene_accuracy"] >= 0.99, values
    assert values["subject_recall"] >= 0.98, values
    assert values["size_error_px"] <= 0.5, values


def test_patch_autoencoder_whitening_sets_each_channels_variance() -> None:
    """On the fitted frames, channel k's variance is std_k ** (2 - 2 w) / mean(std ** (2 - 2 w)): all 1 at w = 1,
    the components' own (relative) variances at w = 0, their square roots at w = 0.5."""
    frames, _ = world_frames(AutoencoderSpec(), 6, seed=3)

    def variances(w: float) -> torch.Tensor:
        z = PatchAutoencoder.fit(frames, 8, 16, whitening=w).encode(frames[None])
        return z.double().var((0, 2, 3, 4))

    one, own, half = variances(1.0), variances(0.0), variances(0.5)
    assert torch.allclose(one, torch.ones(16, dtype=torch.float64), atol=1e-3)
    assert abs(float(own.mean()) - 1) < 1e-3 and bool((own[:-1] >= own[1:]).all())
    assert torch.allclose(half, own.sqrt() / own.sqrt().mean(), atol=1e-3)
    with pytest.raises(ValueError, match="whitening"):
        PatchAutoencoder.fit(frames, 8, 16, whitening=1.5)


def test_patch_autoencoder_latents_storage_and_refusals(autoencoder: PatchAutoencoder, tmp_path: Path) -> None:
    frames, _ = world_frames(AutoencoderSpec(), 4, seed=7)
    video = frames[None, :12]
    z = autoencoder.encode(video)
    assert z.shape == (1, 64, 12, 8, 8) and autoencoder.temporal_stride == 1 and autoencoder.spatial_stride == 8
    all_z = autoencoder.encode(world_frames(AutoencoderSpec(), 20, seed=8)[0][None])
    variance = all_z.var((0, 2, 3, 4))
    assert abs(float(variance.mean()) - 1) < 0.3 and variance[0] > 10 * variance[-1]  # unit on average, ordered
    decoded = autoencoder.decode(z)
    palette = {tuple(c) for c in autoencoder.to_uint8(decoded).reshape(-1, 3).tolist()}
    world = {tuple(c) for c in ((autoencoder.vae.palette + 1) * 127.5).round().int().tolist()}
    assert palette <= world and len(world) == 16  # snapped to the world's 16 colours
    streamed = autoencoder.streaming_decoder()
    assert torch.equal(torch.cat([streamed.decode(z[:, :, :5]), streamed.decode(z[:, :, 5:])], 2), decoded)
    autoencoder.save_pretrained(tmp_path)
    loaded = load_vae(tmp_path)
    assert isinstance(loaded, PatchAutoencoder) and torch.equal(loaded.decode(loaded.encode(video)), decoded)
    with pytest.raises(ValueError, match="z_dim 193"):
        PatchAutoencoder.fit(frames, 8, 193)
    with pytest.raises(ValueError, match="not whole 7px patches"):
        PatchAutoencoder.fit(frames, 7, 8)
    noisy = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="more than max_colours"):
        PatchAutoencoder.fit(noisy, 8, 8)
    with pytest.raises(NotImplementedError, match="normalised when it is fitted"):
        autoencoder.calibrate(video)


def test_a_window_renders_as_the_whole_narrative_shows_it() -> None:
    import random

    narrative = permanence_narrative(random.Random(0), 3, 6, 9, 3)
    part = window(narrative, 12, 24)
    assert part.num_frames == 24 and part.switch_frames == [6, 12, 21]
    assert [s.subjects for s in part.segments] == [(0,), (0, 1), (0,), (0, 1)]
    whole, notes = render(narrative, 32, 32, 1)
    video, part_notes = render(narrative, 32, 32, 1, span=(12, 24))
    assert np.array_equal(video, whole[12:36])
    assert [n["subjects"] for n in part_notes] == [n["subjects"] for n in notes[12:36]]
    assert part_notes[0]["segment"] == 0 and part_notes[-1]["segment"] == 3 and part_notes[0]["frame"] == 0
    with pytest.raises(ValueError, match="outside the narrative"):
        window(narrative, 40, 24)
    with pytest.raises(ValueError, match="temporal stride 1"):
        render(narrative, 32, 32, 4, span=(0, 3))


def test_every_caption_is_in_the_word_level_vocabulary() -> None:
    import random

    encoder = WanTextEncoder.tiny(d_model=8, text_len=40, vocabulary=vocabulary())
    rng = random.Random(1)
    for _ in range(20):
        for prompt in permanence_narrative(rng, 3, 6, 9, 2).prompts:
            assert "<unk>" not in encoder.tokenizer.tokenize(prompt), prompt


def test_the_permanence_world_builds_resumes_and_refuses_other_settings(tmp_path: Path) -> None:
    small = dict(teacher_clips=4, student_clips=4, long_narratives=2, val_clips=2, benchmark_narratives=3)
    spec = PermanenceSpec(benchmark_returns=2, autoencoder=AutoencoderSpec(narratives=20), **small)
    world = build_permanence_world(spec, tmp_path / "w", log=lambda m: None)
    assert set(world.urls) == {"teacher", "clips", "long", "val"}
    lines = [json.loads(line) for line in world.benchmark.read_text().splitlines()]
    assert len(lines) == 3 and lines[0]["num_frames"] == 3 + 6 + 2 * 15
    short = [json.loads(line) for line in (tmp_path / "w" / "benchmark_short.jsonl").read_text().splitlines()]
    assert short[0]["num_frames"] == spec.clip_frames  # held-out narratives of the training length
    before = (tmp_path / "w" / "teacher-000000.tar").stat().st_mtime_ns
    assert build_permanence_world(spec, tmp_path / "w", log=lambda m: None).urls == world.urls  # resumes: no work
    assert (tmp_path / "w" / "teacher-000000.tar").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="other settings"):
        build_permanence_world(PermanenceSpec(benchmark_returns=3, **small), tmp_path / "w", log=lambda m: None)
    with pytest.raises(ValueError, match="multiple of world.chunk"):
        PermanenceSpec(away_frames=8)


def test_clips_share_their_switch_frames_and_windows_vary(tmp_path: Path) -> None:
    from data.synthetic.datamodule import PermanenceDataModule

    small = dict(teacher_clips=6, student_clips=4, long_narratives=2, val_clips=2, benchmark_narratives=2)
    spec = PermanenceSpec(autoencoder=AutoencoderSpec(narratives=20), **small)
    starts = {}
    for split in ("clips", "teacher"):
        module = PermanenceDataModule(split, spec, str(tmp_path / "w"), batch_size=2, num_workers=0, dtype="float32")
        module.setup("fit")
        batches = [b for _, b in zip(range(3), module.train_dataloader(), strict=False)]
        assert batches[0].latents.shape[1:] == (64, 24, 8, 8)
        starts[split] = {tuple(row) for b in batches for row in b.segment_start.tolist()}
    assert starts["clips"] == {(0, 3, 9, 18)}  # every clip opens its narrative: lead, present, away, back
    assert len(starts["teacher"]) > 1  # random windows


def test_full_sequence_sampling_is_euler_on_the_shifted_schedule() -> None:
    """A model whose flow is a constant c: after all steps x = noise + (0 - 1) * c exactly, and one step with
    guidance g mixes the conditional and unconditional flows as uncond + g (cond - uncond)."""

    class Constant(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, float(text))

    noise = torch.randn(1, 2, 3, 2, 2)
    schedule = FlowMatchSchedule(3.0)
    out = sample_full_sequence(Constant(), schedule, noise, torch.tensor(0.5), steps=7)
    assert torch.allclose(out, noise - 0.5, atol=1e-6)
    guided = sample_full_sequence(Constant(), schedule, noise, torch.tensor(2.0), 1, torch.tensor(1.0), 3.0)
    assert torch.allclose(guided, noise - (1.0 + 3.0 * (2.0 - 1.0)), atol=1e-6)
    with pytest.raises(ValueError, match="needs a negative prompt"):
        sample_full_sequence(Constant(), schedule, noise, torch.tensor(0.5), 2, guidance_scale=2.0)


def test_bootstrap_intervals_pool_counts_and_pair_variants() -> None:
    def counts(errors: float, reentries: float) -> dict[str, float]:
        base = dict.fromkeys(WorldConsistency.COUNTS, 1.0)
        return {**base, "reentry_size_error": errors, "reentries": reentries}

    same = [counts(2.0, 1.0)] * 5
    lo, hi = bootstrap_interval([same], "world/reentry_size_error_px")
    assert lo == hi == 2.0  # every resample pools to 2 px
    better = [counts(1.0, 1.0)] * 5
    lo, hi = bootstrap_interval([better, same], "world/reentry_size_error_px")
    assert lo == hi == -1.0  # paired: the same narratives in both
    mixed = [counts(0.0, 1.0), counts(4.0, 1.0)] * 10
    lo, hi = bootstrap_interval([mixed], "world/reentry_size_error_px", resamples=4000)
    assert 1.0 < lo < 2.0 < hi < 3.0 and math.isclose(WorldConsistency.ratios(
        {k: sum(c[k] for c in mixed) for k in mixed[0]})["world/reentry_size_error_px"], 2.0)  # fmt: skip
    with pytest.raises(ValueError, match="same narratives"):
        bootstrap_interval([same, same[:2]], "world/reentry_size_error_px")


@pytest.mark.slow
def test_the_study_runs_end_to_end_at_test_scale(tmp_path: Path) -> None:
    """Every stage of python -m memflow_train.study (world, teacher, its check, causal init, stage 1 and 2,
    evaluations, report) runs with a few steps each for one variant (the paired comparison of two variants is
    test_bootstrap_intervals_pool_counts_and_pair_variants'), and a second run resumes (skips them all)."""
    out = tmp_path / "study"
    command = [sys.executable, "-m", "memflow_train.study", "--out", str(out), "--scale", "test", "--variants", "sma"]
    first = subprocess.run([*command, "--until", "eval-teacher"], cwd=REPO, capture_output=True, text=True,
                           timeout=900)  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert sorted(p.parent.name for p in out.glob("*/DONE")) == ["eval-teacher", "teacher", "world"]
    rest = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert rest.returncode == 0, rest.stdout[-3000:] + rest.stderr[-3000:]
    results = (out / "report" / "results.md").read_text()
    for name in ("eval-teacher", "eval-init", "eval-stage1-sma", "eval-stage2-sma", "bench-stage2-sma"):
        assert name in results
    assert (out / "report" / "figure.png").stat().st_size > 0
    rows = json.loads((out / "report" / "results.json").read_text())
    assert {r["name"] for r in rows} >= {"eval-stage2-sma", "bench-stage2-sma"}
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout.count(": done (") == 11, second.stdout  # every stage


def test_the_study_refuses_an_unknown_stage_to_stop_after(capsys: pytest.CaptureFixture[str]) -> None:
    from memflow_train.study import main

    with pytest.raises(SystemExit) as stop:
        main(["--until", "stage3-nam", "--variants", "nam"])
    assert stop.value.code == 2
    assert "--until stage3-nam: not a stage of this study; its stages are world, teacher" in capsys.readouterr().err
