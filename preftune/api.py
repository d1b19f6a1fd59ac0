"""preftune from Python: :func:`train` runs a training command on a model and data held in
memory or named as on the command line, with the same keys and the same checks.

Importing this module (and ``preftune``) loads no torch: the command's libraries load when it
runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from preftune.commands import REGISTRY
from preftune.commands.configs import RunConfig
from preftune.config import build_config
from preftune.errors import ConfigError
from preftune.files import write_text_atomically

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Data = Union[str, os.PathLike[str], "datasets.Dataset", Iterable[Mapping[str, Any]]]
"""A dataset: a path or hub id as ``data.train`` takes it, a ``datasets.Dataset``, or rows."""
Model = Union[str, os.PathLike[str], "PreTrainedModel"]
"""A model: ``tiny``, a directory or a hub id as ``model.path`` takes it, or the model itself."""


def train(
    command: str,
    model: Model = "tiny",
    train: Data | None = None,
    eval: Data | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **overrides: Any,
) -> dict[str, float]:
    """Run the training command ``command`` (``dpo``, ``sft``, ``kto``, ``rm``, ``spin``,
    ``unlikelihood``, ``online``, ``ppo``, ``rloo``) and return its final metrics, as
    ``preftune <command>`` would with the same keys; the model is saved to ``output_dir``.

    ``train`` and ``eval`` are ``data.train`` and ``data.eval``: a path or hub id, a
    ``datasets.Dataset``, or rows (a list of dicts, as a JSONL file would hold them). Rows in
    memory are written once to ``$PREFTUNE_CACHE/rows`` (default ``~/.cache/preftune``) under a
    name their content decides, so the same rows make the same config, and a run started again
    resumes from its checkpoints.

    ``model`` is ``model.path``, or a ``transformers`` model object, which needs ``tokenizer``:
    the two are saved to a temporary directory that the run loads from, and which is removed
    after it. That costs a write and a read of the whole model (disk space and seconds per GB),
    and a run from an object does not resume: its ``model.path`` differs each time.

    Other keys are keyword arguments by their dotted names, as on the command line:
    ``output_dir="runs/x"``, or ``**{"train.max_steps": 10, "loss.beta": 0.1}``. Values are
    taken as given, not read as YAML text, and checked as the command line checks its values:
    ``**{"train.learning_rate": "1e-5"}`` is refused in one line (a :class:`ConfigError`), as
    is an unknown key, before any model loads.

    Progress and each run's summary go to the ``preftune`` logger
    (``logging.basicConfig(level=logging.INFO)`` shows them); as on the command line,
    transformers', datasets' and the hub's own progress bars and info messages are silenced for
    the rest of the process unless ``log.verbose`` is true.

    Example (the tiny preset on three pairs, on a CPU, in seconds)::

        from preftune.api import train

        rows = [
            {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
            {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome"},
            {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."},
        ]
        metrics = train(
            "dpo",
            model="tiny",
            train=rows,
            output_dir="runs/api-demo",
            **{"train.max_steps": 2, "train.batch_size": 3, "loss.beta": 0.1},
        )
        print(metrics["loss"])
    """
    config_class = _training_config(command)
    values = dict(overrides)
    with tempfile.TemporaryDirectory(prefix="preftune-model-") as scratch:
        given = {
            "model.path": _model_path(model, tokenizer, Path(scratch)),
            "data.train": None if train is None else _data_path(train, "train"),
            "data.eval": None if eval is None else _data_path(eval, "eval"),
        }
        for key, value in given.items():
            if value is None:
                continue
            if key in values:
                raise ConfigError(f"{key} is given twice: as {key.split('.')[-1]}= and as a key")
            values[key] = value
        config = build_config(config_class, values)
        from preftune.commands.common import use_log_settings

        use_log_settings(config.log)  # as on the command line (log.verbose keeps others' bars)
        result = REGISTRY[command].run(config)
    # spin: one record per iteration; its model is the last iteration's.
    last = result[-1] if isinstance(result, list) else result
    return {key: value for key, value in last.items() if key != "iteration"}


def _training_config(command: str) -> type[RunConfig]:
    """The config class of training command ``command``: one that adds keys to a run's (``data
    check`` and ``export`` take a run's keys alone, and are no training)."""
    trainers = {
        name: entry.config
        for name, entry in REGISTRY.items()
        if issubclass(entry.config, RunConfig) and entry.config is not RunConfig
    }
    if command not in trainers:
        raise ConfigError(
            f"preftune.api.train runs a training command ({', '.join(trainers)}), not {command!r}"
        )
    return trainers[command]


def _model_path(model: Model, tokenizer: PreTrainedTokenizerBase | None, scratch: Path) -> str:
    """``model`` as ``model.path``: a path as it is; a model object saved with its tokenizer to
    ``scratch``."""
    if isinstance(model, str | os.PathLike):
        if tokenizer is not None:
            raise ConfigError(
                "tokenizer= goes with a model object: a model path loads its own tokenizer"
            )
        return str(model)
    if tokenizer is None:
        raise ConfigError(
            "a model object needs its tokenizer: tokenizer=..., saved with it for the run"
        )
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    return str(scratch)


def _data_path(data: Data, name: str) -> str:
    """``data`` as a ``data.*`` value: a path as it is; rows (a ``datasets.Dataset`` iterates as
    rows) written as JSONL under the rows cache, named by their content."""
    if isinstance(data, str | os.PathLike):
        return str(data)
    if isinstance(data, Mapping):
        raise ConfigError(f"{name}= takes a path, a datasets.Dataset or a list of rows, not a dict")
    lines = []
    for number, row in enumerate(data, start=1):
        try:
            lines.append(json.dumps(dict(row), ensure_ascii=False) + "\n")
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{name}=: row {number} cannot be written as JSON: {error}") from None
    if not lines:
        raise ConfigError(f"{name}= holds no rows")
    from preftune.models.refcache import cache_root  # with torch, which the run loads next

    text = "".join(lines)
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    path = cache_root(None).parent / "rows" / f"{digest}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, text)
    return str(path)
