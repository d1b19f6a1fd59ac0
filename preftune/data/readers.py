"""Rows into canonical records, by kind: preference pairs (and ranked responses),
demonstrations, judged completions. One loader, :func:`load_records`, dispatches on the kind.

Text is validated (by :class:`~preftune.data.rows.RowChecker`) but never rewritten: an implicit
prompt is split off, not re-rendered. Given a ``skipped`` list, the loaders collect every bad row
there (and leave it out) instead of stopping at the first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from preftune.data.ranked import read_ranked
from preftune.data.records import Demo, Pair, Ranked, Rated, Record
from preftune.data.rows import (
    ASSISTANT,
    DEMO_FIELDS,
    PAIR_FIELDS,
    UNPAIRED_FIELDS,
    RowChecker,
    convert_rows,
    demo_layout,
    first_kind,
    first_layout,
    pair_layout,
    unpaired_layout,
)
from preftune.data.sources import Columns, Rows, Skipped, read_rows
from preftune.errors import DataError

# CSV cells are text, so a label may also be written as the words true and false.
LABEL_WORDS = {"true": True, "false": False}


def load_records(
    spec: str,
    split: str = "train",
    kind: str = "auto",
    skipped: Skipped = None,
    columns: Columns | None = None,
) -> tuple[Sequence[Record], str, str]:
    """The records of ``spec`` (see ``read_rows``, which renames ``columns``) as ``kind``, with
    the layout's name and the
    kind: ``pairs`` (:class:`Pair`, or :class:`Ranked` for ranked rows), ``sft``
    (:class:`Demo`) or ``unpaired`` (:class:`Rated`); ``auto`` reads the kind off the first
    row (:func:`~preftune.data.rows.first_kind`). Each record carries its row number; with
    ``skipped``, bad rows are collected there."""
    return records_from_rows(spec, read_rows(spec, split, skipped, columns), kind, skipped)


def records_from_rows(
    spec: str, rows: Rows, kind: str = "auto", skipped: Skipped = None
) -> tuple[Sequence[Record], str, str]:
    """Records from rows already read (see :func:`load_records`)."""
    if kind == "auto":
        kind = first_kind(rows)
    read = {"pairs": pairs_from_rows, "sft": demos_from_rows, "unpaired": rated_from_rows}[kind]
    records, layout = read(spec, rows, skipped)
    return records, layout, kind


def load_pairs(
    spec: str, split: str = "train", skipped: Skipped = None, columns: Columns | None = None
) -> tuple[list[Pair] | list[Ranked], str]:
    """Preference pairs for a paired loss and the detected layout.

    Layouts: ``standard`` (prompt/chosen/rejected strings), ``conversational`` (the same as
    message lists), ``implicit`` (chosen/rejected only; the prompt is their shared start) and
    ``hh`` (Anthropic-HH transcripts; the prompt runs to the last ``"\\n\\nAssistant:"``);
    ``ranked`` rows (prompt, responses, and ranking or scores) become :class:`Ranked` records.
    A paired loss has no use for a ``margin`` column: the layout's name then notes that it is
    ignored (reward models read the same records, margins included). Every loader reads its
    rows with :func:`~preftune.data.sources.read_rows`, which renames ``columns``.
    """
    pairs, layout = pairs_from_rows(spec, read_rows(spec, split, skipped, columns), skipped)
    return pairs, noting_unused_margins(layout, pairs)


def load_preferences(
    spec: str, split: str = "train", skipped: Skipped = None, columns: Columns | None = None
) -> tuple[list[Pair] | list[Ranked], str]:
    """Pairs, each with its ``margin`` (0 without one), and ranked rows, for a reward model."""
    return pairs_from_rows(spec, read_rows(spec, split, skipped, columns), skipped)


def load_demos(
    spec: str, split: str = "train", skipped: Skipped = None, columns: Columns | None = None
) -> tuple[list[Demo], str]:
    """Demonstrations and the detected layout: ``prompt_completion`` (strings or message lists)
    or ``messages`` (one conversation; its last message, the assistant's, is the completion)."""
    return demos_from_rows(spec, read_rows(spec, split, skipped, columns), skipped)


def load_rated(
    spec: str, split: str = "train", skipped: Skipped = None, columns: Columns | None = None
) -> tuple[list[Rated], str]:
    """Judged completions and the layout: ``unpaired`` rows (``prompt``, ``completion``, a boolean
    ``label``) as they are, or pairs (any layout of :func:`load_pairs`) split by
    :func:`split_pairs`."""
    return rated_from_rows(spec, read_rows(spec, split, skipped, columns), skipped)


def pairs_from_rows(
    spec: str, rows: Rows, skipped: Skipped = None
) -> tuple[list[Pair] | list[Ranked], str]:
    """Pairs from rows already read (see ``load_pairs``), each with its row's ``margin`` (0
    without one), checked here so that every command and ``data check`` refuse the same rows;
    ranked rows become :class:`Ranked` records."""
    layout, first = first_layout(spec, rows, pair_layout, skipped)
    if layout == "ranked":
        fields = PAIR_FIELDS
        ranked = convert_rows(spec, rows[first:], layout, fields, pair_layout, read_ranked, skipped)
        return ranked, layout
    return _pairs(spec, rows, layout, first, skipped), layout


def _pairs(spec: str, rows: Rows, layout: str, first: int, skipped: Skipped) -> list[Pair]:
    """The pairs of ``rows[first:]``, rows of ``layout`` (any but ranked)."""
    if first == len(rows):
        return []
    read = PAIR_READERS[layout]
    # Whether implicit pairs are text or conversations is also fixed by the first row.
    if layout == "implicit" and isinstance(rows[first][1]["chosen"], list):
        read = _implicit_conversation
    with_columns = partial(_with_optional_columns, read)
    return convert_rows(spec, rows[first:], layout, PAIR_FIELDS, pair_layout, with_columns, skipped)


def noting_unused_margins(layout: str, pairs: Sequence[Pair] | Sequence[Ranked]) -> str:
    """``layout``, noting that a ``margin`` column is ignored when any pair has one, for readers
    whose loss has no use for it: a column read but silently dropped would look like it counted."""
    if any(isinstance(pair, Pair) and pair.margin for pair in pairs):
        return f"{layout}, column 'margin' ignored (only preftune rm reads it)"
    return layout


def demos_from_rows(spec: str, rows: Rows, skipped: Skipped = None) -> tuple[list[Demo], str]:
    """Demonstrations from rows already read (see ``load_demos``)."""
    layout, first = first_layout(spec, rows, demo_layout, skipped)
    if first == len(rows):
        return [], layout
    conversational = layout == "messages" or isinstance(rows[first][1]["prompt"], list)

    def read(check: RowChecker) -> Demo:
        return _read_demo(check, layout, conversational)

    demos = convert_rows(spec, rows[first:], layout, DEMO_FIELDS, demo_layout, read, skipped)
    return demos, layout


def rated_from_rows(spec: str, rows: Rows, skipped: Skipped = None) -> tuple[list[Rated], str]:
    """Judged completions from rows already read (see ``load_rated``)."""
    if first_kind(rows) == "pairs":
        layout, first = first_layout(spec, rows, pair_layout, skipped)
        if layout == "ranked":
            message = "ranked rows (responses) are for dpo and rm; KTO reads judged completions"
            raise DataError(spec, f"{message} (prompt, completion, label) or pairs")
        pairs = _pairs(spec, rows, layout, first, skipped)
        layout = f"{layout} pairs, split into desirable (chosen) and undesirable (rejected)"
        return split_pairs(pairs), noting_unused_margins(layout, pairs)
    layout, first = first_layout(spec, rows, unpaired_layout, skipped)
    if first == len(rows):
        return [], layout
    conversational = isinstance(rows[first][1]["prompt"], list)

    def read(check: RowChecker) -> Rated:
        prompt = check.text("prompt", conversational)
        completion = check.text("completion", conversational, response=True)
        return Rated(prompt, completion, _label(check))

    fields = UNPAIRED_FIELDS
    records = convert_rows(spec, rows[first:], layout, fields, unpaired_layout, read, skipped)
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


def _label(check: RowChecker) -> bool:
    value: Any = check.row["label"]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    message = f"expected true or false, got {type(value).__name__} {shown}"
    raise check.error(message, "label")


def _with_optional_columns(read: Callable[[RowChecker], Pair], check: RowChecker) -> Pair:
    """The pair ``read`` reads from the row, with the row's margin and chosen probability."""
    pair = read(check)
    return replace(pair, margin=check.margin(), chosen_probability=check.chosen_probability())


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


PAIR_READERS: dict[str, Callable[[RowChecker], Pair]] = {
    "standard": _standard,
    "conversational": _conversational,
    "implicit": _implicit_text,
    "hh": _hh,
}


def _read_demo(check: RowChecker, layout: str, conversational: bool) -> Demo:
    if layout == "messages":
        return Demo(*check.final_assistant("messages"))
    prompt = check.text("prompt", conversational)
    return Demo(prompt, check.text("completion", conversational, response=True))
