"""Hostile datasets: each is preftune's own one-line DataError naming the file, row and field, or
is handled and counted; ``data.on_error=skip`` trains on the good rows and reports the rest."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from preftune.commands.dpo import DPOConfig, run_dpo
from preftune.config import load_config
from preftune.data.check import check_dataset
from preftune.data.encode import Budget, encode_pairs
from preftune.data.readers import load_demos, load_pairs
from preftune.data.records import Pair
from preftune.data.sources import MAX_ROW_BYTES
from preftune.errors import ConfigError, DataError
from preftune.models.tiny import build_tokenizer
from tests.conftest import SAMPLE_TRAIN

GOOD = {"prompt": "What is 1 plus 1?\n", "chosen": "2.", "rejected": "No idea."}
SCORED = {"prompt": "What is 1 plus 1?\n", "responses": ["2.", "No idea."], "scores": [1, 0]}
HUGE = 10**400  # valid JSON; more than a float holds
USER = {"role": "user", "content": "hi"}
REPLY = {"role": "assistant", "content": "hello"}


def line(row: object) -> bytes:
    return (json.dumps(row) + "\n").encode()


def csv_bytes(rows: list[dict]) -> bytes:
    """``rows`` as CSV, each value that is not a string written as JSON."""
    text = io.StringIO()
    writer = csv.DictWriter(text, list({key: None for row in rows for key in row}))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()})
    return text.getvalue().encode()


def write_as(path: Path, rows: list[dict]) -> str:
    """``rows`` written in the format ``path``'s suffix names."""
    if path.suffix == ".parquet":
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        path.write_bytes(csv_bytes(rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_bytes(b"".join(line(row) for row in rows))
    return str(path)


def error_of(path: Path, content: bytes, load=load_pairs) -> DataError:
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load(str(path))
    assert "\n" not in str(caught.value)
    return caught.value


# (what, file name, content, row, field, message fragment)
ROW_ERRORS = [
    ("truncated line", "p.jsonl", line(GOOD) + b'{"prompt": "a", "cho', 2, None, "invalid JSON"),
    ("missing field", "p.jsonl", line(GOOD) + line({"prompt": "a", "chosen": "b"}), 2,
     "rejected", "missing"),
    ("null field", "p.jsonl", line(GOOD) + line({**GOOD, "rejected": None}), 2, "rejected",
     "missing"),
    ("mistyped field", "p.jsonl", line(GOOD) + line({**GOOD, "chosen": 5}), 2, "chosen",
     "expected a string, got int"),
    ("NaN field", "p.jsonl", line(GOOD) + b'{"prompt": "a", "chosen": NaN, "rejected": "b"}\n', 2,
     "chosen", "expected a string, got float"),
    ("empty response", "p.jsonl", line({**GOOD, "rejected": ""}), 1, "rejected",
     "empty response"),
    ("blank response", "p.jsonl", line(GOOD) * 3 + line({**GOOD, "chosen": " \n\t"}), 4,
     "chosen", "empty response"),
    ("unknown role", "p.jsonl",
     line({"prompt": [{"role": "bot", "content": "x"}], "chosen": [REPLY], "rejected": [REPLY]}),
     1, "prompt[0].role", "unknown role 'bot'"),
    ("message without content", "p.jsonl",
     line({"prompt": [USER], "chosen": [{"role": "assistant"}], "rejected": [REPLY]}), 1,
     "chosen[0]", "message has no 'content'"),
    ("empty conversation", "p.jsonl", line({"prompt": [], "chosen": [REPLY], "rejected": [REPLY]}),
     1, "prompt", "empty conversation"),
    ("undecodable bytes", "p.jsonl", line(GOOD) + b'{"prompt": "\xff\xfe", "chosen": "a"}\n', 2,
     None, "not valid UTF-8: byte 0xff"),
    ("csv named jsonl", "p.jsonl", b"prompt,chosen,rejected\na,b,c\n", 1, None, "invalid JSON"),
    ("array row", "p.jsonl", line(GOOD) + b"[1, 2]\n", 2, None, "expected a JSON object"),
    ("deep nesting", "p.jsonl", line(GOOD) + b"[" * 100_000 + b"]" * 100_000 + b"\n", 2, None,
     "nested too deeply"),
    ("huge number", "p.jsonl", line(GOOD) + b'{"prompt": ' + b"9" * 5000 + b"}\n", 2, None,
     "a number too long"),
    ("unpaired surrogate", "p.jsonl", line(GOOD) + b'{"prompt": "a", "chosen": "x\\ud800", '
     b'"rejected": "b"}\n', 2, "chosen", "unpaired surrogate U+D800 at character 2"),
    ("mixed layouts", "p.jsonl",
     line(GOOD) + line({"prompt": [USER], "chosen": [REPLY], "rejected": [REPLY]}), 2, None,
     "row has layout conversational but the dataset is standard"),
    ("implicit then standard", "p.jsonl",
     line({"chosen": "a b", "rejected": "a c"}) + line(GOOD), 2, None,
     "row has layout standard but the dataset is implicit"),
    ("json list item", "p.json", json.dumps([GOOD, "text"]).encode(), 2, None,
     "expected a JSON object, got a string"),
    ("csv short row", "p.csv", b"prompt,chosen,rejected\na,b,c\na,b\n", 2, None,
     "has 2 cells but the header names 3 columns"),
    ("huge integer margin", "p.jsonl", line(GOOD) + line({**GOOD, "margin": HUGE}), 2, "margin",
     "expected a finite number, got an integer too large for a float"),
    ("infinite margin", "p.jsonl", line(GOOD) + line({**GOOD, "margin": float("inf")}), 2,
     "margin", "expected a finite number, got inf"),
    ("huge integer score", "p.jsonl", line(SCORED) + line({**SCORED, "scores": [HUGE, 0]}), 2,
     "scores[0]", "expected a finite number, got an integer too large for a float"),
    ("csv huge integer score", "p.csv", csv_bytes([SCORED, {**SCORED, "scores": [1, -HUGE]}]), 2,
     "scores[1]", "expected a finite number, got an integer too large for a float"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "row", "field", "fragment"),
    [case[1:] for case in ROW_ERRORS],
    ids=[case[0] for case in ROW_ERRORS],
)
def test_bad_row_names_file_row_and_field(
    tmp_path: Path, name: str, content: bytes, row: int, field: str | None, fragment: str
) -> None:
    error = error_of(tmp_path / name, content)
    where = f"{tmp_path / name}: row {row}: " + (f"field '{field}': " if field else "")
    assert str(error).startswith(where), str(error)
    assert fragment in error.message
    assert (error.row, error.field) == (row, field)


@pytest.mark.parametrize("name", ["p.jsonl", "p.json", "p.csv"])
def test_empty_file_is_one_error(tmp_path: Path, name: str) -> None:
    assert str(error_of(tmp_path / name, b"")) == f"{tmp_path / name}: no rows"


def test_empty_parquet_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pyarrow.parquet.write_table(
        pyarrow.table({"prompt": pyarrow.array([], pyarrow.string())}), path
    )
    with pytest.raises(DataError, match=r"p\.parquet: no rows$"):
        load_pairs(str(path))


def test_parquet_with_a_mistyped_column_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pyarrow.parquet.write_table(
        pyarrow.table({"prompt": ["a"], "chosen": ["b"], "rejected": [3]}), path
    )
    with pytest.raises(DataError, match=r"row 1: field 'rejected': expected a string, got int"):
        load_pairs(str(path))


def test_parquet_margin_must_be_finite(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    write_as(path, [{**GOOD, "margin": 1.0}, {**GOOD, "margin": float("nan")}])
    with pytest.raises(
        DataError, match=r"row 2: field 'margin': expected a finite number, got nan"
    ):
        load_pairs(str(path))


@pytest.mark.parametrize("name", ["p.jsonl", "p.json", "p.csv", "p.parquet"])
def test_row_over_the_size_limit_is_one_line_naming_its_size(tmp_path: Path, name: str) -> None:
    # "é" is two bytes in UTF-8: the row holds fewer characters than the limit, but more bytes.
    big = {**GOOD, "chosen": "é" * (MAX_ROW_BYTES // 2)}
    size = sum(len(key.encode()) + len(value.encode()) for key, value in big.items())
    spec = write_as(tmp_path / name, [GOOD, big])
    with pytest.raises(DataError) as caught:
        load_pairs(spec)
    limit = "a row may hold at most 8,388,608 (8 MiB)"
    assert str(caught.value) == f"{spec}: row 2: too large: {size:,} bytes of text; {limit}"
    skipped: list[DataError] = []
    pairs, _ = load_pairs(spec, "train", skipped)
    assert (len(pairs), [error.row for error in skipped]) == (1, [2])


def test_a_20_mb_row_is_refused_for_a_few_times_its_size(tmp_path: Path) -> None:
    """Reading and tokenizing a file as data check does: the row over the limit is refused before
    it reaches the tokenizer, and reading it held no more than its bytes, its decoded line and its
    parsed strings at once (Python's allocations, which hold all three)."""
    half = "x" * 10_000_000
    path = tmp_path / "p.jsonl"
    path.write_bytes(line(GOOD) + line({**GOOD, "prompt": half, "chosen": half}))
    tokenizer, budget = build_tokenizer(), Budget(64, 32, "keep_end")
    tracemalloc.start()
    try:
        result = check_dataset(str(path), "train", "auto", tokenizer, budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(problem.row, problem.reason) for problem in result.problems] == [(2, "too large")]
    assert peak < 3.5 * path.stat().st_size


def test_unreadable_file_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(line(GOOD))

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(DataError, match=r"p\.jsonl: cannot read: Permission denied$"):
        load_pairs(str(path))


def test_random_bytes_named_parquet_is_one_error(tmp_path: Path) -> None:
    error = error_of(tmp_path / "p.parquet", b"PAR1 not really")
    assert error.message.startswith("cannot read as parquet")


def test_sft_rows_with_a_bad_field(tmp_path: Path) -> None:
    content = line({"messages": [USER, REPLY]}) + line({"messages": [USER, {"role": "user"}]})
    error = error_of(tmp_path / "d.jsonl", content, load_demos)
    assert str(error).endswith("row 2: field 'messages[1]': message has no 'content'")


@pytest.mark.slow
def test_enormous_row_is_truncated_and_counted(tmp_path: Path) -> None:
    half = "x" * 2_500_000  # a 5 MB row: its prompt keeps its end, its response its start
    path = tmp_path / "p.jsonl"
    path.write_bytes(line(GOOD) + line({**GOOD, "prompt": half + "?", "chosen": "!" + half}))
    pairs, _ = load_pairs(str(path))
    encoded, report = encode_pairs(pairs, build_tokenizer(), Budget(64, 32))
    assert (report.rows, report.prompts_truncated, report.responses_truncated) == (2, 1, 1)
    tokenizer = build_tokenizer()
    assert tokenizer.decode(encoded[1].prompt_ids) == "x" * 31 + "?"
    assert tokenizer.decode(encoded[1].chosen_ids) == "!" + "x" * 31


def test_enormous_csv_cell_is_read(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected\n" + f"a,{'y' * 5_000_000},b\n")
    pairs, _ = load_pairs(str(path))
    assert len(pairs[0].chosen) == 5_000_000


def test_nul_bytes_and_odd_text_are_text(tmp_path: Path) -> None:
    rows = [{"prompt": "a\x00b", "chosen": "😀\u202e", "rejected": "\ufeffc"}]
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"".join(line(row) for row in rows))
    pairs, _ = load_pairs(str(path))
    encoded, _ = encode_pairs(pairs, build_tokenizer(), Budget(64, 32))
    assert pairs == [Pair(**rows[0])] and len(encoded) == 1


def test_chat_template_failure_names_the_row() -> None:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    system = {"role": "system", "content": "be kind"}
    pairs = [Pair([USER], [REPLY], [REPLY], row=1), Pair([system, USER], [REPLY], [REPLY], row=7)]
    with pytest.raises(DataError) as caught:
        encode_pairs(pairs, tokenizer, Budget(64, 32), source="chat.jsonl")
    assert str(caught.value) == (
        "chat.jsonl: row 7: chat template: the chat template failed: no system role"
    )
    skipped: list[DataError] = []
    encoded, report = encode_pairs(pairs, tokenizer, Budget(64, 32), source="c", skipped=skipped)
    assert (len(encoded), report.rows, [e.row for e in skipped]) == (1, 1, [7])


def test_prompt_longer_than_max_length_is_dropped_and_counted(tmp_path: Path) -> None:
    pairs = [Pair("p" * 100, "a", "b"), Pair("q", "a", "b")]
    encoded, report = encode_pairs(pairs, build_tokenizer(), Budget(16, None))
    assert (len(encoded), report.dropped) == (1, 1)
    assert "1 dropped (prompt leaves no room for a response)" in report.summary()


def run(tmp_path: Path, data: Path, *overrides: str) -> dict[str, float]:
    args = [
        f"data.train={data}",
        "data.max_length=48",
        "data.max_prompt_length=24",
        "train.batch_size=4",
        "train.max_steps=2",
        f"output_dir={tmp_path / 'out'}",
        *overrides,
    ]
    return run_dpo(load_config(DPOConfig, None, args))


def test_every_row_dropped_by_truncation_stops_the_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no rows left after truncation; raise data\.max_length"):
        run(tmp_path, SAMPLE_TRAIN, "data.max_length=4", "data.max_prompt_length=null")


def test_identical_responses_are_reported_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = SAMPLE_TRAIN.read_bytes().splitlines(keepends=True)[:6]
    same = line({**GOOD, "rejected": GOOD["chosen"]})
    data = tmp_path / "p.jsonl"
    data.write_bytes(b"".join(rows) + same + same)
    run(tmp_path, data)
    assert "2 pairs with chosen identical to rejected (no preference to learn)" in (
        capsys.readouterr().out
    )


def test_skip_trains_on_the_good_rows_and_reports_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = SAMPLE_TRAIN.read_bytes().splitlines(keepends=True)[:8]
    bad = [b"{oops\n", line({**GOOD, "chosen": ""}), b"[]\n", line({**GOOD, "chosen": ""})]
    data = tmp_path / "p.jsonl"
    data.write_bytes(b"".join(good[:3] + bad + good[3:]))
    with pytest.raises(DataError, match=r"p\.jsonl: row 4: invalid JSON"):
        run(tmp_path, data)
    metrics = run(tmp_path, data, "data.on_error=skip")
    assert metrics["loss"] > 0
    printed = capsys.readouterr().out
    assert f"{data}: layout standard; 8 rows:" in printed
    assert (
        f"{data}: skipped 4 malformed rows (data.on_error=skip): "
        "2 × field 'chosen': empty response (rows 5, 7); 1 × invalid JSON (row 4); "
        "1 × expected a JSON object, got a list (row 6)"
    ) in printed


def test_skip_with_nothing_usable_is_one_error(tmp_path: Path) -> None:
    data = tmp_path / "p.jsonl"
    data.write_bytes(b"{oops\n" + line({"prompt": "a"}))
    with pytest.raises(DataError) as caught:
        run(tmp_path, data, "data.on_error=skip")
    assert str(caught.value) == (
        f"{data}: no usable rows: all 2 are malformed; the first: {data}: row 1: invalid JSON: "
        "Expecting property name enclosed in double quotes at column 2"
    )
