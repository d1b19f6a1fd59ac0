"""A digest of tokenized examples: what a run trains on, by content.

Two datasets get the same digest exactly when they encode to the same examples in the same
order (token ids, labels, margins, chosen probabilities), wherever and however they were read.
Where an example came from (its row number) and what is computed from it later (reference
log-probs) do not count. An optional field counts only when set, so examples without it keep
the digest they had before it existed (and with it the reference cache and resume checks).
Examples that know their digest (``content_digest``: those kept in Arrow, digested as they were
written) give it instead of being read again one by one. A mixture of sources
(:class:`~preftune.data.mixture.Mixture`) knows its own: a digest of its sources' digests and
of the order it takes their examples in, which changes whenever the examples it holds or their
order do (and differs from that of the same examples read from one file).
"""

from __future__ import annotations

import dataclasses
import hashlib
from array import array
from collections.abc import Iterable
from typing import Any

NOT_CONTENT = ("row", "reference_logps")
OPTIONAL_CONTENT = ("chosen_probability",)
"""Fields digested only when they are not None."""


def examples_digest(examples: Iterable[Any]) -> str:
    """A 128-bit hex digest of the content of ``examples``, dataclasses of encoded fields, or
    their own ``content_digest`` when they have one."""
    known = getattr(examples, "content_digest", None)
    if isinstance(known, str):
        return known
    digest = ExamplesDigest()
    digest.update(examples)
    return digest.hexdigest()


class ExamplesDigest:
    """:func:`examples_digest` of examples fed in parts, in order."""

    def __init__(self) -> None:
        self._digest = hashlib.blake2b(digest_size=16)

    def update(self, examples: Iterable[Any]) -> None:
        for example in examples:
            for field in dataclasses.fields(example):
                value = getattr(example, field.name)
                if field.name in NOT_CONTENT or (value is None and field.name in OPTIONAL_CONTENT):
                    continue
                _update(self._digest, value)
            self._digest.update(b";")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _update(digest: Any, value: Any) -> None:
    if isinstance(value, list | tuple):
        try:
            data = array("q", value).tobytes()  # a sequence of token ids, the common case
        except (TypeError, OverflowError):
            digest.update(b"[")
            for item in value:
                _update(digest, item)
            digest.update(b"]")
            return
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
        return
    digest.update(repr(value).encode())
    digest.update(b",")
