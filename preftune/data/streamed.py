"""A dataset's rows and records read a chunk at a time, with the verdicts of reading it whole:
the same records, layout and errors, in the same order.

A JSON Lines file is read a chunk of lines at a time, so memory holds one chunk's rows; any other
source is read whole, then handed out in chunks. Two things make chunks agree with the whole:

- A reader decides the dataset's kind, layout and form (text or conversation) from its leading
  rows, up to the first row it turns into a record, and then reads every row alone. That prefix
  of rows (the *anchor*) is read again before every later chunk, and what it gives is left out,
  so each chunk is read under the decisions the whole file gets.
- Reading the whole file finds errors stage after stage: every unparsable line, then every row
  too large, then every row without a column ``data.columns`` names, then every malformed row,
  then every row the chat template fails on. Errors are
  kept by stage (:class:`Verdicts`) and listed in that order, so ``data.on_error=skip`` reports
  the same rows and a run that stops raises the error the whole-file path raises first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from preftune.data.readers import (
    demos_from_rows,
    load_demos,
    load_pairs,
    load_preferences,
    load_rated,
    noting_unused_margins,
    pairs_from_rows,
    rated_from_rows,
)
from preftune.data.records import Pair, Ranked, Record
from preftune.data.sources import (
    Columns,
    Rows,
    _one_line,
    _parse_jsonl,
    _within_size_limit,
    read_rows,
    renamed,
)
from preftune.errors import DataError, PreftuneError

CHUNK_ROWS = 1000
CHUNK_BYTES = 4 * 2**20
"""A chunk ends at this many rows or bytes of lines, whichever comes first: a few seconds of
tokenizing, a few megabytes of text."""
STAGES = ("read", "size", "columns", "records", "encode")
RowReader = Callable[[str, Rows, list[DataError] | None], tuple[Sequence[Record], str]]


def _pairs_noting_margins(
    spec: str, rows: Rows, skipped: list[DataError] | None
) -> tuple[Sequence[Record], str]:
    """:func:`~preftune.data.readers.load_pairs` on rows already read."""
    pairs: list[Pair] | list[Ranked]
    pairs, layout = pairs_from_rows(spec, rows, skipped)
    return pairs, noting_unused_margins(layout, pairs)


ROW_READERS: dict[Callable[..., Any], RowReader] = {
    load_pairs: _pairs_noting_margins,
    load_preferences: pairs_from_rows,
    load_demos: demos_from_rows,
    load_rated: rated_from_rows,
}
"""Each loader of :mod:`preftune.data.readers`, as the reader of rows already read that it is."""


class Verdicts:
    """The errors found so far, by stage. Collecting (``data.on_error=skip``), a fatal error
    raises at once; otherwise the first error stops tokenizing (:attr:`failed`), an unparsable
    line is raised at once (nothing can come before it), and :meth:`raise_first` raises the
    first error in whole-file order once every line has been read."""

    def __init__(self, collect: bool) -> None:
        self.collect = collect
        self.stages: dict[str, list[PreftuneError]] = {stage: [] for stage in STAGES}

    @property
    def failed(self) -> bool:
        return not self.collect and any(self.stages.values())

    def add(self, stage: str, errors: Iterable[PreftuneError]) -> None:
        self.stages[stage] += errors
        if self.failed and self.stages[STAGES[0]]:
            raise self.stages[STAGES[0]][0]

    def fatal(self, stage: str, error: PreftuneError) -> None:
        if self.collect:
            raise error
        self.stages[stage].append(error)

    def raise_first(self) -> None:
        for errors in self.stages.values():
            if errors and not self.collect:
                raise errors[0]

    def skipped(self) -> list[DataError]:
        return [e for errors in self.stages.values() for e in errors if isinstance(e, DataError)]


def record_chunks(
    spec: str,
    split: str,
    read: RowReader,
    verdicts: Verdicts,
    layouts: list[str],
    chunk_rows: int = CHUNK_ROWS,
    columns: Columns | None = None,
) -> Iterator[list[Record]]:
    """The records of ``spec`` read with ``read``, a chunk at a time, as reading every row at
    once would give them (``columns`` renamed as ``read_rows`` renames them); errors go to
    ``verdicts`` and each chunk's layout to ``layouts``.
    Leading chunks are read together, trying after 1, 2, 4, … chunks, until the reader turns a
    row into a record; once the run is bound to fail, later chunks are only read for the errors
    that come before."""
    head: Rows = []
    anchor: Rows | None = None
    row_chunks = _row_chunks(spec, split, verdicts, chunk_rows, columns)
    for count, (rows, last) in enumerate(_with_last(row_chunks), start=1):
        if verdicts.failed or (anchor is not None and not rows):
            continue
        if anchor is None:
            head += rows
            if not last and count & (count - 1):  # not a power of two
                continue
        prefix, chunk = ([], head) if anchor is None else (anchor, rows)
        try:
            records, layout, errors = _read(spec, read, prefix, chunk)
        except PreftuneError as error:
            verdicts.fatal("records", error)
            continue
        if anchor is None and not (records or last):
            continue
        verdicts.add("records", errors)
        if anchor is None:
            anchor = [row for row in head if records and row[0] <= _row(records[0])]
        layouts.append(layout)
        yield records


def _read(
    spec: str, read: RowReader, anchor: Rows, rows: Rows
) -> tuple[list[Record], str, list[DataError]]:
    """The records of ``rows`` read after ``anchor``, their layout and their errors, less what
    the anchor's rows give."""
    first = rows[0][0] if rows else 0
    errors: list[DataError] = []
    records, layout = read(spec, [*anchor, *rows], errors)
    kept = [record for record in records if _row(record) >= first]
    return kept, layout, [error for error in errors if error.row is None or error.row >= first]


