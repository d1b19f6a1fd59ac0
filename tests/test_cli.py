"""The command line in fresh processes: one-line errors, and multi-process parity."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import LAUNCHER, SAMPLE_TRAIN, read_metrics, run_cli, write_jsonl


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("preftune: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_unknown_key_names_the_closest_key() -> None:
    result = run_cli("dpo", "train.lerning_rate=1e-5")
    assert_one_line_error(result, "train.lerning_rate", "did you mean 'train.learning_rate'")


@pytest.mark.slow
def test_bad_row_stops_before_training(tmp_path: Path) -> None:
    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "a", "chosen": "b", "rejected": "c"},
            {"prompt": "a", "chosen": "", "rejected": "c"},
        ],
    )
    result = run_cli("dpo", f"data.train={data}", f"output_dir={tmp_path / 'out'}")
    assert_one_line_error(result, "pairs.jsonl", "row 2", "'chosen'")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_missing_model_directory_is_one_line(tmp_path: Path) -> None:
    result = run_cli("dpo", f"model={tmp_path}/nothing", f"data.train={SAMPLE_TRAIN}")
    assert_one_line_error(result, "no such directory")


def test_help_runs_from_the_module() -> None:
    result = run_cli("dpo", "--help")
    assert result.returncode == 0
    assert "loss.label_smoothing" in result.stdout and "train.micro_batch_size" in result.stdout


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    common = [
        "dpo",
        f"data.train={SAMPLE_TRAIN}",
        "data.max_length=48",
        "data.max_prompt_length=24",
        "train.batch_size=8",
        "train.max_steps=4",
        "train.learning_rate=1e-3",
        "train.log_every=1",
        "train.save_every=0",
    ]
    single = run_cli(*common, "train.micro_batch_size=4", f"output_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr
    double = run_cli(
        *common, "train.micro_batch_size=2", f"output_dir={tmp_path / 'two'}", launcher=LAUNCHER
    )
    assert double.returncode == 0, double.stderr
    assert "= 2 processes x 2 micro-batches x 2" in double.stdout
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a["step"])
