"""An mp4 file written frame batch by frame batch (PyAV, H.264), so a video never sits in memory whole."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import av
import numpy as np
import torch

from memflow_train.checks import frame_rate


class Mp4Writer:
    """H.264 (yuv420p) mp4 of uint8 RGB frames (T, H, W, 3).

    Frames go to `<path>.partial` and the file is renamed to `path` on a clean close, so an
    interrupted run never leaves a truncated file under the final name.
    """

    def __init__(self, path: str | Path, height: int, width: int, fps: float = 16.0, crf: int = 18) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"H.264 needs an even frame size, got {width}x{height}")
        rate = frame_rate("fps", fps)  # exact: 12.5 stays 12.5, never rounded to 12 (or 0.4 to 0)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self.height, self.width = height, width
        self.frames_written = 0
        self._container = av.open(str(self._partial), mode="w", format="mp4")
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.options = {"crf": str(crf)}

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        frames = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"expected uint8 frames (T, {self.height}, {self.width}, 3), got {frames.dtype} {frames.shape}"
            )
        for frame in frames:
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        self.frames_written += len(frames)

    def close(self) -> None:
        """Flush the encoder and publish the file."""
        if self._container is None:
            return
        self._container.mux(self._stream.encode())
        self._container.close()
        self._container = None
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
