"""What a run writes where its output is not a terminal (a CI or cluster job log): one plain line
per logged step and per evaluation, no bar redraws, no transformers bars, and one summary;
``--quiet`` leaves the summary alone; ``log.format=bar`` keeps the bar; ``TQDM_DISABLE`` turns
every bar of preftune's off; a host application receives the lines through its own handler."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from accelerate import Accelerator

from preftune import progress
from preftune.cli import build_parser, main
from preftune.data.encode import Budget, encode_pairs
from preftune.data.readers import load_pairs
from preftune.losses.settings import LossSettings
from preftune.models.generate import Sampling, generate_ids
from preftune.models.refcache import ReferencePass
from preftune.models.tiny import build_model, build_tokenizer
from preftune.objectives.dpo import PairedObjective
from preftune.objectives.settings import SpeedSettings
from preftune.objectives.speed import PairScoring
from preftune.train.metrics_log import MetricsLog, Totals, duration, summary_line
from tests.conftest import ROOT, SAMPLE_EVAL, SAMPLE_TRAIN

# What varies from run to run: time taken and left, and throughput.
MASKS = (
    (re.compile(r"[\d,]+ tok/s"), "N tok/s"),
    (re.compile(r"eta \w+"), "eta T"),
    (re.compile(r" in \w+, "), " in T, "),
)
GOLDEN = """\
step 1/4 loss 0.693 acc 0.00 margin 0 lr 1.0e-03 N tok/s eta T
step 2/4 loss 0.489 acc 1.00 margin 0.463 lr 7.5e-04 N tok/s eta T
eval step 2/4 loss 0.425 acc 1.00 margin 0.639
step 3/4 loss 0.414 acc 1.00 margin 0.672 lr 5.0e-04 N tok/s eta T
step 4/4 loss 0.353 acc 1.00 margin 0.868 lr 2.5e-04 N tok/s
eval step 4/4 loss 0.364 acc 1.00 margin 0.83
done: 4 steps in T, 2.43k tokens; train loss 0.353 acc 1.00 margin 0.868; eval loss 0.364 \
acc 1.00 margin 0.83; model in OUT
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m preftune ARGS`` in a fresh process, its output read as written: a text-mode
    pipe would turn each ``\\r`` of a bar redraw into a newline."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TQDM_DISABLE", None)
    command = [sys.executable, "-m", "preftune", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=600)
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def masked(stderr: str, output_dir: Path) -> str:
    for pattern, replacement in MASKS:
        stderr = pattern.sub(replacement, stderr)
    return stderr.replace(str(output_dir), "OUT")


@pytest.fixture
def short_run(small_run: list[str]) -> list[str]:
    """:func:`small_run` cut to two steps, without trackers or a reference pass."""
    return [*small_run, "train.max_steps=2", "train.report_to=none", "speed.reference_cache=false"]


@pytest.fixture
def chosen_format() -> Iterator[None]:
    """The process's progress format as it was before the test (a run in this process sets it)."""
    before = progress._chosen
    yield
    progress.choose(before)


