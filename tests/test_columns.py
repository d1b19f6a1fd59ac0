"""``data.columns``: files whose columns have other names (SHP-style pairs, Alpaca-style
demonstrations, …) read as if they had preftune's, by every command and by ``data check``;
bad mappings refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from accelerate import Accelerator

from preftune.cli import main
from preftune.commands import datasets
from preftune.commands.configs import DPOConfig, PPOConfig
from preftune.commands.rl import load_prompts
from preftune.config import given_keys, load_config
from preftune.data import cache
from preftune.data.arrow import ArrowExamples, ExampleWriter
from preftune.data.cache import examples_key
from preftune.data.chunked import Recipe, encode_in_chunks
from preftune.data.encode import Budget, encode_pairs
from preftune.data.readers import load_demos, load_pairs, load_rated
from preftune.data.sources import read_rows
from preftune.data.streamed import ROW_READERS
from preftune.errors import ConfigError, DataError, PreftuneError
from tests.conftest import ROOT, SAMPLE_TRAIN, write_jsonl

EXAMPLES = ROOT / "examples" / "data"
SHP = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
ALPACA = {"prompt": "instruction", "completion": "output"}
SHORT_RUN = [
    "model=tiny",
    "data.max_length=48",
    "data.max_prompt_length=24",
    "train.batch_size=4",
    "train.max_steps=2",
]


def flow(mapping: dict[str, str]) -> str:
    """``mapping`` as the YAML flow mapping a command line gives: ``{prompt: question, …}``."""
    return "{" + ", ".join(f"{field}: {column}" for field, column in mapping.items()) + "}"


def renamed_copy(source: Path, path: Path, mapping: dict[str, str]) -> Path:
    """The rows of ``source`` with each field's column named as ``mapping`` says, and a column
    preftune does not read, as such files have."""
    rows = [json.loads(line) for line in source.read_text().splitlines()[:16]]
    renamed = [
        {"id": i, **{mapping.get(key, key): value for key, value in row.items()}}
        for i, row in enumerate(rows)
    ]
    return write_jsonl(path, renamed)


@pytest.fixture
def shp(tmp_path: Path) -> Path:
    """SHP-style pairs (stack-exchange-paired's columns): question, response_j, response_k."""
    return renamed_copy(SAMPLE_TRAIN, tmp_path / "shp.jsonl", SHP)


@pytest.fixture
def alpaca(tmp_path: Path) -> Path:
    """Alpaca-style demonstrations, a JSON list: instruction, input, output."""
    rows = [json.loads(line) for line in SAMPLE_TRAIN.read_text().splitlines()[:16]]
    records = [{"instruction": r["prompt"], "input": "", "output": r["chosen"]} for r in rows]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    return path


def test_shp_style_pairs_train_with_the_mapping(
    shp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["dpo", *SHORT_RUN, f"data.train={shp}", f"data.columns={flow(SHP)}"]
    assert main([*args, f"output_dir={out}"]) == 0, capsys.readouterr().err[-2000:]
    assert f"{shp}: layout standard; 16 rows" in capsys.readouterr().out
    saved = yaml.safe_load((out / "preftune_config.yaml").read_text())
    assert saved["data"]["columns"] == SHP
    # The saved config's data keys read back as the same mapping, each entry a dotted key.
    keys = given_keys(str(out / "preftune_config.yaml"))
    assert keys["data.columns.prompt"] == "question"
    data = [f"{key}={json.dumps(value)}" for key, value in keys.items() if key.startswith("data.")]
    assert load_config(DPOConfig, None, data).data.columns == SHP


def test_alpaca_style_demonstrations_train_with_the_mapping(
    alpaca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["sft", *SHORT_RUN, f"data.train={alpaca}", f"data.columns={flow(ALPACA)}"]
    assert main([*args, f"output_dir={tmp_path / 'out'}"]) == 0, capsys.readouterr().err[-2000:]
    assert f"{alpaca}: layout prompt_completion; 16 rows" in capsys.readouterr().out


def test_data_check_accepts_both_with_the_mapping(
    shp: Path, alpaca: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for path, mapping, layout in ((shp, SHP, "standard"), (alpaca, ALPACA, "prompt_completion")):
        assert main(["data", "check", str(path), f"data.columns={flow(mapping)}"]) == 0
        out, err = capsys.readouterr()
        assert f"{path}: 16 rows of " in out and f"layout {layout}" in out
        assert "rows with problems: 0" in out and not err
    assert main(["data", "check", str(shp)]) == 1  # without it, no pair has chosen and rejected


@pytest.mark.parametrize(
    ("name", "load", "mapping"),
    [
        ("sums_train.jsonl", load_pairs, SHP),
        # Rows ordered by a ranking and rows ordered by scores: each lacks the other's column.
        (
            "sums_ranked.jsonl",
            load_pairs,
            {"responses": "answers", "ranking": "order", "scores": "s"},
        ),
        ("sums_kto.jsonl", load_rated, {"completion": "answer", "label": "thumbs_up"}),
        ("sums_sft.jsonl", load_demos, {"messages": "conversation"}),
    ],
)
def test_every_kind_of_row_reads_through_the_mapping(
    tmp_path: Path, name: str, load: Any, mapping: dict[str, str]
) -> None:
    """Pairs, ranked rows, judged completions and conversations: the renamed file gives the
    records and layout of the original."""
    renamed = renamed_copy(EXAMPLES / name, tmp_path / name, mapping)
    original = write_jsonl(
        tmp_path / f"original-{name}",
        [json.loads(line) for line in (EXAMPLES / name).read_text().splitlines()[:16]],
    )
    assert load(str(renamed), "train", None, mapping) == load(str(original), "train")


def test_bare_prompts_read_through_the_mapping(tmp_path: Path, tiny: Any) -> None:
    path = write_jsonl(
        tmp_path / "prompts.jsonl", [{"question": f"What is {i}?"} for i in range(3)]
    )
    cfg = load_config(PPOConfig, None, [f"data.train={path}", "data.columns={prompt: question}"])
    prompts = load_prompts(cfg, tiny, Accelerator(cpu=True))
    assert [prompt.text for prompt in prompts] == [f"What is {i}?" for i in range(3)]


def test_a_named_column_takes_the_fields_place_and_others_keep_their_names(
    tmp_path: Path,
) -> None:
    row = {"prompt": "stale", "question": "q", "response_j": "a", "response_k": "b", "id": 7}
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    expected = {"prompt": "q", "chosen": "a", "rejected": "b", "id": 7}
    assert read_rows(str(path), columns=SHP) == [(1, expected)]
    swapped = {"chosen": "rejected", "rejected": "chosen"}
    pair = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_jsonl(tmp_path / "pair.jsonl", [pair])
    assert read_rows(str(path), columns=swapped) == [(1, {**pair, "chosen": "r", "rejected": "c"})]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.columns={promt: question}",
            "data.columns: unknown field 'promt'; did you mean 'prompt'?",
        ),
        (
            "data.columns={question: prompt}",
            "data.columns maps preftune's fields to the file's columns: write {prompt: question}, "
            "not {question: prompt}",
        ),
        ("data.columns={prompt: ''}", "data.columns.prompt names no column"),
        (
            "data.columns=[prompt]",
            "config key 'data.columns' must be mapping of str to str or null, got ['prompt']",
        ),
    ],
)
def test_a_bad_mapping_is_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(DPOConfig, None, [override])
    assert str(caught.value) == message


def test_a_mapped_column_missing_from_a_row_names_the_file_row_and_column(
    shp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = shp.read_text().splitlines()
    lines[2] = json.dumps({"question": "q", "response_k": "b"})
    shp.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        read_rows(str(shp), columns=SHP)
    assert str(caught.value) == (
        f"{shp}: row 3: no column 'response_j', which data.columns maps chosen to "
        "(columns: question, response_k)"
    )
    args = ["dpo", *SHORT_RUN, f"data.train={shp}", f"data.columns={flow(SHP)}"]
    assert main([*args, f"output_dir={tmp_path / 'out'}"]) == 2
    assert capsys.readouterr().err.strip() == f"preftune: error: {caught.value}"


@pytest.mark.parametrize("collect", [False, True])
def test_chunks_rename_as_the_whole_file_does(tmp_path: Path, tiny: Any, collect: bool) -> None:
    """The chunked path (large files) renames as ``read_rows`` does, and finds a row without a
    named column where reading the whole file does: before the malformed rows, so row 8's
    error comes before row 2's, whichever chunk each is in."""
    lines = renamed_copy(SAMPLE_TRAIN, tmp_path / "shp.jsonl", SHP).read_text().splitlines()
    lines[1] = json.dumps({"question": "q", "response_j": "", "response_k": "b"})
    lines[7] = json.dumps({"question": "q", "response_k": "b"})
    spec = tmp_path / "faults.jsonl"
    spec.write_text("\n".join(lines) + "\n")
    budget = Budget(48, 24)

    def outcome(read: Any) -> Any:
        skipped: list[DataError] | None = [] if collect else None
        try:
            examples, layout = read(skipped)
        except PreftuneError as error:
            return str(error)
        return list(examples), layout, [str(error) for error in skipped or []]

    def whole(skipped: list[DataError] | None) -> tuple[list[Any], str]:
        records, layout = load_pairs(str(spec), "train", skipped, SHP)
        return encode_pairs(records, tiny, budget, source=str(spec), skipped=skipped)[0], layout

    def in_chunks(skipped: list[DataError] | None) -> tuple[list[Any], str]:
        recipe = Recipe(ROW_READERS[load_pairs], encode_pairs, tiny, budget, SHP)
        arrow = tmp_path / "examples.arrow"
        with ExampleWriter(arrow) as writer:
            done = encode_in_chunks(
                str(spec), "train", recipe, writer.write, collect=collect, chunk_rows=3
            )
        if skipped is not None:
            skipped += done.skipped
        return list(ArrowExamples(arrow, writer.digest.hexdigest())), done.layout

    expected = outcome(whole)
    assert outcome(in_chunks) == expected
    first = f"{spec}: row 8: no column 'response_j'"
    assert (expected[2][0] if collect else expected).startswith(first)


def test_the_mapping_is_part_of_the_examples_cache_key(
    shp: Path, tmp_path: Path, tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    read = ROW_READERS[load_pairs]
    budget = Budget(48, 24)
    plain = examples_key(shp, "train", Recipe(read, encode_pairs, tiny, budget))
    assert examples_key(shp, "train", Recipe(read, encode_pairs, tiny, budget, {})) == plain
    mapped = examples_key(shp, "train", Recipe(read, encode_pairs, tiny, budget, SHP))
    other = examples_key(shp, "train", Recipe(read, encode_pairs, tiny, budget, {**SHP, "x": "y"}))
    assert len({plain, mapped, other}) == 3
    monkeypatch.setattr(cache, "MIN_BYTES", 0)
    overrides = [f"data.train={shp}", f"data.columns={flow(SHP)}", "data.max_prompt_length=24"]
    cfg = load_config(DPOConfig, None, [*overrides, f"speed.cache_dir={tmp_path / 'cache'}"])
    acc = Accelerator(cpu=True)
    stored = datasets.encoded_dataset(cfg, tiny, str(shp), "train", acc, load_pairs, encode_pairs)
    assert isinstance(stored, ArrowExamples)
    records, _ = load_pairs(str(shp), "train", None, SHP)
    assert list(stored) == encode_pairs(records, tiny, cfg.data.budget())[0]
