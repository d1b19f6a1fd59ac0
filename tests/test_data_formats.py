"""Layout detection and conversion to canonical records, and the errors for rows that do not fit."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.parquet
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune.data.readers import load_demos, load_pairs, load_preferences
from preftune.data.records import Demo, Pair
from preftune.errors import DataError


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def pairs_error(path: Path, rows: list[dict[str, Any]]) -> str:
    spec = jsonl(path, rows)
    with pytest.raises(DataError) as caught:
        load_pairs(spec)
    return str(caught.value).removeprefix(f"{spec}: ")


def demos_error(path: Path, rows: list[dict[str, Any]]) -> str:
    spec = jsonl(path, rows)
    with pytest.raises(DataError) as caught:
        load_demos(spec)
    return str(caught.value).removeprefix(f"{spec}: ")


STANDARD = {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}
HH_CHOSEN = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4, of course."
HH_REJECTED = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5"
HH_PROMPT = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant:"


def test_standard_layout_ignores_extra_columns_and_allows_empty_prompt(tmp_path: Path) -> None:
    rows = [{**STANDARD, "score": 3}, {"prompt": "", "chosen": "a", "rejected": "b"}]
    pairs, layout = load_pairs(jsonl(tmp_path / "p.jsonl", rows))
    assert layout == "standard"
    assert pairs == [Pair("2+2=", " 4", " 5"), Pair("", "a", "b")]


def test_pairs_carry_their_margin_and_a_paired_loss_says_it_ignores_it(tmp_path: Path) -> None:
    spec = jsonl(tmp_path / "m.jsonl", [{**STANDARD, "margin": 2}, STANDARD])
    pairs, layout = load_pairs(spec)
    assert [pair.margin for pair in pairs] == [2.0, 0.0]
    assert layout == "standard, column 'margin' ignored (only preftune rm reads it)"
    assert load_preferences(spec)[1] == "standard"
    zeros = jsonl(tmp_path / "z.jsonl", [{**STANDARD, "margin": 0}])
    assert load_pairs(zeros)[1] == "standard"


def test_conversational_layout(tmp_path: Path) -> None:
    row = {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}
    pairs, layout = load_pairs(jsonl(tmp_path / "p.jsonl", [row]))
    assert layout == "conversational"
    assert pairs == [Pair([user("2+2?")], [assistant("4")], [assistant("5")])]


def test_conversational_layout_from_csv_cells(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    cells = [json.dumps(text).replace('"', '""') for text in ([user("q")], [assistant("a")])]
    path.write_text(f'prompt,chosen,rejected\n"{cells[0]}","{cells[1]}","{cells[1]}"\n')
    pairs, layout = load_pairs(str(path))
    assert (pairs, layout) == (
        [Pair([user("q")], [assistant("a")], [assistant("a")])],
        "conversational",
    )


def test_implicit_text_prompt_backs_off_to_a_word_boundary(tmp_path: Path) -> None:
    rows = [
        {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"},
        {"chosen": "The cat sat.", "rejected": "The car sat."},
    ]
    pairs, layout = load_pairs(jsonl(tmp_path / "p.jsonl", rows))
    assert layout == "implicit"
    assert pairs == [Pair("Q: 2+2? A:", " 4", " 5"), Pair("The", " cat sat.", " car sat.")]


def test_implicit_text_with_nothing_shared_is_an_error(tmp_path: Path) -> None:
    message = pairs_error(tmp_path / "p.jsonl", [{"chosen": "Yes.", "rejected": "Yeah"}])
    assert message == (
        "row 1: field 'rejected': chosen and rejected share no prompt "
        "(no common start up to a word boundary)"
    )


@settings(max_examples=60, deadline=None)
@given(
    st.text(" ab\n", min_size=1, max_size=12),
    st.text(" ab\n", min_size=1, max_size=8),
    st.text(" ab\n", min_size=1, max_size=8),
)
def test_implicit_text_split_loses_no_text(shared: str, chosen_end: str, rejected_end: str) -> None:
    chosen, rejected = shared + chosen_end, shared + rejected_end
    with tempfile.TemporaryDirectory() as folder:
        spec = jsonl(Path(folder) / "p.jsonl", [{"chosen": chosen, "rejected": rejected}])
        try:
            [pair], _ = load_pairs(spec)
        except DataError:
            return
    assert pair.prompt + pair.chosen == chosen
    assert pair.prompt + pair.rejected == rejected
    assert pair.prompt.strip() and pair.chosen[0].isspace() and pair.rejected[0].isspace()


def test_implicit_conversation_prompt_is_all_before_final_assistant(tmp_path: Path) -> None:
    history = [user("hi"), assistant("hello"), user("2+2?")]
    row = {"chosen": [*history, assistant("4")], "rejected": [*history, assistant("5")]}
    pairs, layout = load_pairs(jsonl(tmp_path / "p.jsonl", [row]))
    assert layout == "implicit"
    assert pairs == [Pair(history, [assistant("4")], [assistant("5")])]


def test_implicit_conversation_with_different_histories_is_an_error(tmp_path: Path) -> None:
    row = {"chosen": [user("a"), assistant("4")], "rejected": [user("b"), assistant("5")]}
    assert pairs_error(tmp_path / "p.jsonl", [row]) == (
        "row 1: field 'rejected': the messages before the final assistant message differ "
        "from chosen's"
    )


def test_implicit_conversation_must_end_with_assistant(tmp_path: Path) -> None:
    row = {"chosen": [user("a"), assistant("4")], "rejected": [user("a"), user("5")]}
    assert pairs_error(tmp_path / "p.jsonl", [row]) == (
        "row 1: field 'rejected[1].role': the last message must be the assistant's, got role 'user'"
    )


def test_implicit_text_then_conversation_row_is_an_error(tmp_path: Path) -> None:
    rows = [
        {"chosen": "Q: a", "rejected": "Q: b"},
        {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]},
    ]
    assert pairs_error(tmp_path / "p.jsonl", rows) == (
        "row 2: field 'chosen': expected a string, got list"
    )


def test_hh_prompt_runs_to_the_last_assistant_turn(tmp_path: Path) -> None:
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]
    pairs, layout = load_pairs(jsonl(tmp_path / "p.jsonl", rows))
    assert layout == "hh"
    assert pairs == [Pair(HH_PROMPT, " 4, of course.", " 5")]


def test_hh_rejected_with_another_transcript_is_an_error(tmp_path: Path) -> None:
    rows = [{"chosen": HH_CHOSEN, "rejected": "\n\nHuman: bye\n\nAssistant: 5"}]
    assert pairs_error(tmp_path / "p.jsonl", rows) == (
        "row 1: field 'rejected': does not start with chosen's transcript up to its last "
        "'\\n\\nAssistant:'"
    )


def test_hh_from_parquet(tmp_path: Path) -> None:
    path = tmp_path / "hh.parquet"
    table = pyarrow.Table.from_pylist([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    pyarrow.parquet.write_table(table, path)
    assert load_pairs(str(path)) == ([Pair(HH_PROMPT, " 4, of course.", " 5")], "hh")


def test_mixed_standard_and_conversational_rows_name_the_row(tmp_path: Path) -> None:
    rows = [STANDARD, STANDARD, {"prompt": [user("q")], "chosen": "a", "rejected": "b"}]
    assert pairs_error(tmp_path / "p.jsonl", rows) == (
        "row 3: row has layout conversational but the dataset is standard"
    )


def test_mixed_implicit_and_standard_rows_name_the_row(tmp_path: Path) -> None:
    rows = [{"chosen": "Q: a", "rejected": "Q: b"}, STANDARD]
    assert pairs_error(tmp_path / "p.jsonl", rows) == (
        "row 2: row has layout standard but the dataset is implicit"
    )


def test_row_missing_a_field_of_the_dataset_layout(tmp_path: Path) -> None:
    rows = [STANDARD, {"chosen": "a", "rejected": "b"}]
    assert pairs_error(tmp_path / "p.jsonl", rows) == (
        "row 2: field 'prompt': missing (layout standard needs prompt, chosen, rejected)"
    )


def test_first_row_without_chosen_lists_the_columns(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "completion": "c"}]
    assert pairs_error(tmp_path / "p.jsonl", rows) == (
        "row 1: field 'chosen': missing; preference data needs chosen and rejected "
        "(columns: prompt, completion)"
    )


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"chosen": 3}, "field 'chosen': expected a string, got int"),
        ({"prompt": None, "rejected": "b"}, "field 'prompt': missing"),
        ({"rejected": " \n\t"}, "field 'rejected': empty response"),
        ({"chosen": ""}, "field 'chosen': empty response"),
    ],
)
def test_bad_standard_row(tmp_path: Path, bad: dict[str, Any], message: str) -> None:
    assert pairs_error(tmp_path / "p.jsonl", [STANDARD, {**STANDARD, **bad}]).startswith(
        f"row 2: {message}"
    )


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"role": "bot", "content": "a"}, "field 'chosen[0].role': unknown role 'bot'; "),
        ({"role": "assistant"}, "field 'chosen[0]': message has no 'content'"),
        ({"content": "a"}, "field 'chosen[0]': message has no 'role'"),
        (
            {"role": "assistant", "content": 5},
            "field 'chosen[0].content': expected a string, got int",
        ),
        ("hello", "field 'chosen[0]': expected a message with role and content, got str"),
        ({"role": "assistant", "content": "  "}, "field 'chosen': empty response"),
    ],
)
def test_bad_message(tmp_path: Path, bad: Any, message: str) -> None:
    row = {"prompt": [user("q")], "chosen": [bad], "rejected": [assistant("b")]}
    assert pairs_error(tmp_path / "p.jsonl", [row]).startswith(f"row 1: {message}")


def test_unknown_role_lists_valid_roles(tmp_path: Path) -> None:
    row = {"prompt": [{"role": "human", "content": "q"}], "chosen": [assistant("a")]}
    row["rejected"] = [assistant("b")]
    assert pairs_error(tmp_path / "p.jsonl", [row]) == (
        "row 1: field 'prompt[0].role': unknown role 'human'; valid: system, user, assistant, tool"
    )


def test_prompt_completion_demos(tmp_path: Path) -> None:
    rows = [{"prompt": "Say hi:", "completion": " hi", "id": 7}]
    assert load_demos(jsonl(tmp_path / "d.jsonl", rows)) == (
        [Demo("Say hi:", " hi")],
        "prompt_completion",
    )


def test_conversational_prompt_completion_demos(tmp_path: Path) -> None:
    rows = [{"prompt": [user("hi")], "completion": [assistant("hello")]}]
    demos, layout = load_demos(jsonl(tmp_path / "d.jsonl", rows))
    assert (demos, layout) == ([Demo([user("hi")], [assistant("hello")])], "prompt_completion")


def test_messages_demos_split_off_the_last_message(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Be brief."}
    rows = [{"messages": [system, user("hi"), assistant("hello")]}]
    demos, layout = load_demos(jsonl(tmp_path / "d.jsonl", rows))
    assert (demos, layout) == ([Demo([system, user("hi")], [assistant("hello")])], "messages")


def test_messages_must_end_with_assistant(tmp_path: Path) -> None:
    rows = [{"messages": [user("hi"), assistant("hello")]}, {"messages": [user("hi")]}]
    assert demos_error(tmp_path / "d.jsonl", rows) == (
        "row 2: field 'messages[0].role': the last message must be the assistant's, got role 'user'"
    )


def test_mixed_demo_layouts_name_the_row(tmp_path: Path) -> None:
    rows = [{"messages": [user("hi"), assistant("hello")]}, {"prompt": "a", "completion": "b"}]
    assert demos_error(tmp_path / "d.jsonl", rows) == (
        "row 2: field 'messages': missing (layout messages needs messages)"
    )
    rows.reverse()
    assert demos_error(tmp_path / "d.jsonl", rows) == (
        "row 2: field 'prompt': missing (layout prompt_completion needs prompt, completion)"
    )


def test_demo_completion_type_must_match_the_first_row(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": [assistant("b")]}]
    assert demos_error(tmp_path / "d.jsonl", rows) == (
        "row 2: field 'completion': expected a string, got list"
    )


def test_demo_without_completion_or_messages(tmp_path: Path) -> None:
    assert demos_error(tmp_path / "d.jsonl", [{"prompt": "a"}]) == (
        "row 1: field 'completion': missing; demos need prompt and completion, or messages "
        "(columns: prompt)"
    )