def _row(record: Record) -> int:
    # Records read from rows always carry their row number.
    return record.row if record.row is not None else 0


def _row_chunks(
    spec: str, split: str, verdicts: Verdicts, chunk_rows: int, columns: Columns | None
) -> Iterator[Rows]:
    """The rows of ``spec`` in chunks, at least one, possibly empty, ``columns`` renamed; errors
    of reading go to ``verdicts``."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".jsonl":
        yield from _jsonl_chunks(spec, path, verdicts, chunk_rows, columns)
        return
    errors: list[DataError] = []
    rows = read_rows(spec, split, errors, columns)
    verdicts.add("read", errors)
    for start in range(0, max(len(rows), 1), chunk_rows):
        yield rows[start : start + chunk_rows]


def _jsonl_chunks(
    spec: str, path: Path, verdicts: Verdicts, chunk_rows: int, columns: Columns | None
) -> Iterator[Rows]:
    """A JSON Lines file's rows, read, parsed, size-checked and renamed a chunk of lines at a
    time, each row numbered by its line as ``read_rows`` numbers it."""
    lines_before = rows_read = 0
    try:
        with path.open("rb") as file:
            while True:
                lines = _take_lines(file, chunk_rows)
                parse_errors: list[DataError] = []
                rows = _renumbered(_parse_jsonl(spec, lines, parse_errors), lines_before)
                verdicts.add("read", [_moved(error, lines_before) for error in parse_errors])
                size_errors: list[DataError] = []
                rows = _within_size_limit(spec, rows, size_errors)
                verdicts.add("size", size_errors)
                column_errors: list[DataError] = []
                rows = renamed(spec, rows, columns, column_errors)
                verdicts.add("columns", column_errors)
                lines_before += len(lines)
                rows_read += len(rows)
                if not lines and not rows_read and not any(verdicts.stages.values()):
                    raise DataError(spec, "no rows")
                yield rows
                if not lines:
                    return
    except OSError as error:
        raise DataError(spec, f"cannot read: {error.strerror or _one_line(error)}") from None


def _take_lines(file: BinaryIO, count: int) -> list[bytes]:
    lines: list[bytes] = []
    size = 0
    for line in file:
        lines.append(line)
        size += len(line)
        if len(lines) >= count or size >= CHUNK_BYTES:
            break
    return lines


def _renumbered(rows: Rows, offset: int) -> Rows:
    return [(number + offset, row) for number, row in rows]


def _moved(error: DataError, offset: int) -> DataError:
    row = None if error.row is None else error.row + offset
    return DataError(error.source, error.message, row=row, field=error.field)


def _with_last(items: Iterator[Rows]) -> Iterator[tuple[Rows, bool]]:
    """``items``, each with whether it is the last."""
    previous = next(items)
    for item in items:
        yield previous, False
        previous = item
    yield previous, True
