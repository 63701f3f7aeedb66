"""A memory plan: per-GPU rows at the traced peak, with and without checkpointing, a verdict; Markdown and JSON."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(i?)(B?)\s*$", re.IGNORECASE)


def parse_size(text: str, name: str = "--gpu-memory") -> int:
    """Bytes of a size such as 80GiB, 80GB, 81920MiB, 1.5TB (GiB/MiB: powers of 1024; GB/MB: of 1000).
    Raises ValueError naming `name` and the value for anything else (no unit, unknown unit, <= 0)."""
    match = _SIZE.match(str(text))
    if not match or not (match.group(2) or match.group(4)) or (match.group(3) and not match.group(2)):
        raise ValueError(
            f"{name} {text!r}: expected a positive size with a unit (B, KB, MB, GB, TB or KiB, MiB, GiB, TiB), "
            "e.g. 80GiB, 80GB or 81920MiB"
        )
    number, prefix, binary = float(match.group(1)), match.group(2).upper(), bool(match.group(3))
    size = int(number * (1024 ** "KMGT".index(prefix) * 1024 if binary else _UNITS[prefix]))
    if size <= 0:
        raise ValueError(f"{name} {text!r}: the size must be positive")
    return size


def human(size: float) -> str:
    """1.23 GiB / 456.7 MiB / 12.3 KiB / 17 B."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{int(size)} B"


@dataclass
class Variant:
    """One traced step under one strategy: its per-GPU peak and what it held at that moment."""

    checkpointing: bool
    per_gpu_bytes: int
    parts: dict[str, int]  # category -> bytes per GPU at the peak
    largest: dict[str, int]  # category -> the most it held at once in the step (unsharded)
    steps: int
    seconds: float
    operators: int
    settled: bool = True


@dataclass
class Verdict:
    gpu_memory: int
    headroom: float  # the fraction kept free (CUDA context, NCCL, allocator fragmentation)
    fits: bool
    tried: list[tuple[str, int | None, str]] = field(default_factory=list)  # change, per-GPU bytes, note
    answer: str | None = None

    @property
    def usable(self) -> int:
        return int(self.gpu_memory * (1 - self.headroom))

    def lines(self, per_gpu: int) -> list[str]:
        margin = f"{human(self.usable)} usable = {human(self.gpu_memory)} less {self.headroom:.0%} headroom"
        if self.fits:
            return [f"**Verdict: fits** ({human(per_gpu)} per GPU; {margin})."]
        out = [f"**Verdict: does not fit** ({human(per_gpu)} per GPU; {margin})."]
        for change, size, note in self.tried:
            shown = human(size) if size is not None else "n/a"
            out.append(f"- {change}: {shown}{f' ({note})' if note else ''}")
        if self.answer:
            out.append(f"Cheapest change that fits: **{self.answer}**.")
        else:
            out.append("None of these changes makes it fit on this many GPUs: add GPUs or shorten the rollout further.")
        return out


_NETWORK_ROWS = {"param": "{} parameters", "frozen": "{} parameters (frozen)", "grad": "{} gradients",
                 "state": "{} optimizer states (AdamW)"}  # fmt: skip
_OTHER_ROWS = {
    "ema": "EMA copy",
    "text_encoder": "text encoder (frozen)",
    "activation": "activations (incl. batch and text states)",
    "buffer": "activations (incl. batch and text states)",
    "kv_cache": "KV cache + memory bank",
    "rollout": "rollout state (recent latents, carried sequence)",
    "optim_temp": "optimizer step temporaries",
}


def _row(category: str, rank: dict[str, int]) -> tuple[tuple, str]:
    """(sort key, row name) of a trace category (kind:network) or of a strategy constant's name."""
    kind, _, net = category.partition(":")
    if net == "text_encoder" or kind == "text_encoder":
        return (1, 1), _OTHER_ROWS["text_encoder"]
    if kind in _NETWORK_ROWS and net:
        return (0, rank.get(net, len(rank)), list(_NETWORK_ROWS).index(kind)), _NETWORK_ROWS[kind].format(net)
    if kind in _OTHER_ROWS:
        return (1, list(_OTHER_ROWS).index(kind)), _OTHER_ROWS[kind]
    return (2, 0), category  # a strategy's buffer, named by the strategy model


