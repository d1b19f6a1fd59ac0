"""Unpaired, judged completions (KTO): read them, or split preference pairs into them, and encode.

A dataset is either unpaired, with ``prompt``, ``completion`` (strings or message lists) and a
boolean ``label`` (true: desirable) on every row, or paired, in any layout ``load_pairs``
accepts; then each pair becomes two rows: its chosen response desirable, its rejected one
undesirable, both carrying the pair's source row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from preftune.data.encode import TruncationReport, tokenize_and_fit
from preftune.data.formats import (
    RowChecker,
    convert_rows,
    first_layout,
    has_field,
    noting_unused_margins,
    pairs_from_rows,
)
from preftune.data.records import Pair, Rated
from preftune.data.sources import Row, Rows, Skipped, read_rows
from preftune.errors import DataError

UNPAIRED_FIELDS = {"unpaired": ("prompt", "completion", "label")}
# CSV cells are text, so a label may also be written as the words true and false.
LABEL_WORDS = {"true": True, "false": False}


@dataclass
class EncodedRated:
    """Token ids of one judged completion; the sequence is ``prompt_ids + completion_ids``."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    row: int | None = field(default=None, compare=False)


def load_rated(spec: str, split: str = "train", skipped: Skipped = None) -> tuple[list[Rated], str]:
    """Judged completions from ``spec`` (see ``read_rows``) and the name of the layout.

    The layout is read off the first row that has either ``label`` or ``chosen`` and
    ``rejected``: ``unpaired`` rows are read as they are; pairs (any layout of ``load_pairs``)
    are split by :func:`split_pairs`. With ``skipped``, bad rows are collected there.
    """
    return rated_from_rows(spec, read_rows(spec, split, skipped), skipped)


def rated_from_rows(spec: str, rows: Rows, skipped: Skipped = None) -> tuple[list[Rated], str]:
    """Judged completions from rows already read (see ``load_rated``)."""
    if _paired(rows):
        pairs, layout = pairs_from_rows(spec, rows, skipped)
        if layout == "ranked":
            message = "ranked rows (responses) are for dpo and rm; KTO reads judged completions"
            raise DataError(spec, f"{message} (prompt, completion, label) or pairs")
        layout = f"{layout} pairs, split into desirable (chosen) and undesirable (rejected)"
        return split_pairs(pairs), noting_unused_margins(layout, pairs)
    layout, first = first_layout(spec, rows, _unpaired_layout, skipped)
    if first == len(rows):
        return [], layout
    conversational = isinstance(rows[first][1]["prompt"], list)

    def read(check: RowChecker) -> Rated:
        prompt = check.text("prompt", conversational)
        completion = check.text("completion", conversational, response=True)
        return Rated(prompt, completion, _label(check))

    fields = UNPAIRED_FIELDS
    records = convert_rows(spec, rows[first:], layout, fields, _unpaired_layout, read, skipped)
    return records, layout


def split_pairs(pairs: Sequence[Pair]) -> list[Rated]:
    """Each pair as its chosen response, desirable, then its rejected one, undesirable."""
    return [
        rated
        for pair in pairs
        for rated in (
            Rated(pair.prompt, pair.chosen, True, pair.row),
            Rated(pair.prompt, pair.rejected, False, pair.row),
        )
    ]


def encode_rated(
    records: Sequence[Rated],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int | None,
    truncation: str = "keep_end",
    *,
    source: str = "data",
    skipped: list[DataError] | None = None,
) -> tuple[list[EncodedRated], TruncationReport]:
    """Token ids for each judged completion, fitted to the budget exactly as a demonstration is
    (see ``encode_pairs``), in source order."""
    budget = (max_length, max_prompt_length, truncation)
    encoded, report = tokenize_and_fit(records, tokenizer, budget, source, skipped)
    rated = [EncodedRated(e.prompt, e.responses[0], e.record.label, e.row) for e in encoded]
    return rated, report


def label_counts(examples: Sequence[EncodedRated]) -> tuple[int, int]:
    """How many examples are desirable, and how many undesirable."""
    desirable = sum(example.desirable for example in examples)
    return desirable, len(examples) - desirable


def _paired(rows: Rows) -> bool:
    for _, row in rows:
        if has_field(row, "label"):
            return False
        if (has_field(row, "chosen") and has_field(row, "rejected")) or has_field(row, "responses"):
            return True
    return False


def _unpaired_layout(spec: str, number: int, row: Row) -> str:
    for field_name in UNPAIRED_FIELDS["unpaired"]:
        if not has_field(row, field_name):
            columns = ", ".join(row) or "none"
            message = (
                "missing; KTO data needs prompt, completion and label, or chosen and rejected "
                f"pairs (columns: {columns})"
            )
            raise DataError(spec, message, row=number, field=field_name)
    return "unpaired"


def _label(check: RowChecker) -> bool:
    value: Any = check.row["label"]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    message = f"expected true or false, got {type(value).__name__} {shown}"
    raise check.error(message, "label")
