"""Detect a dataset's layout and turn its rows into canonical records.

The layout is read off the first row; every later row must have the same one, so a dataset that
mixes layouts fails on the first row that differs instead of being half-read. Text is validated
but never rewritten: an implicit prompt is split off, not re-rendered. Given a ``skipped`` list,
the loaders collect every bad row there (and leave it out) instead of stopping at the first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

from preftune.data.ranked import FIELDS as RANKED_FIELDS
from preftune.data.ranked import read_ranked
from preftune.data.records import Demo, Message, Pair, Ranked, Text
from preftune.data.sources import Row, Rows, Skipped, keep_or_raise, read_rows
from preftune.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"

PAIR_FIELDS = {
    "standard": ("prompt", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "ranked": RANKED_FIELDS,
}
DEMO_FIELDS = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",)}
# Reward training holds margins as float32: a larger one, finite here, would be infinite there.
FLOAT32_MAX = 3.4028234663852886e38
_Detector = Callable[[str, int, Row], str]
R = TypeVar("R", Pair, Demo)


def load_pairs(spec: str, split: str = "train", skipped: Skipped = None) -> tuple[list[Pair], str]:
    """Preference pairs from ``spec`` (see ``read_rows``) and the name of the detected layout.

    Layouts: ``standard`` (prompt/chosen/rejected strings), ``conversational`` (the same as
    message lists), ``implicit`` (chosen/rejected only; the prompt is their shared start) and
    ``hh`` (Anthropic-HH transcripts; the prompt runs to the last ``"\\n\\nAssistant:"``);
    ``ranked`` rows (prompt, responses, and ranking or scores) become :class:`Ranked` records.
    Each record carries its row number. With ``skipped``, bad rows are collected there.

    These pairs are for a paired loss, which has no use for a ``margin`` column: the layout's
    name then notes that it is ignored (``load_comparisons`` reads pairs for reward models).
    """
    pairs, layout = pairs_from_rows(spec, read_rows(spec, split, skipped), skipped)
    return pairs, noting_unused_margins(layout, pairs)


def load_demos(spec: str, split: str = "train", skipped: Skipped = None) -> tuple[list[Demo], str]:
    """Demonstrations from ``spec`` (see ``read_rows``) and the name of the detected layout.

    Layouts: ``prompt_completion`` (strings or message lists) and ``messages`` (one conversation;
    its last message, which must be the assistant's, is the completion). Each demonstration
    carries its row number. With ``skipped``, bad rows are collected there.
    """
    return demos_from_rows(spec, read_rows(spec, split, skipped), skipped)


def load_records(
    spec: str, split: str, kind: str, skipped: Skipped = None
) -> tuple[list[Pair] | list[Demo], str, str]:
    """Pairs, demonstrations or judged completions, the layout, and the kind (``pairs``,
    ``sft`` or ``unpaired``); ``kind="auto"`` reads pairs when the first row with any known
    layout has ``chosen`` and ``rejected`` (or ``responses``), judged completions when it has
    ``completion`` and ``label``."""
    return records_from_rows(spec, read_rows(spec, split, skipped), kind, skipped)


def records_from_rows(
    spec: str, rows: Rows, kind: str, skipped: Skipped = None
) -> tuple[list[Pair] | list[Ranked] | list[Demo], str, str]:
    """Records from rows already read (see ``load_records``)."""
    if kind == "auto":
        kind = _first_kind(rows)
    if kind == "unpaired":
        # Judged completions build on this module's readers.
        from preftune.data.unpaired import rated_from_rows

        records, layout = rated_from_rows(spec, rows, skipped)
        return records, layout, kind
    convert = pairs_from_rows if kind == "pairs" else demos_from_rows
    records, layout = convert(spec, rows, skipped)
    return records, layout, kind


def _first_kind(rows: Rows) -> str:
    for _, row in rows:
        if (has_field(row, "chosen") and has_field(row, "rejected")) or has_field(row, "responses"):
            return "pairs"
        if has_field(row, "completion") and has_field(row, "label"):
            return "unpaired"
        if has_field(row, "messages") or has_field(row, "completion"):
            return "sft"
    return "pairs"


def pairs_from_rows(
    spec: str, rows: Rows, skipped: Skipped = None
) -> tuple[list[Pair] | list[Ranked], str]:
    """Pairs from rows already read (see ``load_pairs``), each with its row's ``margin`` (0
    without one), checked here so that every command and ``data check`` refuse the same rows."""
    layout, first = first_layout(spec, rows, _pair_layout, skipped)
    if first == len(rows):
        return [], layout
    read = _PAIR_READERS[layout]
    # Whether implicit pairs are text or conversations is also fixed by the first row.
    if layout == "implicit" and isinstance(rows[first][1]["chosen"], list):
        read = _implicit_conversation
    if layout != "ranked":
        read = partial(_with_margin, read)
    pairs = convert_rows(spec, rows[first:], layout, PAIR_FIELDS, _pair_layout, read, skipped)
    return pairs, layout


def noting_unused_margins(layout: str, pairs: Sequence[Pair] | Sequence[Ranked]) -> str:
    """``layout``, noting that a ``margin`` column is ignored when any pair has one, for readers
    whose loss has no use for it: a column read but silently dropped would look like it counted."""
    if any(isinstance(pair, Pair) and pair.margin for pair in pairs):
        return f"{layout}, column 'margin' ignored (only preftune rm reads it)"
    return layout


def demos_from_rows(spec: str, rows: Rows, skipped: Skipped = None) -> tuple[list[Demo], str]:
    """Demonstrations from rows already read (see ``load_demos``)."""
    layout, first = first_layout(spec, rows, _demo_layout, skipped)
    if first == len(rows):
        return [], layout
    conversational = layout == "messages" or isinstance(rows[first][1]["prompt"], list)

    def read(check: RowChecker) -> Demo:
        return _read_demo(check, layout, conversational)

    demos = convert_rows(spec, rows[first:], layout, DEMO_FIELDS, _demo_layout, read, skipped)
    return demos, layout


def first_layout(spec: str, rows: Rows, detect: _Detector, skipped: Skipped) -> tuple[str, int]:
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
    fields: dict[str, tuple[str, ...]],
    detect: _Detector,
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


def _pair_layout(spec: str, number: int, row: Row) -> str:
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


def _demo_layout(spec: str, number: int, row: Row) -> str:
    if has_field(row, "prompt") and has_field(row, "completion"):
        return "prompt_completion"
    if has_field(row, "messages"):
        return "messages"
    field = "completion" if has_field(row, "prompt") else "messages"
    columns = ", ".join(row) or "none"
    message = f"missing; demos need prompt and completion, or messages (columns: {columns})"
    raise DataError(spec, message, row=number, field=field)


class RowChecker:
    """Validates the fields of one row, raising errors that name the source, row and field."""

    def __init__(self, spec: str, number: int, row: Row) -> None:
        self.spec, self.number, self.row = spec, number, row

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(self.spec, message, row=self.number, field=field)

    def conforms(self, dataset: str, fields: tuple[str, ...], detect: _Detector) -> None:
        """Checks the row has the dataset's fields, then that it has the dataset's layout."""
        for field in fields:
            if not has_field(self.row, field):
                raise self.error(f"missing (layout {dataset} needs {', '.join(fields)})", field)
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


def _with_margin(read: Callable[[RowChecker], Pair], check: RowChecker) -> Pair:
    """The pair ``read`` reads from the row, with the row's margin."""
    return replace(read(check), margin=check.margin())


