"""Video files <-> uint8 frame tensors (T, H, W, 3) with PyAV (there is no torchvision on our machines)."""

from __future__ import annotations

import io
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from memflow_train.checks import MAX_RATE_DENOMINATOR, frame_rate


def encode_mp4(frames: torch.Tensor | np.ndarray, fps: float = 16.0, crf: int = 18) -> bytes:
    """H.264 (yuv420p) mp4 bytes of uint8 RGB frames (T, H, W, 3); H and W must be even; fps is stored exactly
    (a rate no small fraction equals, or one <= 0, is refused)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 needs an even frame size, got {frames.shape[2]}x{frames.shape[1]}")
    rate = frame_rate("fps", fps)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def decode_mp4(data: bytes | str | Path) -> torch.Tensor:
    """All frames of a video (bytes or a path) as uint8 (T, H, W, 3)."""
    return read_video(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data)


class FrameRateWarning(UserWarning):
    """A video runs slower than the frame rate asked for: its frames are kept at its own rate (none repeated)."""


def read_video(
    source: str | Path | io.BytesIO,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
) -> torch.Tensor:
    """Decode a video to uint8 (T, H, W, 3); see read_clip (which also gives the frames' rate)."""
    return read_clip(source, fps, size, max_frames)[0]


def read_clip(
    source: str | Path | io.BytesIO,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
) -> tuple[torch.Tensor, Fraction | None]:
    """Decode a video to uint8 (T, H, W, 3) and the frame rate those frames really have.

    fps: drop frames to approach this rate; a slower source is used as it is, at its own rate, with a
    FrameRateWarning naming both rates. size: (height, width) after scaling to cover it and cropping the centre.
    max_frames: stop after this many frames. The rate is fps when frames were dropped to it, else the source's
    own (None when the container records none).
    """
    frames: list[np.ndarray] = []
    next_time = 0.0
    with av.open(str(source) if isinstance(source, Path) else source) as container:
        stream = container.streams.video[0]
        source_rate = Fraction(stream.average_rate) if stream.average_rate else None
        rate = source_rate
        if fps is not None:
            rate = Fraction(fps).limit_denominator(MAX_RATE_DENOMINATOR)
            if source_rate is not None and source_rate < fps:
                name = source if isinstance(source, str | Path) else "a video"
                warnings.warn(
                    f"{name} runs at {float(source_rate):g} fps, slower than the requested {fps:g}: its frames are "
                    f"kept at {float(source_rate):g} fps (none are repeated)",
                    FrameRateWarning,
                    stacklevel=3,
                )
                rate = source_rate
        tolerance = 0.5 / float(source_rate or fps or 1)  # half a source frame: take the frame nearest a target
        for frame in container.decode(stream):
            if fps is not None and frame.time is not None:
                if frame.time < next_time - tolerance:
                    continue
                next_time += 1.0 / fps
            frames.append(_resize(frame, size))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"no video frames in {source}")
    return torch.from_numpy(np.stack(frames)), rate


def _resize(frame: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
    if size is None:
        return frame.to_ndarray(format="rgb24")
    height, width = size
    scale = max(height / frame.height, width / frame.width)
    h, w = max(height, round(frame.height * scale)), max(width, round(frame.width * scale))
    img = frame.reformat(width=w, height=h, format="rgb24").to_ndarray()
    top, left = (h - height) // 2, (w - width) // 2
    return np.ascontiguousarray(img[top : top + height, left : left + width])
