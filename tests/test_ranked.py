"""Ranked rows: reading and validating them, and expanding them into DPO pairs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from preftune.data.check import check_dataset
from preftune.data.encode import Budget, ExpansionReport, encode_pairs
from preftune.data.readers import load_pairs
from preftune.data.records import Ranked
from preftune.errors import DataError
from preftune.models.tiny import build_tokenizer
from tests.conftest import ROOT, read_metrics, run_cli, write_jsonl
from tests.test_cli import assert_one_line_error

SAMPLE_RANKED = ROOT / "examples" / "data" / "sums_ranked.jsonl"
ROW = {"prompt": "2+2=", "responses": [" 4", " 5", " four"], "ranking": [0, 2, 1]}


class CountingTokenizer:
    """A tokenizer that records every text it is asked to tokenize."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.texts: list[str] = []

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        self.texts += texts
        return self.inner(texts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def written_out_pairs(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Each row's preferences as prompt/chosen/rejected rows, straight from its columns."""
    pairs = []
    for row in rows:
        texts = row["responses"]
        if "ranking" in row:
            ranking = row["ranking"]
            ordered = [
                (ranking[a], ranking[b])
                for a in range(len(ranking))
                for b in range(a + 1, len(ranking))
            ]
        else:
            scores = row["scores"]
            ordered = [
                (i, j)
                for i in range(len(texts))
                for j in range(len(texts))
                if scores[i] > scores[j]
            ]
        for better, worse in ordered:
            pairs.append(
                {"prompt": row["prompt"], "chosen": texts[better], "rejected": texts[worse]}
            )
    return pairs


def ids(pairs: list) -> Counter:
    return Counter((tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids)) for p in pairs)


def test_expansion_equals_the_pairs_written_out(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in SAMPLE_RANKED.read_text().splitlines()]
    assert {"ranking", "scores"} <= {key for row in rows for key in row}
    pair_file = write_jsonl(tmp_path / "pairs.jsonl", written_out_pairs(rows))
    tokenizer = build_tokenizer()
    ranked, layout = load_pairs(str(SAMPLE_RANKED))
    assert layout == "ranked"
    expanded, report = encode_pairs(ranked, tokenizer, Budget(40, 16))
    written, _ = encode_pairs(load_pairs(str(pair_file))[0], tokenizer, Budget(40, 16))
    assert len(expanded) == len(written) == 168
    assert ids(expanded) == ids(written)
    assert isinstance(report, ExpansionReport)
    assert report.rows == 48 and report.pairs == 168 and report.tied == 12
    assert "expanded into 168 pairs (12 pairs of tied responses give none)" in report.summary()


def test_ranking_orders_pairs_best_first_and_keeps_the_row(tmp_path: Path) -> None:
    spec = str(write_jsonl(tmp_path / "r.jsonl", [ROW]))
    (record,), _ = load_pairs(spec)
    assert record == Ranked("2+2=", (" 4", " 5", " four"), ((0,), (2,), (1,)))
    tokenizer = build_tokenizer()
    pairs, _ = encode_pairs([record], tokenizer, Budget(64, 32))
    text = [(tokenizer.decode(p.chosen_ids), tokenizer.decode(p.rejected_ids)) for p in pairs]
    assert text == [
        (" 4<|end|>", " four<|end|>"),
        (" 4<|end|>", " 5<|end|>"),
        (" four<|end|>", " 5<|end|>"),
    ]
    assert [p.row for p in pairs] == [1, 1, 1]


def test_prompt_and_each_response_are_tokenized_once(tmp_path: Path) -> None:
    rows = [
        ROW,
        {**ROW, "prompt": "3+3=", "responses": [" 6", " six", " 7", " 9"], "ranking": [1, 0, 2, 3]},
    ]
    spec = str(write_jsonl(tmp_path / "r.jsonl", rows))
    tokenizer = CountingTokenizer(build_tokenizer())
    pairs, _ = encode_pairs(load_pairs(spec)[0], tokenizer, Budget(64, 32))
    assert len(pairs) == 3 + 6
    assert Counter(tokenizer.texts) == Counter(
        ["2+2=", "3+3=", *ROW["responses"], *rows[1]["responses"]]
    )
    # Every pair of a row holds the one list of prompt ids.
    assert all(p.prompt_ids is pairs[0].prompt_ids for p in pairs[:3])
    assert all(p.prompt_ids is pairs[3].prompt_ids for p in pairs[3:])
    # Written out as pairs, the prompt would be tokenized once per pair.
    written = str(write_jsonl(tmp_path / "p.jsonl", written_out_pairs(rows)))
    counting = CountingTokenizer(build_tokenizer())
    encode_pairs(load_pairs(written)[0], counting, Budget(64, 32))
    assert Counter(counting.texts)["3+3="] == 6


def test_truncation_cuts_the_prompt_once_for_all_its_pairs(tmp_path: Path) -> None:
    row = {**ROW, "prompt": "a long prompt " * 4}
    spec = str(write_jsonl(tmp_path / "r.jsonl", [row]))
    pairs, report = encode_pairs(load_pairs(spec)[0], build_tokenizer(), Budget(64, 8))
    assert report.prompts_truncated == 1 and len(pairs[0].prompt_ids) == 8
    assert all(p.prompt_ids is pairs[0].prompt_ids for p in pairs)


def test_scores_tie_gives_no_pair(tmp_path: Path) -> None:
    row = {"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 3, 1]}
    (record,), _ = load_pairs(str(write_jsonl(tmp_path / "r.jsonl", [row])))
    assert record.ranking == ((1,), (0, 2))
    pairs, report = encode_pairs([record], build_tokenizer(), Budget(64, 32))
    assert len(pairs) == 2 and report.tied == 1


def test_conversational_ranked_rows(tmp_path: Path) -> None:
    user = [{"role": "user", "content": "2+2?"}]
    answers = [[{"role": "assistant", "content": text}] for text in ("4", "5")]
    row = {"prompt": user, "responses": answers, "ranking": [0, 1]}
    (record,), _ = load_pairs(str(write_jsonl(tmp_path / "r.jsonl", [row])))
    pairs, _ = encode_pairs([record], build_tokenizer(), Budget(64, 32))
    assert build_tokenizer().decode(pairs[0].chosen_ids) == "4<|end|>\n"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"ranking": [0, 2, 2]}, "field 'ranking[2]': index 2 is listed twice"),
        ({"ranking": [0, 1]}, "field 'ranking': not a permutation of the 3 responses: missing 2"),
        ({"ranking": [0, 3, 1]}, "field 'ranking[1]': index 3 is out of range for 3 responses"),
        ({"ranking": [0, "1", 2]}, "field 'ranking[1]': expected an integer index, got str"),
        ({"responses": [" 4"], "ranking": [0]}, "field 'responses': needs at least 2 responses"),
        ({"responses": [" 4", ""], "ranking": [0, 1]}, "field 'responses[1]': empty response"),
        ({"ranking": None, "scores": [1, 1, 1]}, "field 'scores': all scores are equal"),
        ({"ranking": None, "scores": [1, 2]}, "field 'scores': 2 scores for 3 responses"),
        ({"ranking": None, "scores": [1, True, 2]}, "field 'scores[1]': expected a number"),
        ({"scores": [1, 2, 3]}, "field 'scores': give ranking or scores, not both"),
        ({"ranking": None}, "field 'ranking': missing; ranked rows need ranking"),
        ({"prompt": None}, "field 'prompt': missing (layout ranked needs prompt, responses)"),
    ],
)
def test_bad_ranked_row_is_one_line_naming_row_and_field(
    tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    bad = {key: value for key, value in {**ROW, **change}.items() if value is not None}
    spec = str(write_jsonl(tmp_path / "r.jsonl", [ROW, bad]))
    with pytest.raises(DataError) as caught:
        load_pairs(spec)
    message = str(caught.value)
    assert message.startswith(f"{spec}: row 2: {expected}"), message
    assert "\n" not in message


@pytest.mark.slow
def test_dpo_on_ranked_rows_end_to_end(tmp_path: Path) -> None:
    result = run_cli(
        "dpo",
        f"data.train={SAMPLE_RANKED}",
        "data.max_length=40",
        "data.max_prompt_length=39",
        "train.batch_size=8",
        "train.max_steps=3",
        "train.learning_rate=1e-3",
        "train.log_every=1",
        f"output_dir={tmp_path / 'out'}",
    )
    assert result.returncode == 0, result.stderr
    assert "layout ranked; 48 rows" in result.stdout
    assert "expanded into 168 pairs" in result.stdout
    assert [row["step"] for row in read_metrics(tmp_path / "out")] == [1, 2, 3]


@pytest.mark.slow
def test_dpo_on_a_bad_ranked_file_is_one_line(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "ranked.jsonl", [ROW, {**ROW, "ranking": [0, 5, 1]}])
    result = run_cli("dpo", f"data.train={data}", f"output_dir={tmp_path / 'out'}")
    assert_one_line_error(
        result, "ranked.jsonl: row 2: field 'ranking[1]': index 5 is out of range"
    )


def test_data_check_describes_ranked_rows(tmp_path: Path) -> None:
    rows = [ROW, {**ROW, "responses": [" 4", " 5", " 4"]}, ROW]
    spec = str(write_jsonl(tmp_path / "r.jsonl", rows))
    result = check_dataset(spec, "train", "auto", build_tokenizer(), Budget(64, 32, "keep_end"))
    text = "\n".join(result.summary)
    assert "3 rows of ranked responses, layout ranked" in text
    assert "longest response" in text
    assert "expands into 9 pairs (0 pairs of tied responses give none)" in text
    assert "a response identical to one ranked below it: 1 (row 2)" in text
    assert "duplicated rows: 1 (row 3 repeats row 1)" in text
    assert not result.problems