def test_plain_output_is_one_line_per_step_and_evaluation(
    small_run: list[str], tmp_path: Path
) -> None:
    """stderr is not a terminal, so ``auto`` writes plain lines: compared whole, masked."""
    evaluated = [f"data.eval={SAMPLE_EVAL}", "train.eval_every=2", "train.max_steps=4"]
    result = run_cli("dpo", *small_run, *evaluated, "train.report_to=none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr
    assert masked(result.stderr, tmp_path / "out") == GOLDEN
    assert "Writing model shards" not in result.stderr + result.stdout


def test_quiet_leaves_only_the_summary(short_run: list[str], tmp_path: Path) -> None:
    """No bar and no step line; a saved model loads without transformers' bar either."""
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=0).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    result = run_cli("dpo", "--quiet", *short_run, f"model.path={tmp_path / 'base'}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = masked(result.stderr, tmp_path / "out").splitlines()
    assert lines == [
        "done: 2 steps in T, 1.2k tokens; train loss 0.465 acc 1.00 margin 0.526; model in OUT"
    ]
    assert "Loading weights" not in result.stderr + result.stdout


def test_bar_format_keeps_the_bar(short_run: list[str]) -> None:
    result = run_cli("dpo", *short_run, "log.format=bar")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" in result.stderr and "dpo: 100%" in result.stderr
    assert "step 1/2" not in result.stderr
    assert len(re.findall(r"^done: 2 steps", result.stderr, re.MULTILINE)) == 1


def test_a_host_handler_receives_the_lines(
    short_run: list[str], chosen_format: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """In process: the command line adds no handler where the host has one, and every line goes
    through the host's, as a record of the ``preftune`` logger."""
    received: list[str] = []

    class Host(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            received.append(record.getMessage())

    host = Host()
    level = progress.logger.level
    progress.logger.addHandler(host)
    progress.logger.setLevel(logging.INFO)
    try:
        assert main(["dpo", *short_run, "log.format=plain"]) == 0
        assert progress.logger.handlers == [host]
    finally:
        progress.logger.removeHandler(host)
        progress.logger.setLevel(level)
    assert [line.split(" ")[:2] for line in received] == [
        ["step", "1/2"],
        ["step", "2/2"],
        ["done:", "2"],
    ]
    assert "step 1/2" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("chosen", "disabled", "shown"),
    [("bar", "", True), ("bar", "1", False), ("plain", "", False), ("auto", "", False)],
)
def test_every_bar_follows_the_format_and_tqdm_disable(
    chosen: str,
    disabled: str,
    shown: bool,
    chosen_format: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The training bar, the reference pass's and generation's. tqdm reads ``TQDM_DISABLE``
    only for bars given no ``disable``; preftune's read it too. ``auto`` under pytest writes to
    a captured stderr, which is not a terminal."""
    monkeypatch.setenv("TQDM_DISABLE", disabled)
    progress.choose(chosen)
    log = MetricsLog(tmp_path, 1, 0, True, "training")
    log.advance()
    log.close()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0)
    pairs, _ = encode_pairs(load_pairs(str(SAMPLE_TRAIN))[0][:2], tokenizer, Budget(48, 24))
    scoring = PairScoring.from_config(SpeedSettings())
    objective = PairedObjective(LossSettings(), None, tokenizer.pad_token_id, scoring)
    reference = ReferencePass(model, objective.score, objective.collate, 2, Accelerator(cpu=True))
    reference.compute(pairs, "train")
    prompt = tokenizer("a").input_ids
    generate_ids(model, [prompt], tokenizer, Sampling(max_new_tokens=2), desc="sampling")
    err = capsys.readouterr().err
    drawn = ["training" in err, "reference log-probs (train)" in err, "sampling" in err]
    assert drawn == [shown] * 3


def test_summary_line_names_a_resumed_run() -> None:
    totals = Totals(step=200, steps=200, start=150, tokens=999_999, seconds=3725)
    metrics = {"loss": 0.41, "reward": 1.5, "kl": 0.02, "eval/loss": 0.45, "learning_rate": 1e-6}
    assert summary_line(totals, metrics, "runs/x") == (
        "done: 200 steps (50 after resuming at step 150) in 1h02m, 1M tokens; "
        "train loss 0.41 reward 1.5 kl 0.02; eval loss 0.45; model in runs/x"
    )
    assert [duration(s) for s in (0.4, 59.6, 192, 7200)] == ["0s", "1m00s", "3m12s", "2h00m"]


def test_quiet_is_a_flag_of_the_training_commands() -> None:
    parser = build_parser()
    assert parser.parse_args(["ppo", "--quiet"]).quiet
    with pytest.raises(SystemExit):
        parser.parse_args(["label", "--quiet"])


def test_silencing_datasets_leaves_the_environment_and_can_be_undone() -> None:
    """A run silences datasets through its own switches, not the process's environment, so a
    host process (a notebook calling the API) can turn its bars back on; datasets is imported
    only once something reads through it (a fresh process: it is not imported before)."""
    script = """
import os, sys
from preftune.commands.common import use_log_settings
from preftune.train.settings import LogSettings
use_log_settings(LogSettings())
assert "datasets" not in sys.modules
assert "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ
assert "DATASETS_VERBOSITY" not in os.environ
from preftune.progress import imported_datasets
datasets = imported_datasets()
assert not datasets.is_progress_bar_enabled()
datasets.enable_progress_bars()
assert datasets.is_progress_bar_enabled()
"""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "DATASETS_VERBOSITY")
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
