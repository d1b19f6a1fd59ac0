"""One row at a time: what kind of data a dataset holds, which layout each row has, and the
checks every field goes through.

The kind (preference pairs, demonstrations, judged completions) and the layout are read off the
first row that has one; every later row must have the same layout, so a dataset that mixes
layouts fails on the first row that differs instead of being half-read. :class:`RowChecker` is
the one place a field is validated: its errors name the source, the row and the field, and
``data check`` and training give the same verdict on every row because both read through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from preftune.data.records import Message, Record, Text
from preftune.data.sources import Row, Rows, Skipped, keep_or_raise
from preftune.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
KINDS = ("pairs", "sft", "unpaired")
"""Preference pairs (or ranked responses), demonstrations, judged completions."""

PAIR_FIELDS = {
    "standard": ("prompt", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "ranked": ("prompt", "responses"),
}
DEMO_FIELDS = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",)}
UNPAIRED_FIELDS = {"unpaired": ("prompt", "completion", "label")}
# Reward training holds margins as float32: a larger one, finite here, would be infinite there.
FLOAT32_MAX = 3.4028234663852886e38
Detector = Callable[[str, int, Row], str]
R = TypeVar("R", bound=Record)


def first_kind(rows: Rows) -> str:
    """The kind of data the first row of a known kind holds (``pairs`` when none does): pairs
    have ``chosen`` and ``rejected`` (or ``responses``), judged completions ``completion`` and
    ``label``, demonstrations ``completion`` or ``messages``."""
    for _, row in rows:
        if (has_field(row, "chosen") and has_field(row, "rejected")) or has_field(row, "responses"):
            return "pairs"
        if has_field(row, "completion") and has_field(row, "label"):
            return "unpaired"
        if has_field(row, "messages") or has_field(row, "completion"):
            return "sft"
    return "pairs"


def first_layout(spec: str, rows: Rows, detect: Detector, skipped: Skipped) -> tuple[str, int]:
    """The layout of the first row that has one, and that row's index; rows before it are bad.
    With no such row (only when collecting), ``("none", len(rows))``."""
    for index, (number, row) in enumerate(rows):
        try:
            return detect(spec, number, row), index
        except DataError as error:
            keep_or_raise(error, skipped)
    return "none", len(rows)


def convert_rows(
    spec: str,
    rows: Rows,
    layout: str,
    fields: Mapping[str, tuple[str, ...]],
    detect: Detector,
    read: Callable[[RowChecker], R],
    skipped: Skipped,
) -> list[R]:
    records = []
    for number, row in rows:
        check = RowChecker(spec, number, row)
        try:
            check.conforms(layout, fields[layout], detect)
            records.append(replace(read(check), row=number))
        except DataError as error:
            keep_or_raise(error, skipped)
    return records


def has_field(row: Row, field: str) -> bool:
    # Column-based sources (parquet, datasets) fill a field a row lacks with None.
    return row.get(field) is not None


def pair_layout(spec: str, number: int, row: Row) -> str:
    if has_field(row, "responses"):
        return "ranked"
    for field in ("chosen", "rejected"):
        if not has_field(row, field):
            columns = ", ".join(row) or "none"
            message = f"missing; preference data needs chosen and rejected (columns: {columns})"
            raise DataError(spec, message, row=number, field=field)
    if has_field(row, "prompt"):
        return "conversational" if isinstance(row["prompt"], list) else "standard"
    chosen = row["chosen"]
    if isinstance(chosen, str) and HUMAN in chosen and ASSISTANT in chosen:
        return "hh"
    return "implicit"


def demo_layout(spec: str, number: int, row: Row) -> str:
    if has_field(row, "prompt") and has_field(row, "completion"):
        return "prompt_completion"
    if has_field(row, "messages"):
        return "messages"
    field = "completion" if has_field(row, "prompt") else "messages"
    columns = ", ".join(row) or "none"
    message = f"missing; demos need prompt and completion, or messages (columns: {columns})"
    raise DataError(spec, message, row=number, field=field)


def unpaired_layout(spec: str, number: int, row: Row) -> str:
    for field_name in UNPAIRED_FIELDS["unpaired"]:
        if not has_field(row, field_name):
            columns = ", ".join(row) or "none"
            message = (
                "missing; KTO data needs prompt, completion and label, or chosen and rejected "
                f"pairs (columns: {columns})"
            )
            raise DataError(spec, message, row=number, field=field_name)
    return "unpaired"


class RowChecker:
    """Validates the fields of one row, raising errors that name the source, row and field."""

    def __init__(self, spec: str, number: int, row: Row) -> None:
        self.spec, self.number, self.row = spec, number, row

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(self.spec, message, row=self.number, field=field)

    def conforms(self, dataset: str, fields: tuple[str, ...], detect: Detector) -> None:
        """Checks the row has the dataset's fields, then that it has the dataset's layout."""
        for field in fields:
            if not has_field(self.row, field):
                raise self.error(f"missing (layout {dataset} needs {', '.join(fields)})", field)
            if dataset == "hh" and isinstance(self.row[field], str):
                # An empty transcript has no layout to detect: it is an empty response.
                self.nonempty(self.row[field], field)
        found = detect(self.spec, self.number, self.row)
        # A transcript-looking row in a plain implicit dataset is still a valid implicit pair.
        if found != dataset and (found, dataset) != ("hh", "implicit"):
            raise self.error(f"row has layout {found} but the dataset is {dataset}")

    def string(self, field: str, response: bool = False) -> str:
        value = self.row[field]
        if not isinstance(value, str):
            raise self.error(f"expected a string, got {type(value).__name__}", field)
        self.encodable(value, field)
        if response:
            self.nonempty(value, field)
        return value

    def encodable(self, text: str, field: str) -> None:
        """Text a tokenizer can take: JSON escapes can spell half of a UTF-16 surrogate pair."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            bad = f"U+{ord(text[error.start]):04X}"
            message = f"unpaired surrogate {bad} at character {error.start + 1}"
            raise self.error(message, field) from None

    def finite_number(self, value: Any, field: str) -> float:
        """``value`` as a finite float: every numeric field is read here. Booleans, strings, NaN,
        infinities and integers too large for a float (JSON allows any number of digits) are
        errors."""
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.error(f"expected a number, got {type(value).__name__}", field)
        try:
            number = float(value)
        except OverflowError:
            message = "expected a finite number, got an integer too large for a float"
            raise self.error(message, field) from None
        if not math.isfinite(number):
            raise self.error(f"expected a finite number, got {value}", field)
        return number

    def margin(self) -> float:
        """The pair's optional ``margin`` (0 without one), a number reward training can hold."""
        value = self.row.get("margin")
        if value is None:
            return 0.0
        margin = self.finite_number(value, "margin")
        if abs(margin) > FLOAT32_MAX:
            message = f"expected a number within ±{FLOAT32_MAX:.4g} (a float32), got {margin:.4g}"
            raise self.error(message, "margin")
        return margin

    def chosen_probability(self) -> float | None:
        """The pair's optional ``chosen_probability`` (None without one), a probability."""
        value = self.row.get("chosen_probability")
        if value is None:
            return None
        probability = self.finite_number(value, "chosen_probability")
        if not 0 <= probability <= 1:
            message = f"expected a probability in [0, 1], got {probability}"
            raise self.error(message, "chosen_probability")
        return probability

    def nonempty(self, text: Text, field: str) -> None:
        contents = [text] if isinstance(text, str) else [m["content"] for m in text]
        if not "".join(contents).strip():
            raise self.error("empty response", field)

    def conversation(self, field: str, response: bool = False) -> list[Message]:
        value = self.row[field]
        if not isinstance(value, list):
            raise self.error(f"expected a list of messages, got {type(value).__name__}", field)
        if not value:
            raise self.error("empty conversation", field)
        for index, message in enumerate(value):
            self.message(message, f"{field}[{index}]")
        if response:
            self.nonempty(value, field)
        return value

    def message(self, message: Any, field: str) -> None:
        if not isinstance(message, dict):
            got = type(message).__name__
            raise self.error(f"expected a message with role and content, got {got}", field)
        for key in ("role", "content"):
            if key not in message:
                raise self.error(f"message has no '{key}'", field)
        if message["role"] not in ROLES:
            valid = ", ".join(ROLES)
            raise self.error(f"unknown role {message['role']!r}; valid: {valid}", f"{field}.role")
        if not isinstance(message["content"], str):
            got = type(message["content"]).__name__
            raise self.error(f"expected a string, got {got}", f"{field}.content")
        self.encodable(message["content"], f"{field}.content")

    def text(self, field: str, conversational: bool, response: bool = False) -> Text:
        if conversational:
            return self.conversation(field, response)
        return self.string(field, response)

    def final_assistant(self, field: str) -> tuple[list[Message], list[Message]]:
        """A conversation split into everything before its last message and that message."""
        conversation = self.conversation(field)
        role = conversation[-1]["role"]
        if role != "assistant":
            message = f"the last message must be the assistant's, got role '{role}'"
            raise self.error(message, f"{field}[{len(conversation) - 1}].role")
        if len(conversation) == 1:
            raise self.error("no messages before the final assistant message to prompt it", field)
        self.nonempty(conversation[-1:], field)
        return conversation[:-1], conversation[-1:]
