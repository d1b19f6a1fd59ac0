"""``preftune data check``: a summary of what training would read, and every problem, one line
each, with a non-zero exit status when there are any."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.data.check import check_dataset, describe_skipped, percentiles
from preftune.data.encode import Budget
from preftune.data.readers import load_pairs, load_preferences, load_rated
from preftune.data.sources import MAX_ROW_BYTES
from preftune.data.tokenize import tokenize
from preftune.errors import DataError
from preftune.models.tiny import build_tokenizer
from tests.conftest import SAMPLE_EVAL, SAMPLE_SFT, SAMPLE_TRAIN, run_cli, write_jsonl
from tests.test_hostile_data import write_as

GOOD = {"prompt": "What is 1 plus 1?\n", "chosen": "It is 2.", "rejected": "No idea."}
TOKENIZER = build_tokenizer()


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, list[str]]:
    status = main(["data", "check", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err.splitlines()


def test_percentiles_are_nearest_rank() -> None:
    assert percentiles(list(range(1, 101))) == [50, 90, 99, 100]
    assert percentiles([7]) == [7, 7, 7, 7]
    assert percentiles([5, 1, 3]) == [3, 5, 5, 5]


def test_clean_file_summary_matches_what_training_reads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, err = check(
        capsys, str(SAMPLE_TRAIN), "data.max_length=40", "data.max_prompt_length=39"
    )
    assert (status, err) == (0, [])
    lines = out.splitlines()
    assert lines[0] == f"{SAMPLE_TRAIN}: 256 rows of preference pairs, layout standard"
    tokenized = tokenize(load_pairs(str(SAMPLE_TRAIN))[0], build_tokenizer())
    chosen = percentiles([len(t.responses[0]) for t in tokenized])
    assert lines[3].split() == ["chosen", *map(str, chosen)]
    too_long = sum(len(t.prompt) + max(map(len, t.responses)) > 40 for t in tokenized)
    assert 0 < too_long < 256
    assert (
        "fitted to data.max_length=40, data.max_prompt_length=39 (keep_end): 256 rows: "
        f"0 prompts truncated, {too_long} responses truncated, 0 dropped"
    ) in out
    assert "duplicated pairs: 13 (row 63 repeats row 54;" in out
    assert "chosen identical to rejected: 0\n" in out
    assert "rows with problems: 0" in out


def test_every_problem_is_one_line_and_the_status_is_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps(GOOD),
        json.dumps({**GOOD, "chosen": ""}),
        "{broken",
        json.dumps({**GOOD, "rejected": GOOD["chosen"]}),
        json.dumps({**GOOD, "rejected": 3}),
        json.dumps(GOOD),
    ]
    data.write_text("\n".join(lines) + "\n")
    status, out, err = check(capsys, str(data))
    assert status == 1
    assert err == [
        f"preftune: error: {data}: row 2: field 'chosen': empty response",
        f"preftune: error: {data}: row 3: invalid JSON: Expecting property name enclosed in "
        "double quotes at column 2",
        f"preftune: error: {data}: row 5: field 'rejected': expected a string, got int",
    ]
    assert f"{data}: 6 rows of preference pairs, layout standard" in out
    assert "duplicated pairs: 1 (row 6 repeats row 1)" in out
    assert "chosen identical to rejected: 1 (row 4)" in out
    assert "rows with problems: 3 (one line each, on stderr)" in out


def test_sft_layout_is_detected(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = check(capsys, str(SAMPLE_SFT))
    assert status == 0
    assert out.splitlines()[0] == f"{SAMPLE_SFT}: 256 rows of demonstrations, layout messages"
    assert "completion" in out and "chosen" not in out


def test_kind_forces_how_rows_are_read(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = check(capsys, "--kind", "sft", str(SAMPLE_TRAIN))
    assert status == 1
    assert err[0] == (
        f"preftune: error: {SAMPLE_TRAIN}: row 1: field 'completion': missing; demos need prompt "
        "and completion, or messages (columns: prompt, chosen, rejected)"
    )
    assert len(err) == 256


def test_without_paths_the_config_datasets_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny\ndata:\n  train: {SAMPLE_TRAIN}\n  eval: {SAMPLE_EVAL}\n")
    status, out, _ = check(capsys, "--config", str(config), "data.max_prompt_length=8")
    assert status == 0
    assert f"{SAMPLE_TRAIN}: 256 rows" in out and f"{SAMPLE_EVAL}: 64 rows" in out
    assert out.count("data.max_prompt_length=8 (keep_end): ") == 2


def test_unreadable_file_is_one_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = check(capsys, str(tmp_path / "missing.jsonl"))
    assert (status, out, err) == (
        1,
        "",
        [f"preftune: error: {tmp_path / 'missing.jsonl'}: no such file"],
    )


def test_config_mistake_is_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = check(capsys, str(SAMPLE_TRAIN), "data.max_lenght=3")
    assert status == 2
    assert err == ["preftune: error: unknown config key 'data.max_lenght'; did you mean "
                   "'data.max_length'?"]  # fmt: skip


def test_skipped_rows_are_grouped_by_reason() -> None:
    skipped = [
        DataError("d.jsonl", "invalid JSON: Expecting value at column 1", row=4),
        DataError("d.jsonl", "empty response", row=5, field="chosen"),
        DataError("d.jsonl", "invalid JSON: Unterminated string at column 9", row=9),
    ]
    assert describe_skipped("d.jsonl", skipped) == (
        "d.jsonl: skipped 3 malformed rows (data.on_error=skip): 2 × invalid JSON (rows 4, 9); "
        "1 × field 'chosen': empty response (row 5)"
    )


@pytest.mark.slow
def test_command_line_prints_no_traceback(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", [GOOD, {"prompt": "a", "chosen": [], "rejected": "b"}])
    result = run_cli("data", "check", str(data))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"preftune: error: {data}: row 2: field 'chosen': expected a string, got list"
    ]


def test_judged_completions_are_checked_as_kto_reads_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "rated.jsonl"
    rows = [
        {"prompt": "What is 1 plus 1?\n", "completion": "It is 2.", "label": True},
        {"prompt": "What is 1 plus 1?\n", "completion": "No idea.", "label": False},
        {"prompt": "What is 2 plus 2?\n", "completion": "It is 4.", "label": "yes"},
        {"prompt": "What is 1 plus 1?\n", "completion": "It is 2.", "label": True},
    ]
    write_jsonl(data, rows)
    status, out, err = check(capsys, str(data))
    assert status == 1
    assert out.startswith(f"{data}: 4 rows of judged completions, layout unpaired")
    assert "desirable: 2; undesirable: 1" in out
    assert "duplicated completions: 1 (row 4 repeats row 1" in out
    assert err == [
        f"preftune: error: {data}: row 3: field 'label': expected true or false, got str 'yes'"
    ]


def test_a_kto_config_file_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "kto.yaml"
    config.write_text(f"model: tiny\ndata:\n  train: {SAMPLE_TRAIN}\nkto:\n  beta: 0.2\n")
    status, out, err = check(capsys, "--config", str(config))
    assert (status, err) == (0, [])
    assert out.startswith(f"{SAMPLE_TRAIN}: 256 rows of preference pairs")
    status, out, err = check(capsys, "--config", str(config), "kto.bta=0.3")
    assert status == 2
    assert err == ["preftune: error: unknown config key 'kto.bta'; did you mean 'kto.beta'?"]


RANKED = {"prompt": "2+2=", "responses": [" 4", " 5"], "ranking": [0, 1]}
SCORED = {"prompt": "2+2=", "responses": [" 4", " 5"], "scores": [1, 0]}
RATED = {"prompt": "2+2=", "completion": " 4", "label": True}
HUGE = 10**400  # JSON allows it; a float cannot hold it
# (what, a good row, the bad row after it, the field named, what the message says)
VERDICTS = [
    ("margin text", GOOD, {**GOOD, "margin": "1.5"}, "margin", "expected a number, got str"),
    ("margin boolean", GOOD, {**GOOD, "margin": True}, "margin", "expected a number, got bool"),
    ("margin NaN", GOOD, {**GOOD, "margin": float("nan")}, "margin", "finite number, got nan"),
    ("margin huge integer", GOOD, {**GOOD, "margin": HUGE}, "margin",
     "expected a finite number, got an integer too large for a float"),
    ("margin past float32", GOOD, {**GOOD, "margin": 1e39}, "margin",
     "expected a number within ±3.403e+38 (a float32), got 1e+39"),
    ("ranked row with margin", RANKED, {**RANKED, "margin": 0.5}, "margin", "only pairs take"),
    ("score huge integer", RANKED, {**SCORED, "scores": [1, HUGE]}, "scores[1]",
     "an integer too large for a float"),
    ("score infinite", RANKED, {**SCORED, "scores": [float("inf"), 1]}, "scores[0]",
     "expected a finite number, got inf"),
    ("ranking index", RANKED, {**RANKED, "ranking": [0, 5]}, "ranking[1]", "index 5 is out of"),
    ("label word", RATED, {**RATED, "label": "yes"}, "label", "got str 'yes'"),
    ("label huge integer", RATED, {**RATED, "label": HUGE}, "label", "got int 1000000000"),
    ("row over the size limit", GOOD, {**GOOD, "chosen": "x" * MAX_ROW_BYTES}, None, "too large"),
]  # fmt: skip


def verdicts(errors: list[DataError]) -> list[tuple[int | None, str | None, str]]:
    return sorted((error.row, error.field, error.message) for error in errors)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
@pytest.mark.parametrize(
    ("good", "bad", "field", "fragment"),
    [case[1:] for case in VERDICTS],
    ids=[case[0] for case in VERDICTS],
)
def test_data_check_and_training_give_the_same_verdict(
    tmp_path: Path, suffix: str, good: dict, bad: dict, field: str | None, fragment: str
) -> None:
    spec = write_as(tmp_path / f"data{suffix}", [good, bad])
    problems = check_dataset(spec, "train", "auto", TOKENIZER, Budget(64, 32, "keep_end")).problems
    assert problems
    if suffix == ".jsonl":  # in CSV every number is text: other messages, the same agreement
        assert verdicts(problems) == [(2, field, problems[0].message)]
        assert fragment in problems[0].message
    readers: list[Callable] = [load_rated] if "label" in good else [load_pairs, load_preferences]
    for load in readers:
        skipped: list[DataError] = []
        load(spec, "train", skipped)
        assert verdicts(skipped) == verdicts(problems), load.__name__
        with pytest.raises(DataError) as caught:
            load(spec)
        assert verdicts([caught.value]) == verdicts(problems)[:1], load.__name__
