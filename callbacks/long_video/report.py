"""Evaluation outputs: report.json, report.md, segments.csv and mp4 files in a folder, and the run's loggers.

W&B gets the scalars, the per-segment table and the videos (mp4 paths handed to wandb.Video); every other
logger gets the scalars, and the folder holds the rest.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger

from callbacks.long_video.world import bootstrap_interval

SEGMENT_COLUMNS = (
    "narrative",
    "segment",
    "start_frame",
    "prompt",
    "clip_score",
    "subject_consistency",
    "background_consistency",
    "flicker",
    "sharpness",
    "saturation",
    "brightness",
    "scene_accuracy",
    "subject_f1",
)
# World metrics given a 95% bootstrap interval over narratives (world_intervals).
INTERVAL_METRICS = (
    "world/scene_accuracy",
    "world/subject_f1",
    "world/size_error_px",
    "world/marking_accuracy",
    "world/reentry_size_error_px",
    "world/reentry_marking_accuracy",
)


def assemble(
    protocol: dict[str, Any], source: dict[str, Any], scalars: dict[str, float | None], parts: list[Any]
) -> tuple[dict[str, Any], list[tuple[str, bytes, str]]]:
    """One report from every rank's ShardResult (narratives in protocol order), and the videos to write."""
    narratives = sorted((n for p in parts for n in p.narratives), key=lambda n: n["index"])
    order = {n["name"]: n["index"] for n in narratives}
    rows = sorted((r for p in parts for r in p.rows), key=lambda r: (order[r["narrative"]], r["segment"]))
    videos = sorted((v for p in parts for v in p.videos), key=lambda v: v[0])
    report = {
        "protocol": protocol,
        "source": source,
        "scalars": {**scalars, **fps_summary(narratives), **world_intervals(narratives)},
        "narratives": narratives,
        "segments": rows,
    }
    return report, videos


def world_intervals(narratives: list[dict[str, Any]], resamples: int = 2000) -> dict[str, float | None]:
    """<metric>/ci95_low and /ci95_high: the 95% percentile bootstrap interval of each world metric, resampling
    narratives (their counts pooled, as the metric pools them); None where a resample has no value."""
    counts = [n["world_counts"] for n in narratives if "world_counts" in n]
    if not counts:
        return {}
    out: dict[str, float | None] = {}
    for name in INTERVAL_METRICS:
        interval = bootstrap_interval([counts], name, resamples)
        out[f"{name}/ci95_low"], out[f"{name}/ci95_high"] = interval if interval is not None else (None, None)
    return out


def fps_summary(narratives: list[dict[str, Any]]) -> dict[str, float | None]:
    """Transformer FPS (video frames per second, first chunk left out) with memory over every narrative, and
    with and without memory over the narratives generated both ways."""
    both = [n for n in narratives if "fps_memory_free" in n]

    def mean(values: list[float]) -> float | None:
        values = [v for v in values if v is not None and math.isfinite(v)]
        return sum(values) / len(values) if values else None

    mem, free = mean([n["fps_memory"] for n in both]), mean([n["fps_memory_free"] for n in both])
    return {
        "fps": mean([n["fps"] for n in narratives]),
        "fps_memory": mem,
        "fps_memory_free": free,
        "memory_slowdown": 1 - mem / free if mem is not None and free else None,
    }


def write_report(folder: str | Path, report: dict[str, Any], videos: list[tuple[str, bytes, str]]) -> list[Path]:
    """Write the report's files; returns the mp4 paths (in the order of `videos`)."""
    folder = Path(folder)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    (folder / "report.md").write_text(markdown(report))
    with (folder / "segments.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, SEGMENT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(report["segments"])
    paths = []
    for name, data, _ in videos:
        path = folder / "videos" / f"{name}.mp4"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    protocol = report["protocol"]
    head = [
        "# Long-video consistency evaluation",
        "",
        f"- protocol version {protocol['version']}, id `{protocol['id']}`, {protocol['narratives']} narratives",
    ]
    head += [f"- {k}: `{v}`" for k, v in report.get("source", {}).items()]
    scalars = _table(["metric", "value"], [[k, v] for k, v in sorted(report["scalars"].items())])
    per_narrative = _table(
        ["narrative", "prompts", "latent frames", "FPS", "FPS memory-free"],
        [
            [n["name"], len(n["prompts"]), n["latent_frames"], n["fps"], n.get("fps_memory_free")]
            for n in report["narratives"]
        ],
    )
    columns = [c for c in SEGMENT_COLUMNS if c != "prompt" and any(c in r for r in report["segments"])]
    segments = _table(columns, [[r.get(c) for c in columns] for r in report["segments"]])
    return (
        "\n".join(
            [
                *head,
                "",
                "## Scalars",
                "",
                scalars,
                "",
                "## Narratives",
                "",
                per_narrative,
                "",
                "## Segments",
                "",
                segments,
            ]
        )
        + "\n"
    )


def log_to(loggers: list[Logger], report: dict[str, Any], video_paths: list[Path], captions: list[str], step: int):
    """Scalars to every logger; the segment table and videos to W&B."""
    scalars = {f"eval/{k}": v for k, v in report["scalars"].items() if v is not None}
    for logger in loggers:
        logger.log_metrics(scalars, step)
        if isinstance(logger, WandbLogger):
            columns = [c for c in SEGMENT_COLUMNS if any(c in r for r in report["segments"])]
            data = [[r.get(c) for c in columns] for r in report["segments"]]
            logger.log_table("eval/segments", columns=columns, data=data, step=step)
            if video_paths:
                logger.log_video("eval/videos", [str(p) for p in video_paths], step=step, caption=captions)
