"""Large datasets: read and tokenized a chunk at a time, kept in Arrow, cached by content.

The chunked path must give what reading the whole file gives: the same examples, rows,
truncation report, layout, skipped rows and first error, for every kind of data. It is run here
on small files with small chunks, so that every boundary case (anchors, leading bad rows, errors
in different chunks) is crossed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet
import pytest

from preftune.data import sources
from preftune.data.arrow import ArrowExamples, ExampleWriter
from preftune.data.chunked import Recipe, encode_in_chunks
from preftune.data.digest import examples_digest
from preftune.data.encode import (
    Budget,
    encode_comparisons,
    encode_demos,
    encode_pairs,
    encode_rated,
)
from preftune.data.readers import load_demos, load_pairs, load_preferences, load_rated
from preftune.data.streamed import ROW_READERS
from preftune.errors import PreftuneError
from preftune.models.tiny import build_tokenizer
from tests.conftest import ROOT, SAMPLE_SFT, SAMPLE_TRAIN

EXAMPLES = ROOT / "examples" / "data"
BUDGET = Budget(40, 16)
KINDS = {
    "pairs": (load_pairs, encode_pairs),
    "comparisons": (load_preferences, encode_comparisons),
    "judged": (load_rated, encode_rated),
    "demos": (load_demos, encode_demos),
}


def whole(spec: Path, kind: str, tokenizer: Any, collect: bool, budget: Budget = BUDGET) -> Any:
    """What reading ``spec`` whole gives: examples, rows, report, layout, skipped rows and the
    examples' digest; or the error's line."""
    load, encode = KINDS[kind]
    skipped: list | None = [] if collect else None
    try:
        records, layout = load(str(spec), "train", skipped)
        examples, report = encode(records, tokenizer, budget, source=str(spec), skipped=skipped)
    except PreftuneError as error:
        return str(error)
    rows = [example.row for example in examples]
    errors = [str(error) for error in skipped or []]
    return examples, rows, report, layout, errors, examples_digest(examples)


def chunked(spec: Path, kind: str, tokenizer: Any, collect: bool, rows: int, arrow: Path) -> Any:
    """What the chunked path gives for ``spec``, in the form of :func:`whole`."""
    load, encode = KINDS[kind]
    recipe = Recipe(ROW_READERS[load], encode, tokenizer, BUDGET)
    try:
        with ExampleWriter(arrow) as writer:
            outcome = encode_in_chunks(
                str(spec), "train", recipe, writer.write, collect=collect, chunk_rows=rows
            )
    except PreftuneError as error:
        return str(error)
    # An entry that keeps nothing is never opened: the run stops first (see encoded_dataset).
    examples = ArrowExamples(arrow, writer.digest.hexdigest()) if writer.rows else []
    skipped = [str(error) for error in outcome.skipped]
    rows = [example.row for example in examples]
    digest = writer.digest.hexdigest()  # computed as the batches were written
    return list(examples), rows, outcome.report, outcome.layout, skipped, digest


def assert_same(expected: Any, got: Any) -> None:
    """Same outcome, the report's type (a ranked expansion) included."""
    assert got == expected
    if not isinstance(expected, str):
        assert type(got[2]) is type(expected[2])


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("sums_train.jsonl", "pairs"),
        ("sums_ranked.jsonl", "pairs"),
        ("sums_ranked.jsonl", "comparisons"),
        ("sums_train.jsonl", "comparisons"),
        ("sums_kto.jsonl", "judged"),
        ("sums_train.jsonl", "judged"),
        ("sums_sft.jsonl", "demos"),
    ],
)
@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_arrow_examples_equal_the_in_memory_ones_for_every_kind(
    tmp_path: Path, tiny: Any, name: str, kind: str, rows: int
) -> None:
    """Ranked rows expand into their pairs; conversations (sums_sft) render through the chat
    template; the budget truncates prompts. Examples, rows, reports, layouts and digests all
    agree."""
    expected = whole(EXAMPLES / name, kind, tiny, collect=False)
    got = chunked(EXAMPLES / name, kind, tiny, False, rows, tmp_path / "examples.arrow")
    assert_same(expected, got)
    assert expected[2].prompts_truncated


def hostile_rows(margin_row: bool = True) -> list[str]:
    """Lines of every kind of fault, good rows among them, a first row that is bad."""

    def good(i: int) -> str:
        row = {"prompt": f"What is {i} plus {i}?\n", "chosen": f"{2 * i}.", "rejected": "No."}
        return json.dumps(row)

    lines = [
        json.dumps({"prompt": 1, "chosen": "x", "rejected": "y"}),
        "{bad json",
        "",
        good(1),
        good(2),
        json.dumps({"chosen": "a b", "rejected": "a c"}),
        good(3),
        json.dumps({"prompt": "p", "chosen": "", "rejected": "r"}),
        json.dumps({"prompt": "q", "chosen": "x" * 400, "rejected": "r"}),
        good(4),
        "[1, 2]",
        json.dumps({"prompt": "p " * 30, "chosen": "c", "rejected": "r"}),
        good(5),
        json.dumps({"prompt": "z", "chosen": "c"}),
        good(6),
    ]
    if margin_row:
        lines.insert(12, json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "margin": 2}))
    return lines


