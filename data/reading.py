"""Shard URLs -> raw samples (member suffix -> bytes), losing nothing silently that can be noticed.

WebDataset's own tar expander reports a truncated member zero, one or two times depending on where the cut
falls, and passes the partial sample on. Here a read error ends the shard and travels with the sample it
hit (`__error__`), so decoding counts each lost sample exactly once. URL expansion and opening stay
WebDataset's (braces, `pipe:`, http, `file:`).
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import webdataset as wds
from webdataset.tariterators import base_plus_ext


class ShardOpenError(RuntimeError):
    """A shard that cannot be opened at all (missing, a failing pipe): fatal, unlike bad samples. A shard that
    opens but holds no tar data (0 bytes, garbage) is a bad shard: skipped and counted like a bad sample."""


def local_path(url: str) -> str | None:
    """The file path of a local URL (plain path or file:), None for remote ones."""
    scheme = urlparse(url).scheme
    if scheme == "file":
        return url[len("file:") :].removeprefix("//")
    return url if scheme == "" or len(scheme) == 1 else None  # one letter: a Windows drive


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand shard URLs (and glob local ones); fail naming a pattern that matches nothing.

    Local files must exist now; remote URLs are checked when they are opened.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for pattern in patterns:
        for url in wds.shardlists.expand_urls(pattern):
            path = local_path(url)
            if path is None:
                out.append(url)
            elif glob.has_magic(path):
                matches = sorted(glob.glob(os.path.expanduser(path)))
                if not matches:
                    raise FileNotFoundError(f"shard pattern {pattern!r} matches no file ({path})")
                out.extend(matches)
            elif os.path.isfile(os.path.expanduser(path)):
                out.append(os.path.expanduser(path))
            else:
                raise FileNotFoundError(f"shard {path} (from {pattern!r}) does not exist")
    if not out:
        raise ValueError(f"shard list {urls!r} is empty")
    return out


def iter_raw_samples(url: str, on_unreadable: Callable[[str, str], None]) -> Iterator[dict[str, Any]]:
    """The samples of one shard, members grouped by key, in tar order.

    A read error ends the shard: the sample it hit is yielded with `__error__` set (decoding will find it
    incomplete), or, if no sample was under way, on_unreadable(url, reason) is called once.
    """
    try:
        stream = wds.gopen(url, "rb")
        tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 (closed below; open errors differ from read errors)
    except tarfile.ReadError as err:
        on_unreadable(url, "an empty file (0 bytes)" if str(err) == "empty file" else f"not a tar file ({err})")
        return
    except Exception as err:  # gopen raises whatever the scheme's opener raises
        raise ShardOpenError(f"cannot open shard {url}: {err}") from err

    current: dict[str, Any] | None = None
    closing = False  # the consumer stopped early: a pipe may complain on close, which is no data error
    try:
        with stream, tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, suffix = base_plus_ext(info.name)
                if key is None:
                    continue
                if current is not None and current["__key__"] != key:
                    done, current = current, None
                    try:
                        yield done
                    except GeneratorExit:
                        closing = True
                        raise
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[suffix.lower()] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        if closing:
            return
        if current is None:
            on_unreadable(url, f"unreadable tar data ({err})")
        else:
            current["__error__"] = f"{type(err).__name__}: {err}"
    if current is not None:
        yield current
