"""Read raw rows from wherever a dataset lives: a local file, a ``datasets`` directory, or the hub.

Every reader returns ``(row_number, row)`` pairs with 1-based row numbers that point back into
the source, so a later error can say exactly which row to fix. A row that cannot be read (bad
JSON, bad bytes, a wrong number of cells) raises, or, given a ``skipped`` list, is added to it and
left out, so that one pass can report every bad row; a source that cannot be read at all always
raises. JSON Lines and CSV files are read a line at a time and parquet files a batch of rows at a
time, so reading a file costs little more than the rows it holds.

Columns are renamed here, once, as rows come in (``data.columns``, :func:`renamed`): everything
after, layout detection included, sees preftune's field names.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from preftune.errors import DataError
from preftune.progress import imported_datasets

Row = dict[str, Any]
Rows = list[tuple[int, Row]]
Skipped = list[DataError] | None
Columns = Mapping[str, str]
"""preftune's field name (``prompt``, ``chosen``, …) to the column of the source that holds it."""
OPTIONAL_FIELDS = ("ranking", "scores", "margin", "chosen_probability")
"""Fields a row may go without: a ranked row orders its responses by a ranking or by scores, and
a pair's margin and chosen probability are optional. A row may lack the column mapped to one."""
NEWLINE = b"\n"
MAX_ROW_BYTES = 8 * 2**20
"""The most text one row may hold: the UTF-8 bytes of all its strings. A text is tokenized whole,
so that its tokens are exactly the tokenizer's, and that takes 100 to 200 bytes of memory per
byte of text at its peak; this keeps one row's peak under about 1.7 GB."""

ACCEPTED = ".jsonl, .json, .parquet, .csv, or a directory saved by datasets.save_to_disk"
# ``org/name`` with an optional ``:split``; anything else that does not exist is a missing file.
_HUB_ID = re.compile(r"^(?P<name>[\w][\w.-]*/[\w][\w.-]*)(?::(?P<split>[\w.-]+))?$")


def read_rows(
    spec: str, split: str = "train", skipped: Skipped = None, columns: Columns | None = None
) -> Rows:
    """The rows of the dataset named by ``spec``, each with its 1-based row number, with the
    columns ``columns`` names renamed to their fields (:func:`renamed`).

    ``spec`` is a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a directory written by
    ``datasets.save_to_disk``, or a hub id ``org/name`` (optionally ``org/name:split``, which
    overrides ``split``). Raises ``DataError`` naming the source (and row) on anything unreadable,
    on a row holding more than ``MAX_ROW_BYTES`` of text and on a row without a column
    ``columns`` names; with ``skipped``, such a row is appended there instead and the others are
    returned.
    """
    path = Path(spec).expanduser()
    before = len(skipped) if skipped is not None else 0
    if path.is_dir():
        rows = _read_saved_dataset(spec, path, split)
    elif path.is_file():
        rows = _read_file(spec, path, skipped)
    else:
        hub = _hub_id(spec)
        if hub is None:
            raise DataError(spec, "no such file")
        rows = _read_hub(spec, hub["name"], hub["split"] or split)
    rows = renamed(spec, _within_size_limit(spec, rows, skipped), columns, skipped)
    if not rows and (skipped is None or len(skipped) == before):
        raise DataError(spec, "no rows")
    return rows


def missing(spec: str) -> bool:
    """Whether ``spec`` names a local file or directory that is not there; a name that may be a
    hub id is never missing here (the hub is asked only when its rows are read)."""
    return not Path(spec).expanduser().exists() and _hub_id(spec) is None


def _hub_id(spec: str) -> re.Match[str] | None:
    """``spec`` as a hub id ``org/name[:split]``; None where it can only be a local path (a
    file's extension, or a start such as ``./`` or ``/``)."""
    if Path(spec).suffix.lower() in _READERS or spec.startswith((".", "/", "~")):
        return None
    return _HUB_ID.match(spec)


