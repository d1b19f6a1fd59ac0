"""A dataset read, checked, tokenized and fitted a chunk of rows at a time, with the verdicts of
reading it whole: the same examples, truncation report, layout and errors.

Memory stays flat: rows and records come a chunk at a time (:mod:`preftune.data.streamed`),
each chunk's examples leave as an Arrow record batch (``write``), and only the errors and counts
stay behind. Chunks are tokenized in this process or, with ``num_proc`` > 1, in as many worker
processes, a few chunks ahead, in order.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from preftune.data.encode import Budget, ExpansionReport, TruncationReport
from preftune.data.records import Record
from preftune.data.sources import Columns
from preftune.data.streamed import CHUNK_ROWS, RowReader, Verdicts, record_chunks
from preftune.errors import DataError, PreftuneError

if TYPE_CHECKING:
    import pyarrow as pa

Encoder = Callable[..., tuple[list[Any], TruncationReport]]


@dataclass(frozen=True)
class Recipe:
    """How rows become examples: the reader of rows, the encoder (``encode_pairs``, …), the
    tokenizer, the length budget and the columns renamed as rows are read (``data.columns``)."""

    read: RowReader
    encode: Encoder
    tokenizer: PreTrainedTokenizerBase
    budget: Budget
    columns: Columns | None = None


@dataclass
class Outcome:
    """What encoding a whole dataset gave, besides its examples."""

    report: TruncationReport
    layout: str
    skipped: list[DataError]


def encode_in_chunks(
    spec: str,
    split: str,
    recipe: Recipe,
    write: Callable[[pa.RecordBatch], None],
    *,
    collect: bool,
    num_proc: int = 1,
    chunk_rows: int = CHUNK_ROWS,
) -> Outcome:
    """Read ``spec`` (a ``.jsonl`` file a chunk at a time, any other source whole), turn its
    rows into records and encode them a chunk at a time, handing each chunk's examples to
    ``write`` in order; ``collect`` is ``data.on_error=skip``."""
    verdicts = Verdicts(collect)
    layouts: list[str] = []
    records = record_chunks(spec, split, recipe.read, verdicts, layouts, chunk_rows, recipe.columns)
    report = None
    for piece in _encoded(spec, recipe, records, num_proc):
        verdicts.add("encode", piece.errors)
        if piece.fatal is not None:
            verdicts.fatal("encode", piece.fatal)
        report = piece.report if report is None else _sum(report, piece.report)
        if piece.batch is not None and not verdicts.failed:
            write(piece.batch)
    verdicts.raise_first()
    assert report is not None, "a run that does not fail encodes its first chunk"
    # Chunks' layouts differ only in what a reader notes of the records it saw (a margin column
    # it ignores); the longest notes everything the whole file's would.
    return Outcome(report, max(layouts, key=len), verdicts.skipped())


def _sum(total: TruncationReport, more: TruncationReport | None) -> TruncationReport:
    """Two chunks' reports as one; ranked rows' reports carry their expansion."""
    if more is None:
        return total
    kind = ExpansionReport if ExpansionReport in (type(total), type(more)) else TruncationReport
    return kind(
        **{f.name: getattr(total, f.name, 0) + getattr(more, f.name, 0) for f in fields(kind)}
    )


@dataclass
class _Piece:
    """One chunk encoded: its examples as a record batch (None when none is kept), its report,
    the rows left out, and the error that stopped it."""

    batch: pa.RecordBatch | None
    report: TruncationReport | None
    errors: list[DataError]
    fatal: PreftuneError | None = None


def _encode_piece(spec: str, recipe: Recipe, records: list[Record]) -> _Piece:
    # Imported here: pyarrow is slow to import, and only large datasets are encoded in chunks.
    from preftune.data.arrow import to_batch

    errors: list[DataError] = []
    try:
        examples, report = recipe.encode(
            records, recipe.tokenizer, recipe.budget, source=spec, skipped=errors
        )
    except PreftuneError as error:
        return _Piece(None, None, errors, error)
    batch = to_batch(examples) if examples else None
    return _Piece(batch, report, errors)


_WORKER: tuple[str, Recipe] | None = None


def _start_worker(spec: str, recipe: Recipe) -> None:
    global _WORKER
    _WORKER = (spec, recipe)
    # Ctrl-C reaches the whole process group: the main process alone stops, and stops these.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_piece(records: list[Record]) -> _Piece:
    assert _WORKER is not None, "the worker was started without its recipe"
    return _encode_piece(*_WORKER, records)


def _encoded(
    spec: str, recipe: Recipe, chunks: Iterator[list[Record]], num_proc: int
) -> Iterator[_Piece]:
    """Each chunk of records encoded, in order: here, or in ``num_proc`` worker processes
    (started fresh, so nothing of this process's threads or devices is forked), each with two
    chunks in hand at most."""
    if num_proc == 1:
        for records in chunks:
            yield _encode_piece(spec, recipe, records)
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        num_proc, mp_context=context, initializer=_start_worker, initargs=(spec, recipe)
    )
    try:
        pending: deque[Future[_Piece]] = deque()
        for records in chunks:
            pending.append(pool.submit(_worker_piece, records))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)
