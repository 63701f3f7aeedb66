"""The synthetic world's ground truth agrees with its pixels and captions; the demo dataset builds on first use."""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser

from data.format import SampleSpec, decode_sample
from data.prepare.__main__ import main as prepare_main
from data.reading import expand_urls, iter_raw_samples
from data.synthetic.__main__ import main as synthetic_main
from data.synthetic.demo import DemoSpec, demo_dataset
from data.synthetic.world import COLOURS, SCENES, Narrative, narratives_jsonl, render, sample_narrative
from memflow_train.models.text_encoder import WanTextEncoder
from memflow_train.models.vae import WanVAE

SPEC = DemoSpec(num_train=8, num_val=4, train_per_shard=4, val_per_shard=2)


def test_annotations_match_segments_and_captions() -> None:
    rng = random.Random(0)
    for _ in range(20):
        n = sample_narrative(rng, [3, 6, 3, 3, 6])
        video, notes = render(n, 32, 48)
        assert video.shape == (1 + 4 * (n.num_frames - 1), 32, 48, 3) and len(notes) == len(video)
        looks = {}
        for note in notes:
            seg = n.segments[note["segment"]]
            assert [s["id"] for s in note["subjects"]] == list(seg.subjects) and note["scene"] == seg.scene
            assert sum(s.frames for s in n.segments[: note["segment"]]) <= note["latent_frame"]
            for s in note["subjects"]:
                looks.setdefault(s["id"], (s["shape"], s["colour"], s["size"]))
                assert looks[s["id"]] == (s["shape"], s["colour"], s["size"])  # a subject never changes looks
        for seg, prompt in zip(n.segments, n.prompts, strict=True):
            assert seg.scene in prompt and all(n.subjects[i].name in prompt for i in seg.subjects)


def test_some_subject_leaves_and_returns_in_longer_narratives() -> None:
    rng = random.Random(1)
    for _ in range(50):
        n = sample_narrative(rng, [40] * 6)
        returns = [(k, i) for k, seg in enumerate(n.segments) for i in seg.returning]
        assert returns
        for k, i in returns:
            assert i not in n.segments[k - 1].subjects and any(i in s.subjects for s in n.segments[: k - 1])
            assert "comes back" in n.prompts[k] or "come back" in n.prompts[k]


def test_pixels_show_the_annotated_world() -> None:
    n = sample_narrative(random.Random(2), [3, 3, 3])
    video, notes = render(n, 64, 64)
    for frame, note in zip(video, notes, strict=True):
        upper, lower, horizon = SCENES[note["scene"]]
        assert tuple(frame[0, 0]) in (upper, *[COLOURS[s["colour"]] for s in note["subjects"]])
        top = note["subjects"][-1]  # drawn last, so nothing covers its centre
        x, y = int(top["x"] * 64), int(top["y"] * 64)
        assert tuple(frame[y, x]) == COLOURS[top["colour"]]
    again, _ = render(Narrative.from_json(json.loads(json.dumps(n.to_json()))), 64, 64)
    assert np.array_equal(video, again)


def test_narrative_sets_feed_the_preparation_command(tmp_path: Path) -> None:
    synthetic_main(["narratives", "--out", str(tmp_path / "n.jsonl"), "--count", "3", "--segments", "3"])
    synthetic_main(["narratives", "--out", str(tmp_path / "n.jsonl"), "--count", "3", "--segments", "3"])
    lines = (tmp_path / "n.jsonl").read_text().splitlines()
    assert lines == narratives_jsonl(3, [40, 40, 40], seed=0)  # seeded: the same set every time
    urls = prepare_main(["narratives", str(tmp_path / "n.jsonl"), "--output", str(tmp_path / "out"), "--quiet"])
    samples = [
        decode_sample(r, SampleSpec(fields=())) for u in expand_urls(urls) for r in iter_raw_samples(u, pytest.fail)
    ]
    for s, line in zip(samples, lines, strict=True):
        record = json.loads(line)
        assert (s.prompts, s.switch_frames, s.num_frames) == (record["prompts"], [40, 80], 120)
        assert Narrative.from_json(record["world"]).prompts == s.prompts


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return demo_dataset(SPEC, tmp_path_factory.mktemp("cache"))


def test_demo_is_built_once_with_its_encoders(demo) -> None:
    assert demo.train_urls == f"{demo.root}/train-{{000000..000001}}.tar"
    assert demo.val_urls == f"{demo.root}/val-{{000000..000001}}.tar"
    stamp = (demo.root / "spec.json").stat().st_mtime_ns
    assert demo_dataset(SPEC, demo.root.parent) == demo and (demo.root / "spec.json").stat().st_mtime_ns == stamp
    assert (
        demo_dataset(DemoSpec(num_train=4, num_val=2, train_per_shard=4, val_per_shard=1), demo.root.parent).root
        != demo.root
    )

    spec = SampleSpec(fields=("text", "negative", "latents", "video", "annotations"))
    samples = [decode_sample(r, spec) for u in expand_urls(demo.train_urls) for r in iter_raw_samples(u, pytest.fail)]
    assert len(samples) == SPEC.num_train
    text, vae = (
        WanTextEncoder.from_pretrained(demo.root, text_len=SPEC.text_len, dtype=torch.float32),
        WanVAE.from_pretrained(demo.root),
    )
    latents = []
    for s in samples:
        world = Narrative.from_json(s.info["world"])
        video, notes = render(world, SPEC.height, SPEC.width)
        assert s.prompts == world.prompts and s.annotations == notes and s.num_frames == SPEC.num_frames
        assert all(t % SPEC.chunk == 0 for t in s.switch_frames)
        assert s.video.shape == video.shape
        z = vae.encode(torch.from_numpy(video))[0]
        torch.testing.assert_close(s.latents, z)
        latents.append(z)
        for got, want in zip(s.text, text.encode_unpadded(s.prompts), strict=True):
            torch.testing.assert_close(got, want)
        assert s.negative_prompt == "" and s.negative.shape == (1, SPEC.text_dim)
    stacked = torch.stack(latents)
    assert stacked.shape[1:] == (
        SPEC.z_dim,
        SPEC.num_frames,
        SPEC.height // vae.spatial_stride,
        SPEC.width // vae.spatial_stride,
    )
    torch.testing.assert_close(stacked.std((0, 2, 3, 4)), torch.ones(SPEC.z_dim), atol=1e-3, rtol=0)  # calibrated


def test_demo_datamodule_from_yaml(demo, tmp_path: Path) -> None:
    config = f"""
data:
  class_path: data.DemoDataModule
  init_args:
    cache_dir: {demo.root.parent}
    spec: {{num_train: {SPEC.num_train}, num_val: {SPEC.num_val}, train_per_shard: 4, val_per_shard: 2}}
    batch_size: 2
    num_workers: 0
    batches_per_epoch: 3
"""
    (tmp_path / "c.yaml").write_text(config)
    parser = ArgumentParser()
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    parser.add_argument("--config", action="config")
    dm = parser.instantiate(parser.parse_args(["--config", str(tmp_path / "c.yaml")])).data
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    b = batches[0]
    assert b.prompt_embeds.shape == (2, b.num_prompts.max(), SPEC.text_len, SPEC.text_dim)
    assert b.negative_embeds.shape == (2, SPEC.text_len, SPEC.text_dim)
    assert b.latents.shape[:3] == (2, SPEC.z_dim, SPEC.num_frames) and b.latents.dtype == torch.bfloat16
    assert sum(len(v) for v in dm.val_dataloader()) == SPEC.num_val