def _keyed_rows(parts: dict[str, int], order: list[str]) -> dict[str, list]:
    rank = {n: i for i, n in enumerate(order)}
    rows: dict[str, list] = {}
    for category, size in parts.items():
        key, name = _row(category, rank)
        rows.setdefault(name, [key, 0])[1] += size
    return rows


def group_rows(parts: dict[str, int], order: list[str]) -> list[tuple[str, int]]:
    """Rows (name, bytes) from categories: per network in `order` (parameters, gradients, optimizer states),
    then the EMA, text encoder, activations, KV cache, rollout state, optimizer temporaries, strategy buffers."""
    rows = _keyed_rows(parts, order)
    return [(name, entry[1]) for name, entry in sorted(rows.items(), key=lambda kv: kv[1][0])]


@dataclass
class Plan:
    """The planner's result. per_gpu_bytes and rows are the configured variant's (see `chosen`)."""

    title: str
    facts: list[str]
    variants: list[Variant]
    chosen: int
    networks: list[str]
    verdict: Verdict | None = None

    @property
    def per_gpu_bytes(self) -> int:
        """Peak bytes per GPU of the configured setting."""
        return self.variants[self.chosen].per_gpu_bytes

    @property
    def rows(self) -> list[tuple[str, int]]:
        """(what, bytes per GPU at the peak) of the configured setting; they sum to per_gpu_bytes."""
        return group_rows(self.variants[self.chosen].parts, self.networks)

    def to_markdown(self) -> str:
        heads = [f"checkpointing {'on' if v.checkpointing else 'off'}" for v in self.variants]
        heads = [h + (" (configured)" if i == self.chosen and len(heads) > 1 else "") for i, h in enumerate(heads)]
        keyed = [_keyed_rows(v.parts, self.networks) for v in self.variants]
        keys = {name: entry[0] for rows in keyed for name, entry in rows.items()}
        names = sorted(keys, key=keys.get)
        per_variant = [{name: entry[1] for name, entry in rows.items()} for rows in keyed]
        lines = [f"## {self.title}", "", *[f"- {f}" for f in self.facts], ""]
        lines += ["| per GPU, at the step's peak | " + " | ".join(heads) + " |", "|---" * (1 + len(heads)) + "|"]
        small = [n for n in names if all(rows.get(n, 0) < 1024 for rows in per_variant)]
        for name in [n for n in names if n not in small]:
            lines.append(f"| {name} | " + " | ".join(human(rows.get(name, 0)) for rows in per_variant) + " |")
        if small:
            cells = " | ".join(human(sum(rows.get(n, 0) for n in small)) for rows in per_variant)
            lines.append(f"| other ({', '.join(small)}) | {cells} |")
        lines.append(
            "| **peak per GPU** | " + " | ".join(f"**{human(v.per_gpu_bytes)}**" for v in self.variants) + " |"
        )
        lines.append("")
        for v in self.variants:
            kv, state = v.largest.get("kv_cache", 0), v.largest.get("rollout", 0)
            settled = "" if v.settled else " (the carried sequence had not settled: more steps may hold more)"
            lines.append(
                f"- checkpointing {'on' if v.checkpointing else 'off'}: traced {v.steps} training step(s), "
                f"{v.operators} operators in {v.seconds:.1f} s; the largest KV cache + bank held in the step was "
                f"{human(kv)}, rollout state {human(state)} (per GPU: no strategy shards them){settled}"
            )
        if self.verdict is not None:
            lines += ["", *self.verdict.lines(self.per_gpu_bytes)]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_gpu_bytes"] = self.per_gpu_bytes
        out["rows"] = [{"name": n, "bytes": b} for n, b in self.rows]
        return out

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
