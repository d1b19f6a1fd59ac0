"""Tokenized records fitted to a length budget: the examples every objective trains on.

A prompt longer than the budget's ``max_prompt_length`` keeps its end (``keep_end``) or its start
(``keep_start``); then each response is cut, keeping its start, to fit ``max_length``. A row
whose prompt alone fills ``max_length`` is dropped. Every encoder fits the same way and reports
what it did (:class:`TruncationReport`); nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from transformers import PreTrainedTokenizerBase

from preftune.data.records import (
    Demo,
    Pair,
    Ranked,
    Ranking,
    Rated,
    Record,
    preferences,
    tied_pairs,
)
from preftune.data.tokenize import Tokenized, tokenized
from preftune.errors import ConfigError, DataError

TRUNCATIONS = ("keep_end", "keep_start")
PAIR_RANKING: Ranking = ((0,), (1,))
"""A pair as a ranking: chosen first."""


@dataclass(frozen=True)
class Budget:
    """How long an example may be: the ``data.*`` length settings."""

    max_length: int
    max_prompt_length: int | None = None
    truncation: str = "keep_end"

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATIONS:
            expected = " or ".join(repr(name) for name in TRUNCATIONS)
            raise ConfigError(f"data.truncation: expected {expected}, got {self.truncation!r}")
        if self.max_length < 1:
            raise ConfigError(f"data.max_length: expected at least 1 token, got {self.max_length}")
        if self.max_prompt_length is not None and self.max_prompt_length < 0:
            got = self.max_prompt_length
            raise ConfigError(f"data.max_prompt_length: expected 0 or more, got {got}")

    def describe(self) -> str:
        prompt = "null" if self.max_prompt_length is None else self.max_prompt_length
        return (
            f"data.max_length={self.max_length}, data.max_prompt_length={prompt} "
            f"({self.truncation})"
        )


@dataclass
class EncodedPair:
    """Token ids of one preference pair; a sequence is ``prompt_ids + chosen_ids`` (or rejected)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    # Summed reference log-probs of (chosen, rejected), once they have been computed.
    reference_logps: tuple[float, float] | None = None
    # The row of the source data it came from (1-based), where known.
    row: int | None = field(default=None, compare=False)
    # The pair's P(chosen ≻ rejected), where its row gives one: its soft label.
    chosen_probability: float | None = None


@dataclass
class EncodedDemo:
    """Token ids of one demonstration; the sequence is ``prompt_ids + completion_ids``."""

    prompt_ids: list[int]
    completion_ids: list[int]
    row: int | None = field(default=None, compare=False)


@dataclass
class EncodedRated:
    """Token ids of one judged completion; the sequence is ``prompt_ids + completion_ids``."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    row: int | None = field(default=None, compare=False)


@dataclass
class EncodedComparison:
    """Token ids of one prompt and its responses; ``ranking`` orders ``response_ids``, and the
    first response's reward should exceed the second's by ``margin`` (pairs only)."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    ranking: Ranking
    margin: float = 0.0
    row: int | None = field(default=None, compare=False)


@dataclass
class TruncationReport:
    """What fitting rows into the length budget did; truncation counts are over kept rows.

    ``identical`` counts kept pairs whose responses are the same tokens: they carry no
    preference, so a paired loss has zero gradient on them.
    """

    rows: int
    prompts_truncated: int
    responses_truncated: int
    dropped: int
    kept: int
    identical: int = 0

    def summary(self) -> str:
        """One line, e.g. ``"1000 rows: 12 prompts truncated, 3 responses truncated, 1 dropped
        (prompt leaves no room for a response)"``."""
        text = (
            f"{_count(self.rows, 'row')}: {_count(self.prompts_truncated, 'prompt')} truncated, "
            f"{_count(self.responses_truncated, 'response')} truncated, {self.dropped} dropped"
        )
        if self.dropped:
            text += " (prompt leaves no room for a response)"
        if self.identical:
            text += (
                f"; {_count(self.identical, 'pair')} with chosen identical to rejected "
                "(no preference to learn)"
            )
        return text


@dataclass
class ExpansionReport(TruncationReport):
    """A truncation report of ranked rows, with the pairs they were expanded into and the pairs
    of tied responses, which give none."""

    pairs: int = 0
    tied: int = 0

    def summary(self) -> str:
        text = f"{super().summary()}; expanded into {_count(self.pairs, 'pair')}"
        if self.tied:
            text += f" ({_count(self.tied, 'pair')} of tied responses give none)"
        return text


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def encode_pairs(
    pairs: Sequence[Pair] | Sequence[Ranked],
    tokenizer: PreTrainedTokenizerBase,
    budget: Budget,
    *,
    source: str = "data",
    skipped: list[DataError] | None = None,
) -> tuple[list[EncodedPair], TruncationReport]:
    """Token ids for each pair, fitted to ``budget``. ``source`` names the data in errors; with
    ``skipped``, a row the chat template cannot render is collected there and left out instead
    of raised.

    A :class:`Ranked` record becomes one pair for each two responses its ranking orders, better
    one chosen. Its prompt and each response are tokenized and fitted once, and its pairs share
    the prompt's id list; the report is then an :class:`ExpansionReport`.
    """
    encoded, report = tokenize_and_fit(pairs, tokenizer, budget, source, skipped)
    # A pair's ranking puts chosen first, so a pair becomes the one pair it is, with its chosen
    # probability; a ranked row's pairs have none.
    expanded = [
        EncodedPair(
            e.prompt,
            e.responses[better],
            e.responses[worse],
            row=e.row,
            chosen_probability=e.record.chosen_probability if isinstance(e.record, Pair) else None,
        )
        for e in encoded
        for better, worse in preferences(_ranking(e))
    ]
    if not any(isinstance(record, Ranked) for record in pairs):
        return expanded, report
    identical = sum(pair.chosen_ids == pair.rejected_ids for pair in expanded)
    tied = sum(tied_pairs(_ranking(e)) for e in encoded)
    report = replace(report, identical=identical)
    return expanded, ExpansionReport(**vars(report), pairs=len(expanded), tied=tied)


