"""A finished run goes on when ``train.max_steps`` is raised; a checkpoint written before a key
existed still resumes when the run leaves that key at its default, and not otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.cli import main
from tests.conftest import SAMPLE_TRAIN, read_metrics

RUN = [
    "dpo",
    f"data.train={SAMPLE_TRAIN}",
    "data.max_length=48",
    "data.max_prompt_length=24",
    "train.batch_size=8",
    "train.learning_rate=1e-3",
    "train.log_every=1",
    "train.save_every=2",
    "train.report_to=none",
]


def test_raising_max_steps_extends_a_finished_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main([*RUN, "train.max_steps=4", f"output_dir={out}"]) == 0
    capsys.readouterr()
    assert main([*RUN, "train.max_steps=6", f"output_dir={out}"]) == 0
    said = capsys.readouterr().out
    assert "train.max_steps was 4, now 6: going on from step-00000004" in said
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert main([*RUN, "train.max_steps=3", f"output_dir={out}"]) == 2
    assert "train.max_steps=3 is below the step of step-00000006" in capsys.readouterr().err


def test_a_key_newer_than_the_checkpoint_matches_its_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main([*RUN, "train.max_steps=4", f"output_dir={out}"]) == 0
    state = out / "checkpoints" / "step-00000004" / "state.json"
    recorded = json.loads(state.read_text())
    del recorded["config"]["reference.sync_every"]  # as if written before the key existed
    state.write_text(json.dumps(recorded))
    assert main([*RUN, "train.max_steps=5", f"output_dir={out}"]) == 0
    assert read_metrics(out)[-1]["step"] == 5
    capsys.readouterr()
    changed = ["reference.sync_every=2", "speed.reference_cache=false", "train.max_steps=6"]
    assert main([*RUN, *changed, f"output_dir={out}"]) == 2
    assert "holds a checkpoint of a different run (reference.sync_every" in capsys.readouterr().err
