"""``preftune data check``: read a dataset exactly as training does and describe it.

Every bad row is collected (not just the first) so one run lists all there is to fix; the rows
that read well are tokenized and fitted with the same code and settings training uses, and
summarized: token length percentiles, what truncation does, duplicated pairs, and pairs whose
chosen and rejected responses are the same.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from transformers import PreTrainedTokenizerBase

from preftune.data.encode import Budget, fit
from preftune.data.readers import load_records
from preftune.data.records import Pair, Ranked, Rated, Record, preferences, tied_pairs
from preftune.data.sources import Columns
from preftune.data.tokenize import Tokenized, tokenize
from preftune.errors import DataError

PERCENTILES = (50, 90, 99)
# What a dataset of each kind holds, and what its rows are called.
KIND_NAMES = {
    "pairs": ("preference pairs", "pairs"),
    "sft": ("demonstrations", "demonstrations"),
    "unpaired": ("judged completions", "completions"),
}
SHOWN_ROWS = 5


@dataclass
class DataCheck:
    """The outcome for one dataset: its summary lines and every problem found."""

    summary: list[str]
    problems: list[DataError] = field(default_factory=list)


def check_dataset(
    spec: str,
    split: str,
    kind: str,
    tokenizer: PreTrainedTokenizerBase,
    budget: Budget,
    columns: Columns | None = None,
) -> DataCheck:
    """Read ``spec`` as ``kind`` (``pairs``, ``sft``, ``unpaired`` or ``auto``), its ``columns``
    renamed (``data.columns``), and describe it.

    A source that cannot be read at all is one problem and no summary.
    """
    problems: list[DataError] = []
    try:
        records, layout, kind = load_records(spec, split, kind, problems, columns)
    except DataError as error:
        return DataCheck([], [error])
    rows = len(records) + len(problems)
    tokenized = tokenize(records, tokenizer, spec, problems)
    names = ("prompt", "chosen", "rejected") if kind == "pairs" else ("prompt", "completion")
    what, noun = KIND_NAMES[kind]
    table = tokenized
    if layout == "ranked":
        # Rows rank different numbers of responses: one column for the longest of each.
        table = [replace(e, responses=[max(e.responses, key=len)]) for e in tokenized]
        names = ("prompt", "longest response")
        what, noun = "ranked responses", "rows"
    summary = [f"{spec}: {rows} rows of {what}, layout {layout}"]
    if tokenized:
        summary += length_table(table, names)
        _, report = fit(tokenized, budget)
        summary.append(f"  fitted to {budget.describe()}: {report.summary()}")
    summary.append(f"  duplicated {noun}: {describe_duplicates(duplicates(records))}")
    if layout == "ranked":
        summary += ranked_summary([record for record in records if isinstance(record, Ranked)])
    elif kind == "pairs":
        pairs = [record for record in records if isinstance(record, Pair)]
        same = [pair.row for pair in pairs if pair.chosen == pair.rejected]
        summary.append(f"  chosen identical to rejected: {describe_rows(same)}")
    elif kind == "unpaired":
        desirable = sum(record.label for record in records if isinstance(record, Rated))
        summary.append(f"  desirable: {desirable}; undesirable: {len(records) - desirable}")
    problems.sort(key=lambda problem: problem.row or 0)
    listed = " (one line each, on stderr)" if problems else ""
    summary.append(f"  rows with problems: {len(problems)}{listed}")
    return DataCheck(summary, problems)


def ranked_summary(records: Sequence[Ranked]) -> list[str]:
    """The pairs ranked rows expand into, and the rows that rank a response above itself."""
    ordered = [preferences(record.ranking) for record in records]
    tied = sum(tied_pairs(record.ranking) for record in records)
    same = [
        record.row
        for record, pairs in zip(records, ordered, strict=True)
        if any(record.responses[i] == record.responses[j] for i, j in pairs)
    ]
    return [
        f"  expands into {sum(map(len, ordered))} pairs ({tied} pairs of tied responses give none)",
        f"  a response identical to one ranked below it: {describe_rows(same)}",
    ]


def length_table(tokenized: Sequence[Tokenized], names: Sequence[str]) -> list[str]:
    """Token length percentiles of each part and of the longest whole sequence of each row."""
    columns: list[list[int]] = [[len(example.prompt) for example in tokenized]]
    for index in range(len(names) - 1):
        columns.append([len(example.responses[index]) for example in tokenized])
    columns.append([len(e.prompt) + max(len(r) for r in e.responses) for e in tokenized])
    labels = [*names, "total"]
    width = max(len(label) for label in labels)
    heads = [f"p{p}" for p in PERCENTILES] + ["max"]
    lines = [f"  {'tokens':<{width}}" + "".join(f"{head:>8}" for head in heads)]
    for label, values in zip(labels, columns, strict=True):
        cells = "".join(f"{value:>8}" for value in percentiles(values))
        lines.append(f"  {label:<{width}}{cells}")
    lines.append("  (total: the prompt and its longer response; all before truncation)")
    return lines


def percentiles(values: Sequence[int]) -> list[int]:
    """The nearest-rank 50th, 90th and 99th percentiles and the maximum of ``values``."""
    ordered = sorted(values)
    ranks = [max(math.ceil(p / 100 * len(ordered)), 1) for p in PERCENTILES]
    return [ordered[rank - 1] for rank in ranks] + [ordered[-1]]


def duplicates(records: Sequence[Record]) -> list[tuple[int | None, int | None]]:
    """``(row, earlier row)`` for each record equal to an earlier one."""
    first: dict[str, int | None] = {}
    repeats = []
    for record in records:
        key = json.dumps(_value(record), sort_keys=True, ensure_ascii=False)
        if key in first:
            repeats.append((record.row, first[key]))
        else:
            first[key] = record.row
    return repeats


def _value(record: Record) -> list:
    if isinstance(record, Rated):
        return [record.prompt, record.completion, record.label]
    if isinstance(record, Pair):
        return [record.prompt, record.chosen, record.rejected]
    if isinstance(record, Ranked):
        return [record.prompt, list(record.responses), list(record.ranking)]
    return [record.prompt, record.completion]


def describe_duplicates(repeats: Sequence[tuple[int | None, int | None]]) -> str:
    shown = "; ".join(f"row {row} repeats row {earlier}" for row, earlier in repeats[:SHOWN_ROWS])
    more = "; …" if len(repeats) > SHOWN_ROWS else ""
    return f"{len(repeats)} ({shown}{more})" if repeats else "0"


def describe_rows(rows: Sequence[int | None]) -> str:
    """``"3 (rows 4, 9, 12)"``: a count and the first few row numbers."""
    return f"{len(rows)} ({_rows_phrase(rows)})" if rows else "0"


def _rows_phrase(rows: Sequence[int | None]) -> str:
    shown = ", ".join(str(row) for row in rows[:SHOWN_ROWS])
    more = ", …" if len(rows) > SHOWN_ROWS else ""
    return f"{'row' if len(rows) == 1 else 'rows'} {shown}{more}"


def describe_skipped(source: str, skipped: Sequence[DataError]) -> str:
    """One line on the rows ``data.on_error=skip`` left out: how many, why, and where, e.g.
    ``"pairs.jsonl: skipped 3 malformed rows (data.on_error=skip): 2 × invalid JSON (rows 4, 9);
    1 × field 'chosen': empty response (row 12)"``."""
    parts = []
    for reason, count in Counter(problem.reason for problem in skipped).most_common():
        rows = [p.row for p in skipped if p.reason == reason and p.row is not None]
        where = f" ({_rows_phrase(rows)})" if rows else ""
        parts.append(f"{count} × {reason}{where}")
    noun = "row" if len(skipped) == 1 else "rows"
    head = f"{source}: skipped {len(skipped)} malformed {noun} (data.on_error=skip): "
    return head + "; ".join(parts)