def _standard(check: RowChecker) -> Pair:
    prompt = check.string("prompt")
    return Pair(prompt, check.string("chosen", True), check.string("rejected", True))


def _conversational(check: RowChecker) -> Pair:
    prompt = check.conversation("prompt")
    chosen = check.conversation("chosen", response=True)
    return Pair(prompt, chosen, check.conversation("rejected", response=True))


def _implicit_conversation(check: RowChecker) -> Pair:
    prompt, chosen = check.final_assistant("chosen")
    rejected_prompt, rejected = check.final_assistant("rejected")
    if rejected_prompt != prompt:
        message = "the messages before the final assistant message differ from chosen's"
        raise check.error(message, "rejected")
    return Pair(prompt, chosen, rejected)


def _implicit_text(check: RowChecker) -> Pair:
    chosen, rejected = check.string("chosen"), check.string("rejected")
    shared = next(
        (i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b),
        min(len(chosen), len(rejected)),
    )
    # Back off to the last whitespace so each response starts at a word boundary, as a
    # tokenizer would split it, rather than inside a word both happen to begin.
    cut = next((i for i in range(shared - 1, 0, -1) if chosen[i].isspace()), 0)
    if not chosen[:cut].strip():
        message = "chosen and rejected share no prompt (no common start up to a word boundary)"
        raise check.error(message, "rejected")
    return _split(check, chosen[:cut], chosen, rejected)


def _hh(check: RowChecker) -> Pair:
    chosen, rejected = check.string("chosen"), check.string("rejected")
    prompt = chosen[: chosen.rfind(ASSISTANT) + len(ASSISTANT)]
    if not rejected.startswith(prompt):
        message = "does not start with chosen's transcript up to its last '\\n\\nAssistant:'"
        raise check.error(message, "rejected")
    return _split(check, prompt, chosen, rejected)


def _split(check: RowChecker, prompt: str, chosen: str, rejected: str) -> Pair:
    pair = Pair(prompt, chosen[len(prompt) :], rejected[len(prompt) :])
    check.nonempty(pair.chosen, "chosen")
    check.nonempty(pair.rejected, "rejected")
    return pair


_PAIR_READERS = {
    "standard": _standard,
    "conversational": _conversational,
    "implicit": _implicit_text,
    "hh": _hh,
    "ranked": read_ranked,
}


def _read_demo(check: RowChecker, layout: str, conversational: bool) -> Demo:
    if layout == "messages":
        return Demo(*check.final_assistant("messages"))
    prompt = check.text("prompt", conversational)
    return Demo(prompt, check.text("completion", conversational, response=True))
