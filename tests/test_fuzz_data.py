"""Fuzzing the loaders: whatever a file holds, only preftune's own errors come out.

Random bytes, and random JSON values in every field, are written as each supported file type
and read as pairs and as demonstrations, stopping at the first bad row and collecting every bad
row; what reads is then tokenized. Anything but a ``PreftuneError`` escaping is a failure.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.parquet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune.data.encode import (
    Budget,
    encode_comparisons,
    encode_demos,
    encode_pairs,
    encode_rated,
)
from preftune.data.readers import load_demos, load_pairs, load_preferences, load_rated, load_records
from preftune.errors import DataError, PreftuneError
from preftune.models.tiny import build_tokenizer

TOKENIZER = build_tokenizer()
FIELDS = (
    "prompt",
    "chosen",
    "rejected",
    "completion",
    "messages",
    "role",
    "content",
    "label",
    "margin",
    "responses",
    "ranking",
    "scores",
)
ROLES = ("system", "user", "assistant", "tool", "bot", "")
FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Numbers JSON can hold, a float cannot (past 308 digits), and float32 cannot (past 3.4e38).
numbers = st.integers() | st.floats() | st.sampled_from([10**400, -(10**400), 1e39])
scalars = (
    st.none()
    | st.booleans()
    | numbers
    | st.text(max_size=12)
    | st.sampled_from(["", " ", "\n\nHuman: hi\n\nAssistant: yo", "[1, 2]", "\ud800"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(ROLES) | json_values, "content": st.text(max_size=12)}
    )
    | json_values,
    max_size=3,
)
texts = st.text(min_size=1, max_size=16) | st.sampled_from(["\ud800x", "a\x00b", "😀", " "])
conversations = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": texts}),
    min_size=1,
    max_size=3,
)


def fields(*names: str, values: st.SearchStrategy = texts) -> st.SearchStrategy:
    """Rows with ``names``, each holding a value of ``values`` or, now and then, anything."""
    return st.fixed_dictionaries({name: values | json_values for name in names})


# Rows of every layout, most of them valid, each field now and then replaced by anything.
rows = st.one_of(
    fields("prompt", "chosen", "rejected"),
    fields("prompt", "chosen", "rejected", values=conversations),
    fields("chosen", "rejected"),
    fields("prompt", "completion"),
    fields("messages", values=conversations),
    st.fixed_dictionaries(
        {"prompt": texts, "completion": texts, "label": st.booleans() | json_values}
    ),
    st.fixed_dictionaries(
        {
            "prompt": texts,
            "responses": st.lists(texts | json_values, max_size=4),
            "ranking": st.lists(st.integers(-1, 4), max_size=4) | json_values,
        }
    ),
    st.fixed_dictionaries(
        {
            "prompt": texts,
            "responses": st.lists(texts, max_size=4),
            "scores": st.lists(numbers, max_size=4) | json_values,
            "margin": st.floats() | json_values,
        }
    ),
    st.fixed_dictionaries(
        {"prompt": texts, "chosen": texts, "rejected": texts, "margin": numbers | json_values}
    ),
    st.dictionaries(st.sampled_from(FIELDS), texts | messages | json_values),
)
datasets = st.lists(rows | json_values, max_size=5)


def write_all(folder: Path, dataset: list[Any]) -> list[Path]:
    """``dataset`` as every file type that can hold it."""
    paths = [folder / "d.jsonl", folder / "d.json"]
    paths[0].write_text("".join(json.dumps(row) + "\n" for row in dataset))
    paths[1].write_text(json.dumps(dataset))
    objects = [row for row in dataset if isinstance(row, dict)]
    if objects == dataset:
        columns = sorted({key for row in objects for key in row})
        if columns:
            text = io.StringIO()
            writer = csv.DictWriter(text, columns)
            writer.writeheader()
            for row in objects:
                writer.writerow(
                    {k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()}
                )
            paths.append(folder / "d.csv")
            paths[-1].write_text(text.getvalue(), encoding="utf-8", errors="surrogatepass")
        try:
            pyarrow.parquet.write_table(pyarrow.Table.from_pylist(objects), folder / "d.parquet")
            paths.append(folder / "d.parquet")
        except (pyarrow.ArrowException, ValueError, TypeError, OverflowError):
            pass  # types Arrow cannot put in one column; the other files still cover the rows
    return paths


def read_everything(path: Path) -> None:
    """Every way of reading ``path``; only ``PreftuneError``s may escape, and are swallowed."""
    readers = (
        (load_pairs, encode_pairs),
        (load_demos, encode_demos),
        (load_rated, encode_rated),
        (load_preferences, encode_comparisons),
    )
    for load, encode in readers:
        for skipped in (None, []):
            try:
                records, _ = load(str(path), "train", skipped)
                encode(records, TOKENIZER, Budget(32, 16), source=str(path), skipped=skipped)
            except PreftuneError:
                pass
            assert all(isinstance(e, DataError) and e.row for e in skipped or []), skipped
    with contextlib.suppress(DataError):
        load_records(str(path), "train", "auto", [])


@FUZZ
@given(dataset=datasets)
def test_random_json_in_every_field_gives_only_preftune_errors(dataset: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for path in write_all(Path(folder), dataset):
            read_everything(path)


@settings(FUZZ, max_examples=40)
@given(margin=numbers, scores=st.lists(numbers, min_size=2, max_size=2), label=numbers)
def test_any_number_in_a_numeric_field_gives_only_preftune_errors(
    margin: float, scores: list[float], label: float
) -> None:
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c", "margin": margin},
        {"prompt": "a", "responses": ["b", "c"], "scores": scores},
        {"prompt": "a", "completion": "b", "label": label},
    ]
    with tempfile.TemporaryDirectory() as folder:
        for row in rows:
            for path in write_all(Path(folder), [row]):
                read_everything(path)


@FUZZ
@given(content=st.binary(max_size=300), suffix=st.sampled_from(["jsonl", "json", "csv", "parquet"]))
def test_random_bytes_give_only_preftune_errors(content: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"d.{suffix}"
        path.write_bytes(content)
        read_everything(path)


@FUZZ
@given(
    position=st.integers(min_value=0, max_value=10_000),
    replacement=st.binary(min_size=0, max_size=4),
)
def test_corrupted_valid_file_gives_only_preftune_errors(position: int, replacement: bytes) -> None:
    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}
    content = "".join(json.dumps({**good, "n": n}) + "\n" for n in range(40)).encode()
    position %= len(content)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.jsonl"
        path.write_bytes(content[:position] + replacement + content[position + 2 :])
        read_everything(path)