def encode_demos(
    demos: Sequence[Demo],
    tokenizer: PreTrainedTokenizerBase,
    budget: Budget,
    *,
    source: str = "data",
    skipped: list[DataError] | None = None,
) -> tuple[list[EncodedDemo], TruncationReport]:
    """Token ids for each demonstration, fitted as in :func:`encode_pairs`."""
    encoded, report = tokenize_and_fit(demos, tokenizer, budget, source, skipped)
    return [EncodedDemo(e.prompt, e.responses[0], row=e.row) for e in encoded], report


def encode_rated(
    records: Sequence[Rated],
    tokenizer: PreTrainedTokenizerBase,
    budget: Budget,
    *,
    source: str = "data",
    skipped: list[DataError] | None = None,
) -> tuple[list[EncodedRated], TruncationReport]:
    """Token ids for each judged completion, fitted as in :func:`encode_pairs`, in source
    order."""
    encoded, report = tokenize_and_fit(records, tokenizer, budget, source, skipped)
    rated = [EncodedRated(e.prompt, e.responses[0], _desirable(e), e.row) for e in encoded]
    return rated, report


def encode_comparisons(
    records: Sequence[Pair] | Sequence[Ranked],
    tokenizer: PreTrainedTokenizerBase,
    budget: Budget,
    *,
    source: str = "data",
    skipped: list[DataError] | None = None,
) -> tuple[list[EncodedComparison], TruncationReport]:
    """Token ids of each record's prompt and responses for a reward model, fitted as in
    :func:`encode_pairs`: the prompt once, every response after it. A pair is a ranking of
    (chosen, rejected) with its margin; a ranked row keeps its ranking."""
    encoded, report = tokenize_and_fit(records, tokenizer, budget, source, skipped)
    comparisons = []
    for e in encoded:
        margin = e.record.margin if isinstance(e.record, Pair) else 0.0
        comparisons.append(EncodedComparison(e.prompt, e.responses, _ranking(e), margin, e.row))
    return comparisons, report


def _ranking(example: Tokenized) -> Ranking:
    """The ranking of the responses of the record ``example`` was tokenized from: a ranked
    record's own, a pair's chosen first."""
    return example.record.ranking if isinstance(example.record, Ranked) else PAIR_RANKING


def _desirable(example: Tokenized) -> bool:
    """The label of the judged completion ``example`` was tokenized from."""
    if not isinstance(example.record, Rated):
        raise TypeError(f"expected a judged completion (Rated), got {example.record!r}")
    return example.record.label


def label_counts(examples: Sequence[EncodedRated]) -> tuple[int, int]:
    """How many judged completions are desirable, and how many undesirable."""
    desirable = sum(example.desirable for example in examples)
    return desirable, len(examples) - desirable


def tokenize_and_fit(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    budget: Budget,
    source: str,
    skipped: list[DataError] | None,
) -> tuple[list[Tokenized], TruncationReport]:
    """``records`` tokenized and fitted to ``budget``: the steps every encoder shares. Each
    batch is fitted as it is tokenized, so only its untruncated ids are held at once."""
    return fit(tokenized(records, tokenizer, source, skipped), budget)


def fit(examples: Iterable[Tokenized], budget: Budget) -> tuple[list[Tokenized], TruncationReport]:
    """The examples cut to ``budget`` and what that did."""
    max_length, max_prompt_length = budget.max_length, budget.max_prompt_length
    kept: list[Tokenized] = []
    rows = prompts_cut = responses_cut = identical = 0
    for example in examples:
        rows += 1
        prompt, responses = example.prompt, example.responses
        prompt_limit = len(prompt) if max_prompt_length is None else max_prompt_length
        prompt_cut = len(prompt) > prompt_limit
        if prompt_cut:
            start = len(prompt) - prompt_limit if budget.truncation == "keep_end" else 0
            prompt = prompt[start : start + prompt_limit]
        room = max_length - len(prompt)
        if room < 1:
            continue
        prompts_cut += prompt_cut
        responses_cut += any(len(response) > room for response in responses)
        cut = [response[:room] for response in responses]
        identical += len(cut) > 1 and all(response == cut[0] for response in cut)
        kept.append(replace(example, prompt=prompt, responses=cut))
    report = TruncationReport(
        rows=rows,
        prompts_truncated=prompts_cut,
        responses_truncated=responses_cut,
        dropped=rows - len(kept),
        kept=len(kept),
        identical=identical,
    )
    return kept, report
