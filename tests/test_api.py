"""preftune from Python: ``preftune.train`` on rows, a ``datasets.Dataset``, a path or a model
object trains as the command line would, and refuses what the command line refuses, in one
line, before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from preftune.api import train
from preftune.errors import ConfigError
from tests.conftest import ROOT, SAMPLE_TRAIN, read_metrics, write_jsonl

ROWS = [json.loads(line) for line in SAMPLE_TRAIN.read_text().splitlines()[:16]]
KEYS = {
    "train.max_steps": 2,
    "train.batch_size": 4,
    "train.learning_rate": 1e-3,
    "train.log_every": 1,
    "train.report_to": "none",
    "data.max_length": 48,
    "data.max_prompt_length": 24,
}
TIMING = {"tokens_per_second"}


def trained(tmp_path: Path, name: str, **given: Any) -> dict[str, float]:
    metrics = train("dpo", output_dir=str(tmp_path / name), **given, **KEYS)
    assert [row["step"] for row in read_metrics(tmp_path / name)] == [1, 2]
    return {key: value for key, value in metrics.items() if key not in TIMING}


def test_rows_a_dataset_and_a_path_train_alike(tmp_path: Path) -> None:
    import datasets

    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    from_path = trained(tmp_path, "path", train=str(path))
    assert trained(tmp_path, "rows", train=ROWS) == from_path
    assert trained(tmp_path, "dataset", train=datasets.Dataset.from_list(ROWS)) == from_path


def test_rows_are_written_once_under_a_name_their_content_decides(tmp_path: Path) -> None:
    from preftune.api import _data_path

    first, again = _data_path(ROWS, "train"), _data_path([dict(row) for row in ROWS], "train")
    assert first == again and Path(first).read_text().count("\n") == len(ROWS)
    assert _data_path(ROWS[:8], "train") != first


def test_a_model_object_trains_from_its_saved_copy(tmp_path: Path) -> None:
    from preftune.models.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0)
    with pytest.raises(ConfigError, match="a model object needs its tokenizer"):
        train("dpo", model=model, train=ROWS, **KEYS)
    metrics = trained(tmp_path, "object", model=model, tokenizer=tokenizer, train=ROWS)
    assert metrics["loss"] > 0
    assert (tmp_path / "object" / "config.json").exists()
    assert "base_model" not in (tmp_path / "object" / "README.md").read_text()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            {"command": "dpo", "train.learning_rate": "1e-5"},
            "config key 'train.learning_rate' must be float, got '1e-5'",
        ),
        ({"command": "dpo", "train.max_step": 3}, "did you mean 'train.max_steps'?"),
        ({"command": "dpo", "gradient_accumulation_steps": 4}, "train.batch_size is the global"),
        ({"command": "dpo", "loss.beta": -1}, "loss.beta must be positive, got -1.0"),
        ({"command": "dpo", "data.train": "x.jsonl"}, "data.train is given twice"),
        ({"command": "score"}, "preftune.api.train runs a training command (dpo, sft, "),
        ({"command": "data check"}, "not 'data check'"),
        ({"command": "dpo", "tokenizer": object()}, "tokenizer= goes with a model object"),
    ],
)
def test_mistakes_are_one_line_before_any_model(
    call: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import preftune.commands.dpo

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the command ran before its config was checked")

    monkeypatch.setattr(preftune.commands.dpo, "run_dpo", refused)
    command = call.pop("command")
    with pytest.raises(ConfigError) as caught:
        train(command, train=ROWS, **call)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_rows_that_are_not_rows_are_refused() -> None:
    with pytest.raises(ConfigError, match="train= holds no rows"):
        train("dpo", train=[])
    with pytest.raises(ConfigError, match="not a dict"):
        train("dpo", train={"prompt": "a"})
    with pytest.raises(ConfigError, match="row 2 cannot be written as JSON"):
        train("dpo", train=[ROWS[0], {"prompt": object()}])


def test_importing_preftune_loads_no_torch() -> None:
    code = (
        "import sys, preftune\n"
        "from preftune.api import train\n"
        "assert callable(train)\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
