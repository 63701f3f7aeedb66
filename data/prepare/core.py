"""Source items -> encoded samples -> shards: the part every preparation command shares."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import islice
from typing import Any

import torch
from tqdm import tqdm

from data.format import Sample
from data.video_io import encode_mp4
from data.writer import ShardSink
from memflow_train.models.text_encoder import WanTextEncoder
from memflow_train.models.vae import VideoAutoencoder


@dataclass
class Item:
    """One source entry before encoding. video: uint8 (T, H, W, 3) or a function loading it (so a resumed run
    skips finished items without decoding them), optionally with the frames' rate as (frames, fps); frame
    counts are in latent frames."""

    key: str
    prompts: list[str]
    switch_frames: list[int] | None = None
    num_frames: int | None = None
    video: torch.Tensor | Callable[[], torch.Tensor] | None = None
    annotations: list[dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Encoders:
    """What to precompute. Without a text encoder only prompts are stored; without a VAE no latents."""

    text: WanTextEncoder | None = None
    vae: VideoAutoencoder | None = None
    negative_prompt: str | None = None
    keep_video: bool = False
    fps: float = 16.0  # the rate of videos whose loader gives none (a tensor; a file that records no rate)
    batch_size: int = 8
    text_dtype: torch.dtype = torch.bfloat16
    latent_dtype: torch.dtype = torch.bfloat16
    min_latent_frames: int = 3  # shorter clips are stored with a warning: loaders of streaming methods skip them
    _negative: torch.Tensor | None = field(default=None, init=False, repr=False)

    def negative(self) -> torch.Tensor | None:
        if self.negative_prompt is None:
            return None
        if self.text is None:
            raise ValueError("a negative prompt needs a text encoder to embed it")
        if self._negative is None:
            self._negative = self.text.encode_unpadded([self.negative_prompt])[0].to(self.text_dtype)
        return self._negative


class SkippedItem(Exception):
    """A source item that cannot be used (unreadable video, missing caption); the run goes on without it."""


class DroppedFramesWarning(UserWarning):
    """A clip loses frames to the VAE's 1 + 4k rule, or is too short to train on."""


def _load_video(
    item: Item, vae: VideoAutoencoder | None, min_latent_frames: int = 3
) -> tuple[torch.Tensor | None, Fraction | None]:
    """The item's frames (what the VAE can encode) and their rate when the loader knows it."""
    if item.video is None:
        return None, None
    try:
        video = item.video() if callable(item.video) else item.video
    except Exception as err:  # whatever the decoder raises for a broken file
        raise SkippedItem(f"{item.key}: cannot read its video ({err})") from err
    video, rate = video if isinstance(video, tuple) else (video, None)
    if vae is not None:  # keep the longest prefix the VAE accepts: 1 + k * stride frames
        stride, frames = vae.temporal_stride, video.shape[0]
        keep = 1 + (frames - 1) // stride * stride
        if keep < frames:
            warnings.warn(
                f"{item.key}: {frames} frames, the VAE encodes 1 + {stride}k: keeping the first {keep} "
                f"({1 + (keep - 1) // stride} latent frames), dropping {frames - keep}",
                DroppedFramesWarning,
                stacklevel=2,
            )
        video = video[:keep]
        latent_frames = 1 + (keep - 1) // stride
        if latent_frames < min_latent_frames:
            warnings.warn(
                f"{item.key}: {frames} frames give only {latent_frames} latent frames, fewer than "
                f"--min-latent-frames {min_latent_frames} (one chunk): a streaming method cannot train on it and "
                "its loader will skip it",
                DroppedFramesWarning,
                stacklevel=2,
            )
    return video, rate


def _encode_batch(items: list[Item], encoders: Encoders) -> list[Sample | SkippedItem]:
    out: list[Sample | SkippedItem] = []
    rates: dict[str, Fraction | float] = {}
    for item in items:
        if not item.prompts:
            out.append(SkippedItem(f"{item.key}: has no prompt (a video without its caption file?)"))
            continue
        try:
            video, rate = _load_video(item, encoders.vae, encoders.min_latent_frames)
        except SkippedItem as err:
            out.append(err)
            continue
        sample = Sample(item.key, item.prompts, item.switch_frames, item.num_frames, annotations=item.annotations)
        sample.info = dict(item.info)
        sample.video = video
        if video is not None:  # the rate of the stored frames / latents: the source's own unless dropped to --fps
            rates[item.key] = rate if rate is not None else encoders.fps
            sample.info["fps"] = float(rates[item.key])
        out.append(sample)
    samples = [s for s in out if isinstance(s, Sample)]
    if encoders.text is not None and samples:
        prompts = [p for s in samples for p in s.prompts]
        embeds = iter(encoders.text.encode_unpadded(prompts, encoders.batch_size))
        for s in samples:
            s.text = [next(embeds).to(encoders.text_dtype) for _ in s.prompts]
            s.negative, s.negative_prompt = encoders.negative(), encoders.negative_prompt
    if encoders.vae is not None:
        by_shape: dict[tuple[int, ...], list[Sample]] = {}
        for s in samples:
            if s.video is not None:
                by_shape.setdefault(tuple(s.video.shape), []).append(s)
        for group in by_shape.values():
            latents = encoders.vae.encode(torch.stack([s.video for s in group]), encoders.batch_size)
            for s, z in zip(group, latents, strict=True):
                s.latents = z.to(encoders.latent_dtype).cpu()
                s.num_frames = s.num_frames or z.shape[1]
    for s in samples:
        if encoders.keep_video and s.video is not None:
            s.mp4 = encode_mp4(s.video, rates[s.key])
        s.video = None  # frames are never written as such, only as mp4 or latents
    return out


def prepare(
    items: Iterable[Item],
    sink: ShardSink,
    encoders: Encoders,
    total: int | None = None,
    progress: bool = True,
) -> str:
    """Encode items in batches and write them; a resumed sink skips the items its completed shards hold.
    Returns the brace pattern of all shards."""
    if sink.done:
        return sink.urls
    start = sink.next_item
    remaining: Iterator[tuple[int, Item]] = islice(enumerate(items), start, None)
    skipped = 0
    seen = start
    bar = tqdm(total=total, initial=start, unit="item", disable=not progress)
    try:
        while batch := list(islice(remaining, encoders.batch_size)):
            for (index, _), result in zip(batch, _encode_batch([it for _, it in batch], encoders), strict=True):
                if isinstance(result, SkippedItem):
                    skipped += 1
                    warnings.warn(f"skipping source item {result}", stacklevel=2)
                else:
                    sink.write(index, result)
            seen = batch[-1][0] + 1
            bar.update(len(batch))
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    urls = sink.close(end_item=seen)
    if encoders.text is not None:
        encoders.text.truncation_summary()
    if skipped:
        warnings.warn(f"{skipped} source items were skipped (see the warnings above)", stacklevel=2)
    if not sink.state["shards"]:
        raise ValueError(f"no sample was written: all {skipped} source items were skipped (see the warnings above)")
    return urls
