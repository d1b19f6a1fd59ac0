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
    margin: float = 0.0
    """How far the chosen reward should exceed the rejected one: the row's optional ``margin``
    column, 0 without it. Only reward models train on it."""
    chosen_probability: float | None = None
    """How likely ``chosen`` is the better reply, a number in [0, 1] (a judge's P(chosen ≻
    rejected)): the row's optional ``chosen_probability`` column, None without it. Paired losses
    train on it as a soft label under ``loss.soft_labels``."""

    @property
    def responses(self) -> tuple[Text, Text]:
        return self.chosen, self.rejected


@dataclass(frozen=True)
class Rated:
    """One judged completion, unpaired (KTO): ``completion`` as a reply to ``prompt`` is
    desirable (``label`` true) or undesirable."""

    prompt: Text
    completion: Text
    label: bool
    row: int | None = field(default=None, compare=False)
    """The 1-based row of the source it was read from, for messages; not part of its value."""

    @property
    def responses(self) -> tuple[Text]:
        return (self.completion,)


@dataclass(frozen=True)
class Demo:
    """One demonstration for supervised fine-tuning: ``completion`` answers ``prompt``."""

    prompt: Text
    completion: Text
    row: int | None = field(default=None, compare=False)
    """The 1-based row of the source it was read from, for messages; not part of its value."""

    @property
    def responses(self) -> tuple[Text]:
        return (self.completion,)


Ranking = tuple[tuple[int, ...], ...]
"""Indices of responses, best place first; the responses sharing a place are tied."""


@dataclass(frozen=True)
class Ranked:
    """Several replies to ``prompt``, ordered by ``ranking`` (indices into ``responses``).

    A ``ranking`` column gives one response per place; ``scores`` put responses with equal
    scores at the same place, where they are tied and form no pair.
    """

    prompt: Text
    responses: tuple[Text, ...]
    ranking: Ranking
    row: int | None = field(default=None, compare=False)
    """The 1-based row of the source it was read from, for messages; not part of its value."""


Record = Pair | Ranked | Demo | Rated
"""Every kind of record a source layout becomes."""


def preferences(ranking: Ranking) -> list[tuple[int, int]]:
    """Every ``(better, worse)`` pair of response indices that ``ranking`` orders, best first:
    the pairs of the top place with each later place, then the second place's, and so on."""
    return [
        (better, worse)
        for place, tier in enumerate(ranking)
        for better in tier
        for later in ranking[place + 1 :]
        for worse in later
    ]


def tied_pairs(ranking: Ranking) -> int:
    """How many pairs of responses ``ranking`` leaves unordered: those sharing a place."""
    return sum(len(tier) * (len(tier) - 1) // 2 for tier in ranking)
