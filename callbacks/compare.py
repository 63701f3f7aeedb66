"""python -m callbacks.compare: evaluation reports side by side -> results.md, results.json and figure.png.

  python -m callbacks.compare --out outputs/study/report eval-teacher=outputs/study/eval-teacher/report.json \\
      bench-stage2-off=.../report.json bench-stage2-sma=.../report.json

Each NAME=REPORT is a `python -m callbacks.evaluate` report.json. Reports whose names share a prefix up to the
last "-" (e.g. bench-stage2-off, bench-stage2-sma) evaluated the same narratives and are compared with the
one ending in "-off" (memory-free): every world metric gets its 95% bootstrap interval over narratives, and
the difference to memory-free a paired one (the same resampled narratives for both). The figure shows the
first narrative's frames around its first re-entry for every variant of the last group with videos, and the
scene accuracy and subject F1 per segment (drift over length).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from callbacks.long_video.world import bootstrap_interval  # noqa: E402
from data.video_io import decode_mp4  # noqa: E402
from memflow_train.errors import run_command  # noqa: E402

METRICS = (  # (world metric, column title, lower is better)
    ("world/scene_accuracy", "scene acc.", False),
    ("world/subject_f1", "subject F1", False),
    ("world/size_error_px", "size err. px", True),
    ("world/marking_accuracy", "marking acc.", False),
    ("world/reentry_size_error_px", "re-entry size err. px", True),
    ("world/reentry_marking_accuracy", "re-entry marking acc.", False),
)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _counts(report: dict[str, Any]) -> list[dict[str, float]]:
    return [n["world_counts"] for n in report["narratives"] if "world_counts" in n]


def summarize(name: str, report: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """One row: each metric with its interval, FPS, and (against a baseline of the same narratives) the paired
    difference with its interval and the relative change."""
    scalars, counts = report["scalars"], _counts(report)
    row: dict[str, Any] = {"name": name, "narratives": len(report["narratives"]), "fps": scalars.get("fps")}
    for key, _, _ in METRICS:
        value = scalars.get(key)
        interval = bootstrap_interval([counts], key) if counts else None
        row[key] = {"value": value, "ci95": interval}
        if baseline is not None and counts:
            base = _counts(baseline)
            if len(base) != len(counts):
                raise ValueError(f"{name} and its baseline evaluated {len(counts)} and {len(base)} narratives")
            diff = bootstrap_interval([counts, base], key)
            base_value = baseline["scalars"].get(key)
            delta = None if value is None or base_value is None else value - base_value
            relative = None if delta is None or not base_value else delta / base_value
            row[key].update(difference=delta, difference_ci95=diff, relative=relative)
    segments: dict[int, list[tuple[float | None, float | None]]] = {}
    for seg in report["segments"]:
        segments.setdefault(seg["segment"], []).append((seg.get("scene_accuracy"), seg.get("subject_f1")))
    row["per_segment"] = {
        k: [_mean([v[i] for v in values]) for i in range(2)] for k, values in sorted(segments.items())
    }
    return row


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def _group(name: str) -> str:
    return name.rsplit("-", 1)[0] if "-" in name else name


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | narratives | " + " | ".join(title for _, title, _ in METRICS) + " | FPS | drift (scene, F1) |"]
    lines.append("|---" * (len(METRICS) + 4) + "|")
    for row in rows:
        cells = [row["name"], str(row["narratives"])]
        for key, _, _ in METRICS:
            m = row[key]
            cell = _fmt(m["value"])
            if m.get("ci95"):
                cell += f" [{_fmt(m['ci95'][0])}, {_fmt(m['ci95'][1])}]"
            if m.get("difference") is not None:
                diff = m.get("difference_ci95")
                interval = f" [{_fmt(diff[0])}, {_fmt(diff[1])}]" if diff else ""
                relative = f", {m['relative']:+.0%}" if m.get("relative") is not None else ""
                cell += f"<br>vs off {m['difference']:+.3f}{interval}{relative}"
            cells.append(cell)
        cells.append(_fmt(row["fps"], 1))
        segments = list(row["per_segment"].values())
        if len(segments) > 1 and None not in (segments[0][0], segments[-1][0]):
            drift = f"{segments[-1][0] - segments[0][0]:+.3f}"
            if None not in (segments[0][1], segments[-1][1]):
                drift += f", {segments[-1][1] - segments[0][1]:+.3f}"
            cells.append(drift)
        else:
            cells.append("n/a")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "Values pool every narrative's counts (as the metric does); [a, b]: 95% percentile bootstrap interval over "
        "narratives (2000 resamples); 'vs off': the difference to the memory-free model of the same group on the "
        "same narratives, with its paired bootstrap interval and the relative change. Drift: last segment minus "
        "first segment. FPS: transformer frames per second (median over chunks after the first).",
    ]
    return "\n".join(lines + notes) + "\n"


def figure(rows: list[dict[str, Any]], reports: dict[str, dict[str, Any]], folder: Path, out: Path) -> None:
    """Frames around the first re-entry of the first narrative (one row per variant of the last group that
    wrote videos), and scene accuracy and subject F1 per segment."""
    groups = [_group(r["name"]) for r in rows]
    last = groups[-1]
    variants = [r["name"] for r in rows if _group(r["name"]) == last]
    videos = {}
    for name in variants:
        path = Path(reports[name]["_path"]).parent / "videos" / "0000.mp4"
        if path.is_file():
            videos[name] = decode_mp4(path)
    first = reports[variants[0]]["narratives"][0]
    starts = first["segment_starts"]
    reentry = starts[3] if len(starts) > 3 else starts[-1]  # lead, present, away, then back
    shown = [starts[1] + 1, reentry - 1, reentry, reentry + 1, reentry + 2]
    fig = plt.figure(figsize=(10, 2.2 * max(1, len(videos)) + 3))
    grid = fig.add_gridspec(len(videos) + 1, len(shown), height_ratios=[1] * len(videos) + [1.6])
    for i, (name, video) in enumerate(videos.items()):
        for j, frame in enumerate(shown):
            ax = fig.add_subplot(grid[i, j])
            if frame < len(video):
                ax.imshow(video[frame].numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"frame {frame}" + (" (re-entry)" if frame == reentry else ""), fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    ax = fig.add_subplot(grid[len(videos), :])
    for row in rows:
        if _group(row["name"]) != last:
            continue
        segments = row["per_segment"]
        ax.plot(list(segments), [v[0] for v in segments.values()], marker=".", label=f"{row['name']} scene")
        ax.plot(list(segments), [v[1] for v in segments.values()], linestyle="--", label=f"{row['name']} F1")
    ax.set_xlabel("segment (over the narrative's length)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m callbacks.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("reports", nargs="+", help="NAME=PATH/report.json")
    parser.add_argument("--out", required=True, help="folder for results.md, results.json and figure.png")
    args = parser.parse_args(argv)
    reports: dict[str, dict[str, Any]] = {}
    for item in args.reports:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise ValueError(f"{item!r}: expected NAME=PATH with an existing report.json")
        reports[name] = {**json.loads(Path(path).read_text()), "_path": path}
    rows = []
    for name, report in reports.items():
        base = f"{_group(name)}-off"
        baseline = reports.get(base) if base != name else None
        rows.append(summarize(name, report, baseline))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(rows))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    figure(rows, reports, out, out / "figure.png")
    print(f"{len(rows)} reports -> {out}/results.md, {out}/figure.png")
    return {"rows": rows}


if __name__ == "__main__":
    run_command(main)
