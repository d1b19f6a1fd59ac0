"""KTO's data: pairs split into a desirable and an undesirable example, unpaired rows and their
labels, truncation, the errors that name file, row and field; the balance warning and the
config's checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from preftune.commands.kto import KTOConfig
from preftune.config import load_config
from preftune.data.encode import Budget, encode_rated, label_counts
from preftune.data.readers import load_pairs, load_rated
from preftune.data.records import Rated
from preftune.errors import ConfigError, DataError
from preftune.objectives.kto import balance_warning
from preftune.objectives.settings import KTOSettings
from tests.conftest import SAMPLE_TRAIN, write_jsonl


def test_pairs_split_into_desirable_chosen_and_undesirable_rejected(tiny) -> None:
    pairs, _ = load_pairs(str(SAMPLE_TRAIN))
    records, layout = load_rated(str(SAMPLE_TRAIN))
    assert layout.startswith("standard pairs, split into desirable")
    assert len(records) == 2 * len(pairs)
    first = pairs[0]
    assert records[:2] == [
        Rated(first.prompt, first.chosen, True),
        Rated(first.prompt, first.rejected, False),
    ]
    assert records[0].row == records[1].row == 1 and records[3].row == 2
    examples, report = encode_rated(records, tiny, Budget(48, 24))
    assert report.rows == report.kept == len(records)
    assert label_counts(examples) == (len(pairs), len(pairs))
    assert [e.row for e in examples[:4]] == [1, 1, 2, 2]
    assert [e.desirable for e in examples[:4]] == [True, False, True, False]


def test_conversational_pairs_and_unpaired_conversations(tmp_path: Path) -> None:
    user = [{"role": "user", "content": "2+2?"}]
    four, five = [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": user, "chosen": four, "rejected": five}])
    records, layout = load_rated(str(pairs))
    assert layout.startswith("conversational pairs")
    assert records == [Rated(user, four, True), Rated(user, five, False)]
    rows = [{"prompt": user, "completion": five, "label": False}]
    records, layout = load_rated(str(write_jsonl(tmp_path / "u.jsonl", rows)))
    assert (records, layout) == ([Rated(user, five, False)], "unpaired")


def test_csv_labels_may_be_the_words_true_and_false(tmp_path: Path) -> None:
    path = tmp_path / "rated.csv"
    path.write_text("prompt,completion,label\n2+2=,4,true\n2+2=,5,False\n")
    records, _ = load_rated(str(path))
    assert [r.label for r in records] == [True, False]


def test_truncation_drops_and_counts_across_both_labels(tiny, tmp_path: Path) -> None:
    rows = [
        {"prompt": "short", "completion": "fine", "label": True},
        {"prompt": "x" * 40, "completion": "too late", "label": False},
        {"prompt": "ok", "completion": "no" * 30, "label": False},
    ]
    records, _ = load_rated(str(write_jsonl(tmp_path / "r.jsonl", rows)))
    examples, report = encode_rated(records, tiny, Budget(20, None))
    assert [e.row for e in examples] == [1, 3]
    assert (report.rows, report.dropped, report.responses_truncated) == (3, 1, 1)


@pytest.mark.parametrize(
    ("label", "shown"),
    [("yes", "got str 'yes'"), (1, "got int 1"), ([True], "got list [True]")],
)
def test_bad_label_names_file_row_and_field(tmp_path: Path, label, shown: str) -> None:
    rows = [
        {"prompt": "a", "completion": "b", "label": True},
        {"prompt": "a", "completion": "c", "label": label},
    ]
    spec = str(write_jsonl(tmp_path / "rated.jsonl", rows))
    with pytest.raises(DataError) as caught:
        load_rated(spec)
    assert str(caught.value) == (f"{spec}: row 2: field 'label': expected true or false, {shown}")


def test_split_pairs_say_their_margins_are_ignored(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1.5}]
    _, layout = load_rated(str(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    assert layout.endswith("(rejected), column 'margin' ignored (only preftune rm reads it)")


def test_missing_label_and_paired_row_in_unpaired_data(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a", "completion": "b", "label": True},
        {"prompt": "a", "chosen": "b", "rejected": "c"},
    ]
    spec = str(write_jsonl(tmp_path / "mixed.jsonl", rows))
    with pytest.raises(DataError, match=r"row 2: field 'completion': missing \(layout unpaired"):
        load_rated(spec)
    skipped: list[DataError] = []
    records, _ = load_rated(spec, skipped=skipped)
    assert len(records) == 1 and [e.row for e in skipped] == [2]


def test_balance_warning_follows_the_papers_range() -> None:
    assert balance_warning(100, 100, KTOSettings()) is None
    assert balance_warning(130, 100, KTOSettings()) is None
    warning = balance_warning(300, 100, KTOSettings())
    assert warning is not None and "= 3, outside [1, 4/3]" in warning
    assert "kto.undesirable_weight=2.57" in warning
    balanced = KTOSettings(undesirable_weight=2.57)
    assert balance_warning(300, 100, balanced) is None
    assert balance_warning(50, 100, KTOSettings()) is not None
    assert "no undesirable" in balance_warning(10, 0, KTOSettings())


def test_config_keys_and_their_checks() -> None:
    cfg = load_config(KTOConfig, None, ["kto.beta=0.2", "kto.undesirable_weight=1.5"])
    assert (cfg.kto.beta, cfg.kto.desirable_weight, cfg.kto.undesirable_weight) == (0.2, 1.0, 1.5)
    with pytest.raises(ConfigError, match=r"kto\.desirable_weight must be positive"):
        load_config(KTOConfig, None, ["kto.desirable_weight=0"])
    with pytest.raises(ConfigError, match=r"unknown config key 'loss\.beta'"):
        load_config(KTOConfig, None, ["loss.beta=0.1"])
