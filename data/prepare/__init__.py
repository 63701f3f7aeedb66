"""Preparation of shards from user sources: `python -m data.prepare --help`."""

from data.prepare.core import Encoders, Item, prepare

__all__ = ["Encoders", "Item", "prepare"]