def _within_size_limit(spec: str, rows: Rows, skipped: Skipped) -> Rows:
    """``rows`` less those holding more than ``MAX_ROW_BYTES`` of text, each an error."""
    kept = []
    for number, row in rows:
        size = _text_bytes(row)
        if size <= MAX_ROW_BYTES:
            kept.append((number, row))
            continue
        limit = f"{MAX_ROW_BYTES:,} ({MAX_ROW_BYTES // 2**20} MiB)"
        message = f"too large: {size:,} bytes of text; a row may hold at most {limit}"
        keep_or_raise(DataError(spec, message, row=number), skipped)
    return kept


def renamed(spec: str, rows: Rows, columns: Columns | None, skipped: Skipped) -> Rows:
    """``rows`` with the column ``columns`` maps each field to renamed to the field: a column it
    names leaves the row under that name (whatever the row held under the field's name is
    replaced), and the columns it does not name stay as they are. A row without a named column
    is an error naming the column, unless the column is mapped to one of
    :data:`OPTIONAL_FIELDS`."""
    if not columns:
        return rows
    named = set(columns.values())
    required = {field: column for field, column in columns.items() if field not in OPTIONAL_FIELDS}
    kept = []
    for number, row in rows:
        absent = next((field for field, column in required.items() if column not in row), None)
        if absent is not None:
            found = ", ".join(row) or "none"
            message = (
                f"no column '{columns[absent]}', which data.columns maps {absent} to "
                f"(columns: {found})"
            )
            keep_or_raise(DataError(spec, message, row=number), skipped)
            continue
        fields = {field: row[column] for field, column in columns.items() if column in row}
        kept.append((number, {**{k: v for k, v in row.items() if k not in named}, **fields}))
    return kept


def _text_bytes(value: Any) -> int:
    """The UTF-8 size of every string in ``value``, dictionary keys included, however deeply
    nested (walked without recursion: a row may be nested as deeply as JSON allows)."""
    size, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            # Surrogates cannot be UTF-8; they count as the 3 bytes each that passing them takes.
            size += len(item) if item.isascii() else len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, dict):
            pending += item.keys()
            pending += item.values()
        elif isinstance(item, list | tuple):
            pending += item
    return size


def _read_file(spec: str, path: Path, skipped: Skipped) -> Rows:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        kind = f"'{path.suffix}'" if path.suffix else "with no extension"
        raise DataError(spec, f"unknown file type {kind}; accepted: {ACCEPTED}")
    try:
        return reader(spec, path, skipped)
    except OSError as error:
        raise DataError(spec, f"cannot read: {error.strerror or _one_line(error)}") from None


def keep_or_raise(error: DataError, skipped: Skipped) -> None:
    """Raise ``error``, or, when collecting, append it to ``skipped``."""
    if skipped is None:
        raise error
    skipped.append(error)


def _decode(spec: str, data: bytes, row: int | None = None) -> str:
    # utf-8-sig is as strict as utf-8 but accepts the byte-order mark some editors write.
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_start = data.rfind(NEWLINE, 0, error.start) + 1
        where = f"column {error.start - line_start + 1}"
        if row is None:
            where = f"line {data.count(NEWLINE, 0, error.start) + 1} {where}"
        message = f"not valid UTF-8: byte 0x{data[error.start]:02x} at {where}"
        raise DataError(spec, message, row=row) from None


def _as_object(spec: str, value: Any, row: int) -> Row:
    if not isinstance(value, dict):
        raise DataError(spec, f"expected a JSON object, got {_json_type(value)}", row=row)
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _read_jsonl(spec: str, path: Path, skipped: Skipped) -> Rows:
    with path.open("rb") as lines:
        return _parse_jsonl(spec, lines, skipped)


def _parse_jsonl(spec: str, lines: Iterable[bytes], skipped: Skipped) -> Rows:
    rows = []
    for number, raw in enumerate(lines, start=1):
        try:
            line = _decode(spec, raw, row=number).strip()
            if line:
                rows.append((number, _as_object(spec, _parse_json(spec, line, number), number)))
        except DataError as error:
            keep_or_raise(error, skipped)
    return rows


