"""Canonical records: every source layout becomes one of these at the edge.

Text fields are either plain strings or conversations (lists of ``{"role", "content"}``
messages); a conversation is rendered with the tokenizer's chat template at encoding time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Message = dict[str, str]
Text = str | list[Message]


@dataclass(frozen=True)
class Pair:
    """One preference: ``chosen`` is preferred to ``rejected`` as a reply to ``prompt``."""

    prompt: Text
    chosen: Text
    rejected: Text
    row: int | None = field(default=None, compare=False)
    """The 1-based row of the source it was read from, for messages; not part of its value."""


@dataclass(frozen=True)
class Demo:
    """One demonstration for supervised fine-tuning: ``completion`` answers ``prompt``."""

    prompt: Text
    completion: Text
    row: int | None = field(default=None, compare=False)
    """The 1-based row of the source it was read from, for messages; not part of its value."""
