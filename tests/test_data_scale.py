"""Large datasets: read and tokenized a chunk at a time, kept in Arrow, cached by content.

The chunked path must give what reading the whole file gives: the same examples, rows,
truncation report, layout, skipped rows and first error, for every kind of data. It is run here
on small files with small chunks, so that every boundary case (anchors, leading bad rows, errors
in different chunks) is crossed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast

from preftune.commands import datasets
from preftune.commands.dpo import DPOConfig
from preftune.config import load_config
from preftune.data import cache, sources
from preftune.data.arrow import ArrowExamples, ExampleWriter
from preftune.data.cache import Stored, examples_key
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
from preftune.models.refcache import ReferencePass, WithReference
from preftune.models.tiny import build_tokenizer
from tests.conftest import LAUNCHER, ROOT, SAMPLE_SFT, SAMPLE_TRAIN

EXAMPLES = ROOT / "examples" / "data"
BUDGET = Budget(40, 16)
KINDS = {
    "pairs": (load_pairs, encode_pairs),
    "comparisons": (load_preferences, encode_comparisons),
    "judged": (load_rated, encode_rated),
    "demos": (load_demos, encode_demos),
}


@pytest.fixture(scope="module")
def tiny() -> PreTrainedTokenizerFast:
    return build_tokenizer()


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


def recipe(tokenizer: Any, kind: str = "pairs", budget: Budget = BUDGET) -> Recipe:
    load, encode = KINDS[kind]
    return Recipe(ROW_READERS[load], encode, tokenizer, budget)


def store(spec: Path, tokenizer: Any, directory: Path, lines: list[str], **options: Any) -> Stored:
    options = {"collect": False, "num_proc": 1} | options
    return cache.stored(
        str(spec), "train", recipe(tokenizer), directory, say=lines.append, **options
    )


def test_a_rerun_reads_the_cache_without_reading_or_tokenizing_the_file(
    tmp_path: Path, tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines: list[str] = []
    first = store(SAMPLE_TRAIN, tiny, tmp_path, lines)
    assert lines == [f"{SAMPLE_TRAIN}: tokenized examples written to the cache ({first.path})"]

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the file was read again")

    monkeypatch.setattr(cache, "encode_in_chunks", fail)
    again = store(SAMPLE_TRAIN, tiny, tmp_path, lines)
    assert lines[-1] == f"{SAMPLE_TRAIN}: tokenized examples from the cache ({first.path})"
    assert again == first
    assert list(again.examples()) == whole(SAMPLE_TRAIN, "pairs", tiny, collect=False)[0]


def test_an_entry_opens_as_a_datasets_table(tmp_path: Path, tiny: Any) -> None:
    """The examples file is the Arrow stream format ``datasets`` keeps its tables in."""
    import datasets

    examples = store(SAMPLE_TRAIN, tiny, tmp_path, []).examples()
    table = datasets.Dataset.from_file(str(examples.path))
    assert table.num_rows == len(examples)
    assert table[5]["chosen_ids"] == examples[5].chosen_ids
    assert table[5]["row"] == examples[5].row


def test_the_key_follows_the_content_tokenizer_budget_and_kind(tmp_path: Path, tiny: Any) -> None:
    spec = tmp_path / "pairs.jsonl"
    spec.write_bytes(SAMPLE_TRAIN.read_bytes())
    key = examples_key(spec, "train", recipe(tiny))
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(SAMPLE_TRAIN.read_bytes())
    assert examples_key(copy, "train", recipe(tiny)) == key  # content, not name
    other_tokenizer = build_tokenizer(["the answer is four"] * 10, vocab_size=300)
    for changed in (
        examples_key(spec, "test", recipe(tiny)),
        examples_key(spec, "train", recipe(other_tokenizer)),
        examples_key(spec, "train", recipe(tiny, budget=Budget(40, 16, "keep_start"))),
        examples_key(spec, "train", recipe(tiny, "comparisons")),
    ):
        assert changed != key
    spec.write_bytes(SAMPLE_TRAIN.read_bytes().replace(b"plus", b"Plus", 1))
    assert examples_key(spec, "train", recipe(tiny)) != key


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("flip", "does not match its checksum"),
        ("cut", "holds 100 bytes, not"),
        ("entry", "cannot be read (JSONDecodeError"),
        ("missing", "is missing"),
    ],
)
def test_a_damaged_entry_is_computed_again_with_a_line(
    tmp_path: Path, tiny: Any, damage: str, problem: str
) -> None:
    lines: list[str] = []
    first = store(SAMPLE_TRAIN, tiny, tmp_path, lines)
    data = bytearray(first.path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
        first.path.write_bytes(bytes(data))
    elif damage == "cut":
        first.path.write_bytes(bytes(data[:100]))
    elif damage == "entry":
        first.path.with_suffix(".json").write_text("{")
    else:
        first.path.unlink()
    again = store(SAMPLE_TRAIN, tiny, tmp_path, lines)
    assert lines[1].startswith(f"{SAMPLE_TRAIN}: the examples cache {first.path} {problem}")
    assert lines[1].endswith("; reading and tokenizing again")
    assert lines[2].endswith("written to the cache (" + str(first.path) + ")")
    assert list(again.examples()) == whole(SAMPLE_TRAIN, "pairs", tiny, collect=False)[0]


def test_an_entry_with_skipped_rows_stops_a_run_that_does_not_skip(
    tmp_path: Path, tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "MAX_ROW_BYTES", 300)
    spec = tmp_path / "hostile.jsonl"
    spec.write_text("\n".join(hostile_rows()) + "\n")
    skipping = store(spec, tiny, tmp_path, [], collect=True)
    assert [str(e) for e in skipping.skipped_errors()] == whole(spec, "pairs", tiny, True)[4]
    with pytest.raises(PreftuneError) as stopped:
        store(spec, tiny, tmp_path, [])
    assert str(stopped.value) == whole(spec, "pairs", tiny, collect=False)


def test_the_digest_changes_when_one_token_changes(tmp_path: Path, tiny: Any) -> None:
    spec = tmp_path / "pairs.jsonl"
    spec.write_bytes(SAMPLE_TRAIN.read_bytes())
    before = store(spec, tiny, tmp_path, [])
    spec.write_bytes(SAMPLE_TRAIN.read_bytes().replace(b"is 18.", b"is 19.", 1))
    after = store(spec, tiny, tmp_path, [])
    changed = [a != b for a, b in zip(before.examples(), after.examples(), strict=True)]
    assert sum(changed) == 1
    assert examples_digest(before.examples()) != examples_digest(after.examples())
    assert examples_digest(after.examples()) == examples_digest(list(after.examples()))


def test_attach_gives_a_view_with_the_cached_reference_logps(tmp_path: Path, tiny: Any) -> None:
    """The log-probs are read from the reference cache, attached as each pair is read; the
    view's digest is the pairs' (reference log-probs are not content)."""
    pairs = store(SAMPLE_TRAIN, tiny, tmp_path, []).examples()
    logps = torch.randn(len(pairs), 2)
    path = tmp_path / "reference.safetensors"
    save_file({"logps": logps}, path)
    # With the log-probs cached, the model, scoring and collation are never used.
    acc = Accelerator(cpu=True)
    reference = ReferencePass(torch.nn.Identity(), None, None, 1, acc)
    attached = reference.attach(pairs, path, "train")
    assert isinstance(attached, WithReference)
    assert len(attached) == len(pairs)
    for index in (0, 7, -1):
        expected = (float(logps[index, 0]), float(logps[index, 1]))
        assert attached[index].reference_logps == expected
        assert attached[index].chosen_ids == pairs[index].chosen_ids
    assert attached[1:3] == [attached[1], attached[2]]
    assert examples_digest(attached) == examples_digest(pairs)


def dpo_config(tmp_path: Path, *overrides: str) -> DPOConfig:
    return load_config(
        DPOConfig,
        None,
        [
            "model=tiny",
            f"data.train={SAMPLE_TRAIN}",
            "data.max_length=40",
            "data.max_prompt_length=16",
            f"output_dir={tmp_path / 'out'}",
            f"speed.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ],
    )


def test_encoded_dataset_keeps_a_large_source_in_arrow_and_prints_the_same_lines(
    tmp_path: Path, tiny: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A source above the threshold (lowered here) is cached under ``examples/`` beside the
    reference cache; the start and skipped lines are those of the in-memory path, and a second
    call (another process, or a later run) reuses the entry without tokenizing."""
    spec = tmp_path / "hostile.jsonl"
    spec.write_text("\n".join(hostile_rows(margin_row=False)) + "\n")
    cfg = dpo_config(tmp_path, f"data.train={spec}", "data.on_error=skip")
    acc = Accelerator(cpu=True)
    in_memory = datasets.encoded_dataset(
        cfg, tiny, str(spec), "train", acc, load_pairs, encode_pairs
    )
    memory_lines = capsys.readouterr().out.splitlines()
    monkeypatch.setattr(cache, "MIN_BYTES", 0)
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return encode_pairs(*args, **kwargs)

    for _ in range(2):
        stored = datasets.encoded_dataset(cfg, tiny, str(spec), "train", acc, load_pairs, counted)
        assert isinstance(stored, ArrowExamples)
        assert stored.path.parent == tmp_path / "cache" / "examples"
        assert list(stored) == in_memory
        assert [e.row for e in stored] == [e.row for e in in_memory or []]
        assert examples_digest(stored) == examples_digest(in_memory or [])
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith(f"{spec}: tokenized examples")
        assert lines[1:] == memory_lines
    assert len(calls) == 1