def _parse_json(spec: str, text: str, row: int | None = None) -> Any:
    """``json.loads``, with every way it can fail as a ``DataError``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"column {error.colno}" if row else f"line {error.lineno} column {error.colno}"
        what = error.msg.removesuffix(" at")  # some messages end in "at", e.g. "starting at"
        raise DataError(spec, f"invalid JSON: {what} at {where}", row=row) from None
    except RecursionError:
        raise DataError(spec, "invalid JSON: nested too deeply to read", row=row) from None
    except ValueError:  # an integer with more digits than Python converts
        raise DataError(spec, "invalid JSON: a number too long to read", row=row) from None


def _read_json(spec: str, path: Path, skipped: Skipped) -> Rows:
    text = _decode(spec, path.read_bytes())
    if not text or text.isspace():
        return []
    try:
        document = _parse_json(spec, text)
    except DataError as error:
        # A .json file holding one object per line is common enough to accept as JSON Lines.
        if error.message.startswith("invalid JSON: Extra data"):
            return _read_jsonl(spec, path, skipped)
        raise
    if isinstance(document, dict):
        lists = [key for key, value in document.items() if isinstance(value, list)]
        if len(lists) != 1:
            found = ", ".join(lists) or "none"
            message = f"expected a list of objects or an object holding one list; lists: {found}"
            raise DataError(spec, message)
        document = document[lists[0]]
    if not isinstance(document, list):
        raise DataError(spec, f"expected a list of objects, got {_json_type(document)}")
    rows = []
    for index, value in enumerate(document, 1):
        try:
            rows.append((index, _as_object(spec, value, index)))
        except DataError as error:
            keep_or_raise(error, skipped)
    return rows


def _read_csv(spec: str, path: Path, skipped: Skipped) -> Rows:
    # A cell may be as long as the file: enormous rows are for the size limit to refuse, not csv.
    limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)
    try:
        with path.open(encoding="utf-8-sig", newline="") as lines:
            return _parse_csv(spec, lines, skipped)
    except UnicodeDecodeError:
        _decode(spec, path.read_bytes())  # fails the same way, saying at which line and column
        raise
    except csv.Error as error:
        raise DataError(spec, f"cannot read as CSV: {error}") from None
    finally:
        csv.field_size_limit(limit)


def _parse_csv(spec: str, lines: Iterable[str], skipped: Skipped) -> Rows:
    reader = csv.DictReader(lines)
    rows = []
    for number, record in enumerate(reader, start=1):
        # DictReader files surplus cells under the key None and fills missing ones with None.
        surplus = record.pop(None, [])
        if surplus or None in record.values():
            cells = sum(value is not None for value in record.values()) + len(surplus)
            message = f"has {cells} cells but the header names {len(record)} columns"
            keep_or_raise(DataError(spec, message, row=number), skipped)
            continue
        rows.append((number, {key: _parse_cell(value) for key, value in record.items()}))
    return rows


def _parse_cell(text: str) -> Any:
    """A cell holding a JSON list (a conversation) becomes that list; any other text stays."""
    if not text.lstrip().startswith("["):
        return text
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return value if isinstance(value, list) else text


def _read_parquet(spec: str, path: Path, skipped: Skipped) -> Rows:
    import pyarrow  # imported here: pyarrow is slow to import and most runs read other files
    import pyarrow.parquet

    try:
        # A batch at a time: the whole table in Arrow's memory would double the rows' cost.
        with pyarrow.parquet.ParquetFile(path) as file:
            rows = (row for batch in file.iter_batches() for row in batch.to_pylist())
            return list(enumerate(rows, start=1))
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(spec, f"cannot read as parquet: {_one_line(error)}") from None


def _read_saved_dataset(spec: str, path: Path, split: str) -> Rows:
    datasets = imported_datasets()  # imported here: it takes seconds and few sources need it

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        message = f"not a directory saved by datasets.save_to_disk ({_one_line(error)})"
        raise DataError(spec, message) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(spec, f"no split '{split}'; available: {', '.join(loaded)}")
        loaded = loaded[split]
    return list(enumerate(loaded, start=1))


def _read_hub(spec: str, name: str, split: str) -> Rows:
    datasets = imported_datasets()

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:  # any failure (network, auth, missing split) is the user's to fix
        message = f"not a local file, and loading it from the hub failed: {_one_line(error)}"
        raise DataError(spec, message) from None
    return list(enumerate(loaded, start=1))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


_READERS: dict[str, Callable[[str, Path, Skipped], Rows]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}
