"""Writing samples into numbered shards so that an interrupted run continues where it stopped."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import webdataset as wds

from data.format import FORMAT_VERSION, Sample, encode_sample
from data.reading import local_path

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """'500M', '1G', '4096' -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if m is None:
        raise ValueError(f"cannot read {text!r} as a size (examples: 4096, 500M, 1G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def brace_pattern(pattern: str, count: int) -> str:
    """'dir/shard-%06d.tar', 3 -> 'dir/shard-{000000..000002}.tar' (what ShardDataModule takes)."""
    if count <= 1:
        return pattern % 0 if count else ""
    head, tail = pattern.split("%", 1)
    width = int(re.match(r"0?(\d*)d", tail).group(1) or 1)
    return f"{head}{{{0:0{width}d}..{count - 1:0{width}d}}}{tail[tail.index('d') + 1 :]}"


class ShardSink:
    """Writes samples to `output` (a local folder, or a pattern with %06d that WebDataset can write, e.g.
    `pipe:aws s3 cp - s3://bucket/train-%06d.tar`), starting a new shard after max_samples or max_bytes.

    Progress (each completed shard and the range of source items in it) lives in a local JSON file; a sink
    opened again with the same output and options continues after the last completed shard. Local shards are
    written as NAME.partial and renamed when complete, so readers never see half a shard.
    """

    def __init__(
        self,
        output: str,
        options: dict[str, Any],
        max_samples: int = 1000,
        max_bytes: int = 1 << 30,
        progress: str | None = None,
        prefix: str = "shard",
        overwrite: bool = False,
    ) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        if "%" in output:
            self.pattern = output
        else:
            Path(output).mkdir(parents=True, exist_ok=True)
            self.pattern = str(Path(output) / f"{prefix}-%06d.tar")
        local = local_path(self.pattern)
        if progress is None:
            if local is None:
                raise ValueError(f"output {output} is not local: pass a local progress file to make the run resumable")
            progress = str(Path(local).parent / f"{Path(local).name.split('%')[0].rstrip('-_')}-progress.json")
        self.progress_path = Path(progress)
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.options = {"format_version": FORMAT_VERSION, "pattern": self.pattern, **options}
        self.state: dict[str, Any] = {"options": self.options, "shards": [], "done": False}
        if self.progress_path.is_file() and not overwrite:
            saved = json.loads(self.progress_path.read_text())
            if saved["options"] != self.options:
                changed = sorted(
                    k for k in {*saved["options"], *self.options} if saved["options"].get(k) != self.options.get(k)
                )
                what = (
                    "the source changed since this progress file was written"
                    if changed == ["source_digest"]
                    else f"this progress file records a run with other options ({', '.join(changed)})"
                )
                raise ValueError(f"{self.progress_path}: {what}: write elsewhere, or pass --overwrite to start again")
            self.state = saved
        self._writer: wds.TarWriter | None = None
        self._shard: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.state["done"]

    @property
    def next_item(self) -> int:
        """First source item not yet in a completed shard."""
        return self.state["shards"][-1]["items"][1] if self.state["shards"] else 0

    @property
    def urls(self) -> str:
        """Brace pattern of the completed shards."""
        return brace_pattern(self.pattern, len(self.state["shards"]))

    def write(self, item: int, sample: Sample) -> None:
        """Add the sample made from source item `item` (items must come in increasing order)."""
        data = encode_sample(sample)
        if self._writer is None:
            index = len(self.state["shards"])
            url = self.pattern % index
            path = local_path(url)
            self._writer = wds.TarWriter(f"{path}.partial" if path is not None else url, mtime=0)
            self._shard = {"url": url, "items": [item, item], "samples": 0, "bytes": 0}
        self._shard["bytes"] += self._writer.write(data)
        self._shard["samples"] += 1
        self._shard["items"][1] = item + 1
        if self._shard["samples"] >= self.max_samples or self._shard["bytes"] >= self.max_bytes:
            self._finish()  # at once, so an interruption cannot cost a full shard

    def _finish(self, end_item: int | None = None) -> None:
        self._writer.close()
        shard, self._writer, self._shard = self._shard, None, None
        if end_item is not None:  # items skipped after the last sample belong to this shard too
            shard["items"][1] = end_item
        path = local_path(shard["url"])
        if path is not None:
            os.replace(f"{path}.partial", path)
        self.state["shards"].append(shard)
        self._save()

    def _save(self) -> None:
        tmp = self.progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.progress_path)

    def close(self, end_item: int | None = None) -> str:
        """Complete the last shard and mark the run done; end_item = items seen (skipped ones included)."""
        if self._writer is not None:
            self._finish(end_item)
        self.state["done"] = True
        self._save()
        return self.urls

    def abort(self) -> None:
        """Close the open shard without recording it (it will be written again on resume)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = self._shard = None
