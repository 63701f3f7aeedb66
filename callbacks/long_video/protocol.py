"""The long-video evaluation protocol: which narratives, how they are generated, what is measured.

`EvalProtocol` is the versioned, YAML-configurable description; `Evaluator` runs it for a streaming video
pipeline on this rank's share of the narratives (narrative i goes to rank i % world_size), feeding the
torchmetrics metrics (their states sync across ranks on compute) and collecting per-segment rows, per-narrative
summaries (FPS, memory bank trace, world check) and mp4 bytes for the first narratives.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from callbacks.long_video.memory import MemoryRetrieval
from callbacks.long_video.metrics import SegmentClipScore, SegmentConsistency, SegmentQuality, TemporalFlicker
from callbacks.long_video.world import WorldConsistency, annotate, returning_events
from data.synthetic.world import COLOURS, narratives_jsonl
from data.synthetic.world import Narrative as World
from data.video_io import encode_mp4
from memflow_train.checks import number, whole
from memflow_train.evaluation import (
    PROTOCOL_VERSION,
    ClipFeatures,
    DinoFeatures,
    EvalNarrative,
    EvaluationVideo,
    FeatureModelSpec,
    digest,
    from_records,
    generate_full_sequence,
    generate_traced,
    read_jsonl,
    shorten,
    video_frame_segments,
)
from memflow_train.generation.pipeline import StreamingVideoPipeline
from memflow_train.methods.hparams import plain


@dataclass(frozen=True)
class SyntheticNarratives:
    """Synthetic-world narratives drawn with `data.synthetic.world.narratives_jsonl` (ground truth included)."""

    count: int = 2
    segments: int = 3
    frames_per_segment: int = 6  # latent frames
    subjects: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        """Raises ValueError for a count or length below 1, or more subjects than the world has colours."""
        for name in ("count", "segments", "frames_per_segment"):
            whole(f"synthetic.{name}", getattr(self, name), low=1)
        whole("synthetic.subjects", self.subjects, low=1, high=len(COLOURS))
        whole("synthetic.seed", self.seed, low=0)


@dataclass(frozen=True)
class EvalProtocol:
    """narratives: a JSONL in MemFlow's benchmark format (e.g. ../shared/benchmarks/memflow_interactive_benchmark
    .jsonl), or None for `synthetic` world narratives. num_narratives / max_prompts / frames_per_prompt cut the
    set down (None: as it is; the benchmark's own default is 40 latent frames per prompt). Every narrative is
    generated with noise seed `seed` (the paper's runs: 1), as `python -m memflow_train.generation --seed` does.

    clip: CLIP for the per-segment CLIP score; subject_features / background_features: image features for the
    consistency metrics (VBench: DINO for subjects, CLIP for backgrounds); a missing model skips its metrics.
    memory_free_narratives: how many of each rank's narratives (its last ones) are generated a second time
    without memory, for the memory vs memory-free FPS comparison. world_check: read synthetic-world videos back and compare
    them with the ground truth.
    """

    narratives: str | None = None
    synthetic: SyntheticNarratives = field(default_factory=SyntheticNarratives)
    num_narratives: int | None = None
    max_prompts: int | None = None
    frames_per_prompt: int | None = None
    seed: int = 0
    clip: FeatureModelSpec | None = None
    subject_features: FeatureModelSpec | None = None
    background_features: FeatureModelSpec | None = None
    memory_free_narratives: int = 1
    world_check: bool = True

    def __post_init__(self) -> None:
        """Raises ValueError for a count or length below 1 (None leaves the set as it is)."""
        for name in ("num_narratives", "max_prompts", "frames_per_prompt"):
            if getattr(self, name) is not None:
                whole(name, getattr(self, name), low=1)
        whole("memory_free_narratives", self.memory_free_narratives, low=0)
        whole("seed", self.seed, low=0)

    def load(self) -> list[EvalNarrative]:
        """The narratives to evaluate. Raises ValueError when num_narratives asks for more than the set holds."""
        if self.narratives is not None:
            items = read_jsonl(self.narratives, 40 if self.frames_per_prompt is None else self.frames_per_prompt)
        else:
            s = self.synthetic
            lines = narratives_jsonl(s.count, [s.frames_per_segment] * s.segments, s.seed, s.subjects)
            items = from_records([json.loads(line) for line in lines], "synthetic", s.frames_per_segment)
        if self.num_narratives is not None and self.num_narratives > len(items):
            source = self.narratives or f"synthetic.count {len(items)}"
            raise ValueError(f"num_narratives {self.num_narratives}: {source} holds only {len(items)} narratives")
        items = items[: self.num_narratives]
        return [shorten(n, self.max_prompts, self.frames_per_prompt) for n in items]


@dataclass
class ShardResult:
    """What one rank measured: per-segment rows, per-narrative summaries, videos (name, mp4 bytes, caption)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    narratives: list[dict[str, Any]] = field(default_factory=list)
    videos: list[tuple[str, bytes, str]] = field(default_factory=list)


def _world_truth(world: dict[str, Any], frame_segments: torch.Tensor) -> list[dict[str, Any]]:
    """Per video frame, the renderer's annotation format without positions: segment, scene, subjects (id, shape,
    colour, size, marking)."""
    w = World.from_json(world)
    notes = []
    for k in frame_segments.tolist():
        seg = w.segments[k]
        subjects = [
            {key: getattr(w.subjects[i], key) for key in ("id", "shape", "colour", "size", "marking")}
            for i in seg.subjects
        ]
        notes.append({"segment": k, "scene": seg.scene, "subjects": subjects})
    return notes


def _world_details(predicted: list[dict[str, Any]], truth: list[dict[str, Any]]) -> dict[str, Any]:
    """One narrative's world counts (for bootstrap intervals over narratives) and its scene accuracy and
    subject F1 per segment (drift over length)."""
    own = WorldConsistency()
    own.update(predicted, truth)
    out: dict[str, Any] = {"world_counts": own.counts()}
    for k in sorted({t["segment"] for t in truth}):
        frames = [i for i, t in enumerate(truth) if t["segment"] == k]
        part = WorldConsistency()
        part.update([predicted[i] for i in frames], [truth[i] for i in frames])
        values = WorldConsistency.ratios(part.counts())
        out[f"world/scene_accuracy/segment_{k}"] = values["world/scene_accuracy"]
        out[f"world/subject_f1/segment_{k}"] = values["world/subject_f1"]
    return out


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


class Evaluator:
    """Runs an EvalProtocol; feature models are built on first use and kept (on CPU between runs)."""

    def __init__(
        self,
        protocol: EvalProtocol,
        videos: int = 2,
        video_fps: float = 16,
        full_sequence_steps: int | None = None,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
    ) -> None:
        """full_sequence_steps: generate each narrative with the model as a bidirectional model (a teacher), in
        this many Euler steps over the whole sequence, instead of streaming it (None); then guidance_scale != 1
        guides every step against negative_prompt (classifier-free guidance). Raises ValueError for guidance
        without full_sequence_steps (a streaming generator samples unguided, as it was distilled) and for a
        negative_prompt without guidance (it would not be used)."""
        number("guidance_scale", guidance_scale, low=0)
        if guidance_scale != 1.0 and full_sequence_steps is None:
            raise ValueError(
                f"guidance_scale {guidance_scale} applies to full-sequence sampling only (set full_sequence_steps): "
                "the streaming generator samples unguided, as its training distilled the guidance into it"
            )
        if negative_prompt and guidance_scale == 1.0:
            raise ValueError(
                f"negative_prompt {negative_prompt!r} is the unconditional prompt of guided sampling: set "
                "guidance_scale (1, the default, samples unguided)"
            )
        self.protocol = protocol
        self.videos = videos
        self.video_fps = video_fps
        self.full_sequence_steps = full_sequence_steps
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.narratives = protocol.load()
        self.num_segments = max(len(n.narrative.prompts) for n in self.narratives)
        self._models: dict[FeatureModelSpec, ClipFeatures | DinoFeatures] = {}
        self.metrics = self._new_metrics()

    # ----------------------------------------------------------------------------------- set-up

    def _new_metrics(self) -> dict[str, Any]:
        s, p = self.num_segments, self.protocol
        metrics: dict[str, Any] = {
            "flicker": TemporalFlicker(s),
            **{m: SegmentQuality(s, m) for m in SegmentQuality.MEASURES},
            "memory": MemoryRetrieval(),
        }
        if p.clip is not None:
            metrics["clip_score"] = SegmentClipScore(s)
        if p.subject_features is not None:
            metrics["subject_consistency"] = SegmentConsistency(s, "subject_consistency")
        if p.background_features is not None:
            metrics["background_consistency"] = SegmentConsistency(s, "background_consistency")
        if p.world_check and any(n.world is not None for n in self.narratives):
            metrics["world"] = WorldConsistency()
        return metrics

    def feature_model(self, spec: FeatureModelSpec) -> ClipFeatures | DinoFeatures:
        """One model per distinct spec (a CLIP used for both text alignment and backgrounds is loaded once);
        built with the global RNG state preserved, so training draws are untouched."""
        if spec not in self._models:
            with torch.random.fork_rng(devices=[]):
                self._models[spec] = spec.build()
        return self._models[spec]

    def settings(self, pipeline: StreamingVideoPipeline) -> dict[str, Any]:
        """What shapes the numbers besides the weights; part of the protocol id."""
        sampler = pipeline.sampler
        return {
            "protocol": {k: v for k, v in plain(self.protocol).items() if k != "narratives"},  # content is hashed
            "memory": asdict(sampler.memory),
            "timesteps": [round(float(t), 4) for t in sampler.timesteps],
            "context_timestep": sampler.context_timestep,
            "latent_size": list(pipeline.latent_size),
        }

    def protocol_info(self, pipeline: StreamingVideoPipeline) -> dict[str, Any]:
        settings = self.settings(pipeline)
        return {
            "version": PROTOCOL_VERSION,
            "id": digest(self.narratives, settings),
            "narratives": len(self.narratives),
            "settings": settings,
        }

    def models(self) -> list[torch.nn.Module]:
        return list(self._models.values())

    # ----------------------------------------------------------------------------------- running

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def run_shard(
        self, pipeline: StreamingVideoPipeline, rank: int = 0, world_size: int = 1, lockstep: bool = False
    ) -> ShardResult:
        """Generate and measure narratives rank, rank + world_size, ...; the metrics accumulate them.

        lockstep (parameter sharding: ZeRO-3, FSDP): every forward gathers parameters from every rank,
        so every rank must run the same sequence of forwards. Then each rank also generates the other
        ranks' narratives, undecoded and unmeasured (their owners measure them), in the same order; a
        narrative whose measurement fails does not stop the sequence, and the first failure is raised
        at the end.
        """
        if pipeline.vae is None:
            raise ValueError("long-video evaluation decodes its videos: the pipeline needs a VAE")
        device = pipeline.device
        for spec in self._specs():
            self.feature_model(spec).to(device)
        for metric in self.metrics.values():
            metric.to(device)
        result = ShardResult()
        compare = set()  # the memory-free comparison runs on each rank's last narratives (warmed up by the first)
        for r in range(world_size):
            owned = list(range(r, len(self.narratives), world_size))
            compare |= set(owned[max(0, len(owned) - self.protocol.memory_free_narratives) :])
        if not lockstep:
            for index in range(rank, len(self.narratives), world_size):
                self._one(pipeline, index, index in compare, result)
            return result
        failure: Exception | None = None
        for index in range(len(self.narratives)):
            if index % world_size != rank:
                self._shadow(pipeline, index, index in compare)
                continue
            try:
                self._one(pipeline, index, index in compare, result)
            except Exception as err:  # keep the forward sequence aligned with the other ranks
                failure = failure or err
        if failure is not None:
            raise failure
        return result

    def _shadow(self, pipeline: StreamingVideoPipeline, index: int, compare: bool) -> None:
        """The forwards another rank runs for narrative `index` (lockstep): generated, not decoded or kept."""
        narrative = self.narratives[index].for_chunks(pipeline.sampler.frames_per_chunk)
        self._generate(pipeline, narrative, decode=False)
        if compare and self.full_sequence_steps is None:
            generate_traced(pipeline, narrative, self.protocol.seed, memory=False, decode=False)

    def _generate(self, pipeline: StreamingVideoPipeline, narrative: Any, decode: bool = True) -> EvaluationVideo:
        if self.full_sequence_steps is not None:
            return generate_full_sequence(
                pipeline,
                narrative,
                self.protocol.seed,
                self.full_sequence_steps,
                decode,
                self.guidance_scale,
                self.negative_prompt,
            )
        return generate_traced(pipeline, narrative, self.protocol.seed, decode=decode)

    def _specs(self) -> list[FeatureModelSpec]:
        p = self.protocol
        return [s for s in (p.clip, p.subject_features, p.background_features) if s is not None]

    def _one(self, pipeline: StreamingVideoPipeline, index: int, compare: bool, result: ShardResult) -> None:
        """Generate narrative `index`, measure it, and add its summary, rows and (first ones) video."""
        item, seed = self.narratives[index], self.protocol.seed
        chunk = pipeline.sampler.frames_per_chunk
        narrative = item.for_chunks(chunk)
        video = self._generate(pipeline, narrative)
        values = self._measure(item, video, pipeline.temporal_stride, chunk)
        stats = video.stats
        summary: dict[str, Any] = {
            "index": index,
            "name": item.name,
            "prompts": list(narrative.prompts),
            "segment_starts": item.segment_starts(chunk),
            "latent_frames": stats.latent_frames,
            "video_frames": stats.video_frames,
            "fps": _finite(stats.median_chunk_fps),
            "transformer_seconds": stats.transformer_s,
            "chunk_starts": video.chunk_starts,
            "bank_frames": video.bank_frames,
        }
        if compare and self.full_sequence_steps is None:  # timing only, not decoded
            free = generate_traced(pipeline, narrative, seed, memory=False, decode=False).stats
            summary["fps_memory_free"] = _finite(free.median_chunk_fps)
            summary["fps_memory"] = summary["fps"]
        if "world_counts" in values:
            summary["world_counts"] = values.pop("world_counts")
        summary["metrics"] = {k: _finite(v) for k, v in values.items() if "/segment_" not in k}
        result.narratives.append(summary)
        for k, prompt in enumerate(narrative.prompts):
            row = {"narrative": item.name, "segment": k, "start_frame": summary["segment_starts"][k], "prompt": prompt}
            row.update(
                {
                    name: _finite(values[f"{name}/segment_{k}"])
                    for name in self.metrics
                    if f"{name}/segment_{k}" in values
                }
            )
            for name in ("scene_accuracy", "subject_f1"):
                if f"world/{name}/segment_{k}" in values:
                    row[name] = _finite(values[f"world/{name}/segment_{k}"])
            result.rows.append(row)
        if index < self.videos:
            mp4 = encode_mp4(video.frames, fps=self.video_fps)
            result.videos.append((f"{index:04d}", mp4, " | ".join(narrative.prompts)))

    def _measure(self, item: EvalNarrative, video: EvaluationVideo, stride: int, chunk: int) -> dict[str, Any]:
        """Feed one video to every metric; returns its own values (per segment too)."""
        p, frames = self.protocol, video.frames
        latent_segments = item.latent_segments(chunk)
        segments = video_frame_segments(latent_segments, stride)
        values: dict[str, Any] = {}
        for name in ("flicker", *SegmentQuality.MEASURES):
            values.update(self.metrics[name](frames, segments))
        if p.clip is not None:
            clip = self.feature_model(p.clip)
            texts = clip.text_features(list(item.narrative.prompts))
            values.update(self.metrics["clip_score"](clip.image_features(frames), texts, segments))
        for name, spec in (
            ("subject_consistency", p.subject_features),
            ("background_consistency", p.background_features),
        ):
            if spec is not None:
                values.update(self.metrics[name](self.feature_model(spec).image_features(frames), segments))
        returns: list[tuple[int, int]] = []
        if item.world is not None:
            world = World.from_json(item.world)
            returns = [(r, e) for _, r, e in returning_events([set(s.subjects) for s in world.segments])]
            if "world" in self.metrics:
                predicted, truth = annotate(frames), _world_truth(item.world, segments)
                values.update(self.metrics["world"](predicted, truth))
                values.update(_world_details(predicted, truth))
        values.update(self.metrics["memory"](video.bank_frames, video.chunk_starts, latent_segments, returns))
        return values

    def compute(self) -> dict[str, float | None]:
        """Scalars over every rank's narratives (a collective call when distributed: every rank calls it)."""
        out: dict[str, float | None] = {}
        for metric in self.metrics.values():
            for key, value in metric.compute().items():
                if "/segment_" not in key:
                    out[key] = _finite(value)
        return out

    def release(self) -> None:
        """Feature models and metric states back to the CPU."""
        for model in self._models.values():
            model.to("cpu")
        for metric in self.metrics.values():
            metric.to("cpu")