def test_a_cache_that_cannot_be_written_is_one_line(
    tmp_path: Path, tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "MIN_BYTES", 0)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = dpo_config(tmp_path, f"speed.cache_dir={blocker}")
    acc = Accelerator(cpu=True)
    with pytest.raises(PreftuneError, match=f"^{SAMPLE_TRAIN}: examples cache: .*a-file"):
        datasets.encoded_dataset(
            cfg, tiny, str(SAMPLE_TRAIN), "train", acc, load_pairs, encode_pairs
        )


@pytest.mark.parametrize("command", ["dpo", "sft", "kto", "rm"])
def test_training_commands_train_on_arrow_examples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """Each training command, from data in the examples cache, through the reference cache's
    view for DPO: the loop, collators and layouts read Arrow-backed examples as lists."""
    from preftune.commands import REGISTRY

    monkeypatch.setattr(cache, "MIN_BYTES", 0)
    spec = {"sft": SAMPLE_SFT, "kto": EXAMPLES / "sums_kto.jsonl"}.get(command, SAMPLE_TRAIN)
    entry = REGISTRY[command]
    overrides = [
        "model=tiny",
        f"data.train={spec}",
        f"data.eval={SAMPLE_TRAIN if command != 'sft' else SAMPLE_SFT}",
        "data.max_length=48",
        "data.max_prompt_length=24",
        "train.batch_size=8",
        "train.max_steps=2",
        f"output_dir={tmp_path / 'out'}",
    ]
    metrics = entry.run(load_config(entry.config, None, overrides))
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())
    assert list((Path(datasets.cache_root(None)).parent / "examples").glob("*.arrow"))


