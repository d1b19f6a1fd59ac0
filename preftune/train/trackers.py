"""Experiment trackers that receive every logged record besides ``metrics.jsonl``.

TensorBoard is a dependency; Weights & Biases and MLflow are used when ``train.report_to``
names them and they are installed (``pip install 'preftune[wandb]'`` / ``'preftune[mlflow]'``).
A run resumed in the same ``output_dir`` continues the same tracker run: its id is kept in
``output_dir/trackers.json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Protocol

from preftune.errors import ConfigError
from preftune.files import write_text_atomically

IDS_FILE = "trackers.json"


class Tracker(Protocol):
    def log(self, record: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def open_trackers(
    names: list[str], output_dir: Path, start_step: int, run_config: dict[str, Any]
) -> list[Tracker]:
    """The trackers ``train.report_to`` names (checked by :func:`check_trackers` when the config
    was built), opened for a run resuming after ``start_step`` (0: a new run). ``none`` alone
    means metrics.jsonl only."""
    ids = _read_ids(output_dir)
    opened: list[Tracker] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            opened.append(TensorBoardTracker(output_dir, start_step))
        elif name == "wandb":
            opened.append(WandbTracker(output_dir, ids, run_config))
        elif name == "mlflow":
            opened.append(MLflowTracker(output_dir, ids, run_config))
    _write_ids(output_dir, ids)
    return opened


def check_trackers(names: list[str]) -> None:
    """Raise a one-line ``ConfigError`` unless every tracker ``names`` lists can be used."""
    if "none" in names and len(names) > 1:
        raise ConfigError("train.report_to: 'none' cannot be combined with trackers")
    for name in ("wandb", "mlflow"):
        if name in names and importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"train.report_to includes {name}, which is not installed: "
                f"pip install 'preftune[{name}]'"
            )


def _read_ids(output_dir: Path) -> dict[str, str]:
    path = output_dir / IDS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_ids(output_dir: Path, ids: dict[str, str]) -> None:
    if ids:
        write_text_atomically(output_dir / IDS_FILE, json.dumps(ids, indent=2) + "\n")


class TensorBoardTracker:
    """Event files in ``output_dir/tensorboard``; a resumed run purges events after its step."""

    def __init__(self, output_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)

    def log(self, record: dict[str, float], step: int) -> None:
        for key, value in record.items():
            self.writer.add_scalar(key, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run in project ``$WANDB_PROJECT`` (default ``preftune``), named after
    ``output_dir``, holding the whole config. ``$WANDB_MODE=offline`` works without network."""

    def __init__(self, output_dir: Path, ids: dict[str, str], run_config: dict[str, Any]) -> None:
        self.wandb = importlib.import_module("wandb")
        self.run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", "preftune"),
            name=output_dir.resolve().name,
            id=ids.get("wandb"),
            resume="allow",
            config=run_config,
            dir=str(output_dir),
        )
        ids["wandb"] = self.run.id

    def log(self, record: dict[str, float], step: int) -> None:
        self.run.log(record, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    """An MLflow run (tracking URI from ``$MLFLOW_TRACKING_URI``, else ``./mlruns``) named after
    ``output_dir``, with the config as parameters."""

    def __init__(self, output_dir: Path, ids: dict[str, str], run_config: dict[str, Any]) -> None:
        self.mlflow = importlib.import_module("mlflow")
        run_id = ids.get("mlflow")
        if run_id:
            self.run = self.mlflow.start_run(run_id=run_id)
        else:
            self.run = self.mlflow.start_run(run_name=output_dir.resolve().name)
            # MLflow caps parameter values; long lists are cut, the full config is in the card.
            self.mlflow.log_params({key: str(value)[:500] for key, value in run_config.items()})
        ids["mlflow"] = self.run.info.run_id

    def log(self, record: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(record, step=step)

    def close(self) -> None:
        self.mlflow.end_run()
