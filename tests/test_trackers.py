"""``train.report_to``: every logged record reaches each tracker named, a resumed run continues
the same tracker run, and a tracker that is not installed is one clear line."""

from __future__ import annotations

import importlib.machinery
import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from preftune.commands.dpo import DPOConfig, run_dpo
from preftune.config import load_config
from preftune.errors import ConfigError
from tests.conftest import read_metrics


class FakeTracking:
    """Stands in for the wandb and mlflow modules, recording what they are asked to do."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.logged: dict[str, list[tuple[int, dict]]] = {"wandb": [], "mlflow": []}
        self.runs = 0

    def modules(self) -> dict[str, types.ModuleType]:
        wandb = types.ModuleType("wandb")
        wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        wandb.init = self.wandb_init
        mlflow = types.ModuleType("mlflow")
        mlflow.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)
        mlflow.start_run = self.mlflow_start_run
        mlflow.log_params = lambda params: self.calls.append(("mlflow.log_params", params))
        mlflow.log_metrics = lambda record, step: self.logged["mlflow"].append((step, record))
        mlflow.end_run = lambda: self.calls.append(("mlflow.end_run", {}))
        return {"wandb": wandb, "mlflow": mlflow}

    def wandb_init(self, **kwargs):
        self.calls.append(("wandb.init", kwargs))
        self.runs += 1
        run = types.SimpleNamespace(id=kwargs["id"] or f"wandb-run-{self.runs}")
        run.log = lambda record, step: self.logged["wandb"].append((step, record))
        run.finish = lambda: self.calls.append(("wandb.finish", {}))
        return run

    def mlflow_start_run(self, **kwargs):
        self.calls.append(("mlflow.start_run", kwargs))
        self.runs += 1
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=f"mlflow-run-{self.runs}"))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTracking:
    tracking = FakeTracking()
    for name, module in tracking.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return tracking


def test_every_record_reaches_every_tracker_and_resume_continues_the_run(
    small_run: list[str], tmp_path: Path, fake: FakeTracking
) -> None:
    config = load_config(
        DPOConfig,
        None,
        [
            *small_run,
            "train.report_to=[tensorboard,wandb,mlflow]",
            "train.max_steps=5",
            "train.save_every=3",
            "train.keep_checkpoints=0",
        ],
    )
    run_dpo(config)
    out = tmp_path / "out"
    ids = json.loads((out / "trackers.json").read_text())
    assert ids == {"wandb": "wandb-run-1", "mlflow": "mlflow-run-2"}
    init = dict(fake.calls)["wandb.init"]
    assert init["id"] is None and init["config"]["loss.beta"] == 0.1
    params = dict(fake.calls)["mlflow.log_params"]
    assert params["train.report_to"] == str(["tensorboard", "wandb", "mlflow"])
    expected = {record.pop("step"): record for record in read_metrics(out)}
    assert_logged(fake, expected, [1, 2, 3, 4, 5])

    # As if killed after step 3's checkpoint: the same command resumes the same tracker runs.
    shutil.rmtree(out / "checkpoints" / "step-00000005")
    fake.calls.clear()
    fake.logged = {"wandb": [], "mlflow": []}
    run_dpo(config)
    assert dict(fake.calls)["wandb.init"]["id"] == "wandb-run-1"
    assert dict(fake.calls)["mlflow.start_run"] == {"run_id": "mlflow-run-2"}
    assert "mlflow.log_params" not in dict(fake.calls)
    assert {"wandb.finish", "mlflow.end_run"} <= set(dict(fake.calls))
    assert_logged(fake, expected, [4, 5])


def assert_logged(fake: FakeTracking, expected: dict[int, dict], steps: list[int]) -> None:
    """Each tracker got exactly the metrics.jsonl records of ``steps``."""
    for name in ("wandb", "mlflow"):
        assert [step for step, _ in fake.logged[name]] == steps
        for step, record in fake.logged[name]:
            want = expected[step]
            assert record.keys() == want.keys()
            assert all(
                record[k] == pytest.approx(want[k]) for k in want if k != "tokens_per_second"
            )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("wandb", "train.report_to includes wandb, which is not installed: "),
        ("[none,tensorboard]", "train.report_to: 'none' cannot be combined with trackers"),
        ("tensorbord", "config key 'train.report_to' must be one of tensorboard, wandb, mlflow"),
    ],
)
def test_unusable_tracker_is_one_line(
    value: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
        load_config(DPOConfig, None, [f"train.report_to={value}"])


def test_none_writes_metrics_only(small_run: list[str], tmp_path: Path) -> None:
    run_dpo(load_config(DPOConfig, None, [*small_run, "train.report_to=none", "train.max_steps=2"]))
    out = tmp_path / "out"
    assert len(read_metrics(out)) == 2
    assert not (out / "tensorboard").exists() and not (out / "trackers.json").exists()
