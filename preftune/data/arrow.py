"""Encoded examples kept in an Arrow file, memory-mapped, and read back one at a time.

A million pairs of a few hundred tokens are tens of gigabytes as Python lists of ints, held by
every process; as Arrow columns they are a file the operating system pages in as it is read and
shares between the processes of a machine. :class:`ArrowExamples` is a ``Sequence`` of the very
dataclasses the encoders build (:class:`EncodedPair`, …), each made when it is indexed, so the
batch sources, collators, layouts and objectives read it as they read a list.

The file is an Arrow IPC stream, the format ``datasets`` keeps its tables in
(``datasets.Dataset.from_file`` opens it). It is read with pyarrow directly: an example is a few
slices of zero-copy NumPy views, without ``datasets``' per-row formatting or its import.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, overload

import pyarrow as pa

from preftune.data.digest import ExamplesDigest
from preftune.data.encode import EncodedComparison, EncodedDemo, EncodedPair, EncodedRated

IDS = pa.list_(pa.int32())
EXAMPLE_KEY = b"preftune.example"
"""Schema metadata naming the dataclass the rows are."""


class Column(NamedTuple):
    """How one field of an encoded example is stored, and turned back into its Python value;
    an ``optional`` field's None is stored as null."""

    type: pa.DataType
    to_python: Callable[[Any], Any] | None = None
    optional: bool = False


def _ranking(value: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(place) for place in value)


CONTENT: dict[type, dict[str, Column]] = {
    EncodedPair: {
        "prompt_ids": Column(IDS),
        "chosen_ids": Column(IDS),
        "rejected_ids": Column(IDS),
        "chosen_probability": Column(pa.float64(), optional=True),
    },
    EncodedDemo: {"prompt_ids": Column(IDS), "completion_ids": Column(IDS)},
    EncodedRated: {
        "prompt_ids": Column(IDS),
        "completion_ids": Column(IDS),
        "desirable": Column(pa.bool_()),
    },
    EncodedComparison: {
        "prompt_ids": Column(IDS),
        "response_ids": Column(pa.list_(IDS)),
        "ranking": Column(pa.list_(pa.list_(pa.int32())), _ranking),
        "margin": Column(pa.float64()),
    },
}
"""The stored fields of each kind of example: its content, what the digest covers. Every kind
also stores its ``row``; reference log-probs are attached later, never stored. A file written
before an optional field existed lacks its column: its examples read back with the field's
default, None, as they were encoded then."""
ROW = Column(pa.int64())
EXAMPLE_TYPES = {example_type.__name__: example_type for example_type in CONTENT}


def schema(example_type: type) -> pa.Schema:
    """The Arrow schema of ``example_type``'s rows, naming the type in its metadata."""
    columns = {**CONTENT[example_type], "row": ROW}
    return pa.schema(
        [pa.field(name, column.type, nullable=column.optional) for name, column in columns.items()],
        metadata={EXAMPLE_KEY: example_type.__name__.encode()},
    )


def to_batch(examples: Sequence[Any]) -> pa.RecordBatch:
    """``examples``, encoded dataclasses of one kind (at least one), as an Arrow record batch."""
    fields = schema(type(examples[0]))
    arrays = [
        pa.array([getattr(example, field.name) for example in examples], field.type)
        for field in fields
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=fields)


class ExampleWriter:
    """Writes record batches of examples to an Arrow stream file at ``path``, counting their
    rows and digesting their content (:class:`ExamplesDigest`, the digest the same examples
    have in memory); the file opens with the first batch's schema."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self.digest = ExamplesDigest()
        self._sink: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        if self._writer is None:
            self._sink = pa.OSFile(str(self.path), "wb")
            self._writer = pa.ipc.new_stream(self._sink, batch.schema)
        self._writer.write_batch(batch)
        read = batch_reader(batch)
        self.digest.update(read(index) for index in range(batch.num_rows))
        self.rows += batch.num_rows

    def __enter__(self) -> ExampleWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._writer is None:
            # No example kept: an empty stream, so the file exists as its entry says.
            self._sink = pa.OSFile(str(self.path), "wb")
            self._writer = pa.ipc.new_stream(self._sink, pa.schema([]))
        self._writer.close()
        if self._sink is not None:
            self._sink.close()


Reader = Callable[[int], Any]


class ArrowExamples(Sequence[Any]):
    """The examples of an Arrow file written by :class:`ExampleWriter`, memory-mapped; indexing
    builds the encoded dataclass of that row. ``content_digest`` is their
    :func:`~preftune.data.digest.examples_digest`, computed as they were written, which that
    function returns rather than reading every example again."""

    def __init__(self, path: Path, content_digest: str) -> None:
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        self.path = path
        self.content_digest = content_digest
        self.example_type = EXAMPLE_TYPES[table.schema.metadata[EXAMPLE_KEY].decode()]
        batches = [batch for batch in table.to_batches() if batch.num_rows]
        self._ends = list(accumulate(batch.num_rows for batch in batches))
        self._readers = [batch_reader(batch) for batch in batches]

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        batch = bisect_right(self._ends, position)
        start = self._ends[batch - 1] if batch else 0
        return self._readers[batch](position - start)


def batch_reader(batch: pa.RecordBatch) -> Reader:
    """A reader of the examples of ``batch`` by row index: each the dataclass the batch's
    schema names, its fields read from zero-copy NumPy views of the columns."""
    example_type = EXAMPLE_TYPES[batch.schema.metadata[EXAMPLE_KEY].decode()]
    columns = {**CONTENT[example_type], "row": ROW}
    fields = {
        name: _field_reader(batch.column(name), column)
        for name, column in columns.items()
        if name in batch.schema.names
    }

    def read(index: int) -> Any:
        return example_type(**{name: field(index) for name, field in fields.items()})

    return read


def _field_reader(array: pa.Array, column: Column) -> Reader:
    """A reader of one field by row index, from zero-copy NumPy views of ``array``."""
    read = _value_reader(array)
    convert = column.to_python
    if convert is None:
        return read
    return lambda index: convert(read(index))


def _value_reader(array: pa.Array) -> Reader:
    if not pa.types.is_list(array.type):
        values = array.to_numpy(zero_copy_only=False)
        if array.null_count:
            null = array.is_null().to_numpy(zero_copy_only=False)
            return lambda index: None if null[index] else values[index].item()
        return lambda index: values[index].item()
    offsets = array.offsets.to_numpy()
    inner = array.values
    if not pa.types.is_list(inner.type):
        values = inner.to_numpy()
        return lambda index: values[offsets[index] : offsets[index + 1]].tolist()
    read_inner = _value_reader(inner)
    return lambda index: [read_inner(i) for i in range(offsets[index], offsets[index + 1])]
