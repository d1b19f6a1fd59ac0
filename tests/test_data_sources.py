"""Reading raw rows from every kind of source, and the one-line errors for unreadable ones."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet
import pytest

from preftune.data.sources import read_rows
from preftune.errors import DataError

ROWS = [
    {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
    {"prompt": "p2", "chosen": "c2", "rejected": "r2"},
]
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def write(path: Path, content: str | bytes) -> str:
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return str(path)


def read_error(spec: str, split: str = "train") -> str:
    with pytest.raises(DataError) as caught:
        read_rows(spec, split)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_jsonl_numbers_rows_by_line_and_skips_blank_lines(tmp_path: Path) -> None:
    text = json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n"
    spec = write(tmp_path / "pairs.jsonl", text)
    assert read_rows(spec) == [(1, ROWS[0]), (4, ROWS[1])]


def test_jsonl_accepts_crlf_and_byte_order_mark(tmp_path: Path) -> None:
    text = "\ufeff" + json.dumps(ROWS[0]) + "\r\n" + json.dumps(ROWS[1]) + "\r\n"
    assert read_rows(write(tmp_path / "pairs.jsonl", text)) == [(1, ROWS[0]), (2, ROWS[1])]


def test_jsonl_truncated_line_names_file_and_row(tmp_path: Path) -> None:
    text = json.dumps(ROWS[0]) + "\n" + '{"prompt": "p2", "chosen": "c'
    spec = write(tmp_path / "pairs.jsonl", text)
    message = read_error(spec)
    assert message.startswith(f"{spec}: row 2: invalid JSON: Unterminated string")


def test_jsonl_line_that_is_not_an_object_is_an_error(tmp_path: Path) -> None:
    spec = write(tmp_path / "pairs.jsonl", json.dumps(ROWS[0]) + "\n[1, 2]\n")
    assert read_error(spec) == f"{spec}: row 2: expected a JSON object, got a list"


def test_jsonl_undecodable_bytes_name_the_row(tmp_path: Path) -> None:
    spec = write(tmp_path / "pairs.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    assert read_error(spec) == f"{spec}: row 2: not valid UTF-8: byte 0xe9 at column 16"


def test_csv_content_in_a_jsonl_file_fails_on_row_1(tmp_path: Path) -> None:
    spec = write(tmp_path / "pairs.jsonl", "prompt,chosen,rejected\np,c,r\n")
    assert read_error(spec) == f"{spec}: row 1: invalid JSON: Expecting value at column 1"


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv"])
def test_empty_file_has_no_rows(tmp_path: Path, name: str) -> None:
    spec = write(tmp_path / name, "\n\n")
    assert read_error(spec) == f"{spec}: no rows"


def test_json_top_level_list(tmp_path: Path) -> None:
    spec = write(tmp_path / "pairs.json", json.dumps(ROWS))
    assert read_rows(spec) == [(1, ROWS[0]), (2, ROWS[1])]


def test_json_object_holding_one_list(tmp_path: Path) -> None:
    spec = write(tmp_path / "pairs.json", json.dumps({"version": 2, "data": ROWS}))
    assert read_rows(spec) == [(1, ROWS[0]), (2, ROWS[1])]


def test_json_object_holding_two_lists_is_ambiguous(tmp_path: Path) -> None:
    spec = write(tmp_path / "pairs.json", json.dumps({"train": ROWS, "test": ROWS}))
    message = "expected a list of objects or an object holding one list; lists: train, test"
    assert read_error(spec) == f"{spec}: {message}"


def test_json_list_item_that_is_not_an_object_names_its_row(tmp_path: Path) -> None:
    spec = write(tmp_path / "pairs.json", json.dumps([ROWS[0], "oops"]))
    assert read_error(spec) == f"{spec}: row 2: expected a JSON object, got a string"


def test_json_file_holding_json_lines_is_read_as_json_lines(tmp_path: Path) -> None:
    spec = write(tmp_path / "pairs.json", "\n".join(json.dumps(row) for row in ROWS))
    assert read_rows(spec) == [(1, ROWS[0]), (2, ROWS[1])]


def test_json_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    spec = write(tmp_path / "pairs.json", '[\n  {"prompt": }\n]')
    assert read_error(spec) == f"{spec}: invalid JSON: Expecting value at line 2 column 14"


def test_csv_rows_with_json_list_cells_parsed(tmp_path: Path) -> None:
    text = 'prompt,chosen\n"[INST] hi","[1"\n' + '"' + json.dumps(CHAT).replace('"', '""') + '",x\n'
    spec = write(tmp_path / "pairs.csv", text)
    assert read_rows(spec) == [
        (1, {"prompt": "[INST] hi", "chosen": "[1"}),
        (2, {"prompt": CHAT, "chosen": "x"}),
    ]


def test_csv_row_with_wrong_cell_count_names_the_row(tmp_path: Path) -> None:
    spec = write(tmp_path / "pairs.csv", "prompt,chosen,rejected\np,c,r\np,c\n")
    assert read_error(spec) == f"{spec}: row 2: has 2 cells but the header names 3 columns"


def test_csv_undecodable_bytes_give_line(tmp_path: Path) -> None:
    spec = write(tmp_path / "pairs.csv", b"prompt,chosen\np,c\xff\n")
    assert read_error(spec) == f"{spec}: not valid UTF-8: byte 0xff at line 2 column 4"


def test_parquet_rows_keep_nested_messages(tmp_path: Path) -> None:
    rows = [{"prompt": CHAT[:1], "chosen": CHAT[1:], "score": 1.5}]
    path = tmp_path / "pairs.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    assert read_rows(str(path)) == [(1, rows[0])]


def test_corrupt_parquet_is_a_data_error(tmp_path: Path) -> None:
    spec = write(tmp_path / "pairs.parquet", "not parquet")
    assert read_error(spec).startswith(f"{spec}: cannot read as parquet: ")


def test_saved_dataset_directory(tmp_path: Path) -> None:
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "ds")
    assert read_rows(str(tmp_path / "ds")) == [(1, ROWS[0]), (2, ROWS[1])]


def test_saved_dataset_dict_picks_split_or_names_available_ones(tmp_path: Path) -> None:
    splits = {"train": ROWS[:1], "test": ROWS[1:]}
    dataset = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    dataset.save_to_disk(tmp_path / "ds")
    spec = str(tmp_path / "ds")
    assert read_rows(spec, "test") == [(1, ROWS[1])]
    assert (
        read_error(spec, "validation") == f"{spec}: no split 'validation'; available: train, test"
    )


def test_directory_not_saved_by_datasets_is_an_error(tmp_path: Path) -> None:
    message = read_error(str(tmp_path))
    assert message.startswith(f"{tmp_path}: not a directory saved by datasets.save_to_disk")


def test_hub_id_with_split_suffix_overrides_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name: str, split: str) -> list[dict]:
        calls.append((name, split))
        return ROWS

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert read_rows("org/prefs:test", "train") == [(1, ROWS[0]), (2, ROWS[1])]
    assert read_rows("org/prefs") == [(1, ROWS[0]), (2, ROWS[1])]
    assert calls == [("org/prefs", "test"), ("org/prefs", "train")]


def test_hub_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(name: str, split: str) -> list[dict]:
        raise ConnectionError("offline\nretry later")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert read_error("org/prefs") == (
        "org/prefs: not a local file, and loading it from the hub failed: "
        "ConnectionError: offline retry later"
    )


@pytest.mark.parametrize("name", ["missing.jsonl", "sub/missing.parquet", "missing"])
def test_missing_local_file(tmp_path: Path, name: str) -> None:
    spec = str(tmp_path / name)
    assert read_error(spec) == f"{spec}: no such file"


def test_unknown_extension_lists_accepted_ones(tmp_path: Path) -> None:
    spec = write(tmp_path / "pairs.txt", "hello")
    assert read_error(spec) == (
        f"{spec}: unknown file type '.txt'; accepted: .jsonl, .json, .parquet, .csv, "
        "or a directory saved by datasets.save_to_disk"
    )
