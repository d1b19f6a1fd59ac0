"""The examples cache: an entry per content, read instead of the source, checked, rebuilt when
damaged, shared by the processes of a run, with memory flat in the number of rows."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from preftune.commands import datasets
from preftune.commands.dpo import DPOConfig
from preftune.config import load_config
from preftune.data import cache, sources
from preftune.data.arrow import ArrowExamples
from preftune.data.cache import Stored, examples_key
from preftune.data.chunked import Recipe
from preftune.data.digest import examples_digest
from preftune.data.encode import (
    Budget,
    encode_pairs,
)
from preftune.data.readers import load_pairs
from preftune.data.streamed import ROW_READERS
from preftune.errors import PreftuneError
from preftune.models.refcache import ReferencePass, WithReference
from preftune.models.tiny import build_tokenizer
from tests.conftest import LAUNCHER, ROOT, SAMPLE_SFT, SAMPLE_TRAIN
from tests.test_data_scale import BUDGET, EXAMPLES, KINDS, hostile_rows, whole


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