@pytest.mark.parametrize("kind", ["pairs", "comparisons", "judged"])
@pytest.mark.parametrize("collect", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_malformed_rows_are_skipped_and_raised_as_when_read_whole(
    tmp_path: Path, tiny: Any, monkeypatch: pytest.MonkeyPatch, kind: str, collect: bool, rows: int
) -> None:
    """Bad JSON, a list, a row too large, a wrong type, a different layout, an empty response
    and a missing field, in different chunks, with a bad first row: the same rows skipped in
    the same order, the same margin note, or the same first error."""
    monkeypatch.setattr(sources, "MAX_ROW_BYTES", 300)
    spec = tmp_path / "hostile.jsonl"
    spec.write_text("\n".join(hostile_rows()) + "\n")
    expected = whole(spec, kind, tiny, collect)
    assert_same(expected, chunked(spec, kind, tiny, collect, rows, tmp_path / "examples.arrow"))


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_a_run_that_stops_raises_the_error_reading_whole_meets_first(
    tmp_path: Path, tiny: Any, monkeypatch: pytest.MonkeyPatch, rows: int
) -> None:
    """Reading whole parses every line, then checks sizes, then reads rows: a malformed row
    before a row too large, before an unparsable line, raises the unparsable line."""
    monkeypatch.setattr(sources, "MAX_ROW_BYTES", 300)
    lines = hostile_rows()
    spec = tmp_path / "ordered.jsonl"
    for drop in ("{bad json", "[1, 2]", None):
        if drop is not None:
            lines.remove(drop)
        spec.write_text("\n".join(lines) + "\n")
        expected = whole(spec, "pairs", tiny, collect=False)
        assert isinstance(expected, str)
        assert chunked(spec, "pairs", tiny, False, rows, tmp_path / "x.arrow") == expected


@pytest.mark.parametrize(
    "rows",
    [
        ["", "   ", ""],
        [json.dumps({"prompt": "p", "chosen": "", "rejected": "r"})] * 3,
        [json.dumps({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]})],
    ],
    ids=["blank", "all-malformed", "ranked-for-kto"],
)
@pytest.mark.parametrize("collect", [True, False])
def test_files_with_nothing_usable_fail_as_when_read_whole(
    tmp_path: Path, tiny: Any, rows: list[str], collect: bool
) -> None:
    spec = tmp_path / "nothing.jsonl"
    spec.write_text("\n".join(rows) + "\n")
    expected = whole(spec, "judged", tiny, collect)
    assert_same(expected, chunked(spec, "judged", tiny, collect, 1, tmp_path / "x.arrow"))


def test_conversations_without_a_chat_template_fail_as_when_read_whole(tmp_path: Path) -> None:
    plain = build_tokenizer()
    plain.chat_template = None
    expected = whole(SAMPLE_SFT, "demos", plain, collect=True)
    assert "no chat template" in expected
    assert chunked(SAMPLE_SFT, "demos", plain, True, 5, tmp_path / "x.arrow") == expected


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
def test_other_formats_are_read_whole_then_encoded_in_chunks(
    tmp_path: Path, tiny: Any, suffix: str
) -> None:
    rows = [json.loads(line) for line in SAMPLE_TRAIN.read_text().splitlines()]
    spec = tmp_path / f"pairs{suffix}"
    if suffix == ".json":
        spec.write_text(json.dumps(rows))
    elif suffix == ".csv":
        spec.write_text(
            "prompt,chosen,rejected\n"
            + "".join(
                ",".join(json.dumps(row[key]) for key in ("prompt", "chosen", "rejected")) + "\n"
                for row in rows
            )
        )
    else:
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), spec)
    expected = whole(spec, "pairs", tiny, collect=False)
    assert_same(expected, chunked(spec, "pairs", tiny, False, 10, tmp_path / "x.arrow"))


SYNTHETIC = """
import json, random, sys
from pathlib import Path
from preftune.data import cache
from preftune.data.chunked import Recipe
from preftune.data.streamed import ROW_READERS
from preftune.data.encode import Budget, encode_pairs
from preftune.data.readers import load_pairs
from preftune.models.tiny import build_tokenizer

def kib(field):
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith(field))

pairs, work = int(sys.argv[1]), Path(sys.argv[2])
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(5000)]
def text(n):
    return " ".join(rng.choice(words) for _ in range(rng.randint(n // 2, 3 * n // 2)))
with (work / "pairs.jsonl").open("w") as file:
    for _ in range(pairs):
        row = {"prompt": text(30), "chosen": text(20), "rejected": text(20)}
        file.write(json.dumps(row) + "\\n")
tokenizer = build_tokenizer()
resident = kib("VmRSS:")
recipe = Recipe(ROW_READERS[load_pairs], encode_pairs, tokenizer, Budget(512, 256))
found = cache.stored(
    str(work / "pairs.jsonl"), "train", recipe, work / "cache", collect=False, num_proc=1,
    say=lambda line: None,
)
assert found.report.kept == pairs
print(kib("VmHWM:") - resident)
"""


@pytest.mark.slow
def test_memory_to_prepare_pairs_does_not_grow_with_their_number(tmp_path: Path) -> None:
    """10,000 and 50,000 synthetic pairs, each prepared in a fresh process: the peak resident
    memory above what the process held before differs by less than 16 MiB. In memory, the
    40,000 more pairs' ids alone would take more than 100 MiB."""
    growth = {}
    for pairs in (10_000, 50_000):
        work = tmp_path / str(pairs)
        work.mkdir()
        command = [sys.executable, "-c", SYNTHETIC, str(pairs), str(work)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        growth[pairs] = int(done.stdout.split()[-1]) * 1024
    assert growth[50_000] - growth[10_000] < 16 * 2**20, growth
