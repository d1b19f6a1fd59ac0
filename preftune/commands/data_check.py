"""``preftune data check``: read datasets exactly as training would, and report on them."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from preftune.commands import Command
from preftune.commands.common import model_spec
from preftune.commands.configs import RunConfig
from preftune.config import given_keys, load_config
from preftune.data.check import check_dataset
from preftune.data.mixture import source_list
from preftune.errors import ConfigError
from preftune.models.load import load_tokenizer


def run_data_check(cfg: RunConfig, specs: Sequence[str], kind: str) -> int:
    """Read each dataset as training would (``specs``, else every source of ``data.train`` and
    ``data.eval``), its columns renamed as ``data.columns`` says, print a summary of each on
    stdout and each problem as one line on stderr. Returns the exit status: 0 when no problem
    was found, 1 otherwise."""
    sources = [(spec, "train") for spec in specs]
    if not sources:
        sources = [(spec, "train") for spec in source_list(cfg.data.train)]
        sources += [(spec, "test") for spec in source_list(cfg.data.eval)]
    if not sources:
        raise ConfigError("nothing to check: name a dataset, or set data.train")
    budget = cfg.data.budget()
    tokenizer = load_tokenizer(model_spec(cfg))
    found = 0
    for spec, split in sources:
        result = check_dataset(spec, split, kind, tokenizer, budget, cfg.data.columns)
        if result.summary:
            print("\n".join(result.summary), flush=True)
        for problem in result.problems:
            print(f"preftune: error: {problem}", file=sys.stderr, flush=True)
        found += len(result.problems)
    return 1 if found else 0


def training_config(
    path: str | None, overrides: list[str], commands: Sequence[Command]
) -> RunConfig:
    """The config of the first of ``commands`` whose sections hold every key given: ``data
    check`` takes the same --config file as any training command and reads its model.* and
    data.* keys. Keys no command knows are reported against the first command's config."""
    sections = {key.split(".")[0] for key in given_keys(path, overrides)}
    for command in commands:
        if sections <= {f.name for f in dataclasses.fields(command.config)}:
            return load_config(command.config, path, overrides)
    return load_config(commands[0].config, path, overrides)