def test_worker_processes_give_the_same_examples(tmp_path: Path, tiny: Any) -> None:
    spec = tmp_path / "ranked.jsonl"
    spec.write_text((EXAMPLES / "sums_ranked.jsonl").read_text() * 4)
    one = store(spec, tiny, tmp_path / "one", [])
    two = store(spec, tiny, tmp_path / "two", [], num_proc=2)
    assert list(two.examples()) == list(one.examples())
    assert two.report == one.report
    assert two.content_digest == one.content_digest


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


LAUNCHED = """
import sys
from preftune.commands import common, datasets
from preftune.commands.dpo import DPOConfig
from preftune.config import load_config
from preftune.data import cache
from preftune.data.encode import encode_pairs
from preftune.data.digest import examples_digest
from preftune.data.readers import load_pairs
from preftune.models.tiny import build_tokenizer

cache.MIN_BYTES = 0
calls = []
def counted(*args, **kwargs):
    calls.append(1)
    return encode_pairs(*args, **kwargs)

cache_dir = [] if sys.argv[2] == "-" else [f"speed.cache_dir={sys.argv[2]}"]
cfg = load_config(DPOConfig, None, [f"data.train={sys.argv[1]}", *cache_dir])
acc = common.make_accelerator(cfg)
examples = datasets.encoded_dataset(
    cfg, build_tokenizer(), cfg.data.train, "train", acc, load_pairs, counted
)
print(f"process {acc.process_index}: {len(calls)} encoded, {len(examples)} pairs, "
      f"digest {examples_digest(examples)}", flush=True)
"""


@pytest.mark.slow
def test_two_processes_share_one_entry_encoded_by_the_main_one(tmp_path: Path) -> None:
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    command = [*LAUNCHER, str(script), str(SAMPLE_TRAIN), str(tmp_path / "cache")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("process"))
    expected = whole(SAMPLE_TRAIN, "pairs", build_tokenizer(), False, Budget(512, 256))[0]
    digest = examples_digest(expected)
    assert [line.split(":")[1].split(",")[0] for line in lines] == [" 1 encoded", " 0 encoded"]
    assert all(line.endswith(f"256 pairs, digest {digest}") for line in lines), lines
