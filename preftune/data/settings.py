"""Data keys (``data.*``)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

from preftune.data.rows import DEMO_FIELDS, PAIR_FIELDS, UNPAIRED_FIELDS
from preftune.data.sources import OPTIONAL_FIELDS, missing
from preftune.errors import ConfigError
from preftune.fields import check_fields, option

if TYPE_CHECKING:
    from preftune.data.encode import Budget

LAYOUT_FIELDS = (*PAIR_FIELDS.values(), *DEMO_FIELDS.values(), *UNPAIRED_FIELDS.values())
FIELDS = (*dict.fromkeys(chain.from_iterable(LAYOUT_FIELDS)), *OPTIONAL_FIELDS)
"""Every field preftune reads from a row: what ``data.columns`` may map."""


@dataclass
class DataSettings:
    train: str | list[str] | None = option(
        None,
        "training data: .jsonl/.json/.parquet/.csv, a `datasets` dir, or hub name[:split]; a "
        "list of these: the sources concatenated, or mixed as data.weights says",
    )
    eval: str | list[str] | None = option(
        None, "evaluation data, same forms as data.train (split: test); a list: concatenated"
    )
    weights: list[float] | None = option(
        None,
        "with data.train a list, one per source: its share of a mixture of as many examples as "
        "the sources hold together (e.g. [3, 1]: three quarters from the first), filled by "
        "repeating the source whole, then a random subset, the whole shuffled by seed (null: "
        "the sources concatenated)",
        above=0,
    )
    columns: dict[str, str] | None = option(
        None,
        "the column holding each preftune field, in every source the command reads, e.g. "
        "{prompt: question, chosen: response_j, rejected: response_k} (data.columns.prompt="
        "question sets one); other columns keep their names (null: none renamed)",
    )
    max_length: int = option(
        512, "longest prompt+response in tokens; longer responses are cut", at_least=1
    )
    max_prompt_length: int | None = option(
        256, "longest prompt in tokens (null: no limit)", at_least=0
    )
    truncation: str = option(
        "keep_end", "which part of a long prompt to keep", ("keep_end", "keep_start")
    )
    on_error: str = option(
        "raise",
        "a malformed row stops the run (raise) or is left out, counted and reported (skip)",
        ("raise", "skip"),
    )
    num_proc: int = option(
        1,
        "processes that tokenize a dataset large enough to be cached (1: the main process alone)",
        at_least=1,
    )

    def __post_init__(self) -> None:
        check_fields(self, "data")
        self._check_weights()
        self._check_columns()
        self._check_lengths()
        for key in ("train", "eval"):
            check_sources_exist(f"data.{key}", getattr(self, key))

    def budget(self) -> Budget:
        """The length settings, as the encoders take them."""
        from preftune.data.encode import Budget  # the encoders load transformers

        return Budget(
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            truncation=self.truncation,
        )

    def _check_weights(self) -> None:
        """Weights weigh the sources of a ``data.train`` list, one each (their sign and
        finiteness are the field's range)."""
        if self.weights is None:
            return
        if not isinstance(self.train, list):
            raise ConfigError(
                "data.weights weighs the sources of a list: give data.train as one, e.g. "
                "data.train=[a.jsonl,b.jsonl] data.weights=[3,1]"
            )
        if len(self.weights) != len(self.train):
            raise ConfigError(
                f"data.weights has {len(self.weights)} for {len(self.train)} data.train sources: "
                "give one weight per source"
            )

    def _check_lengths(self) -> None:
        """A prompt cut to ``max_prompt_length`` must leave a response room within
        ``max_length``: else every long prompt's row is dropped, after the model has loaded."""
        prompt, total = self.max_prompt_length, self.max_length
        if prompt is not None and prompt >= total:
            raise ConfigError(
                f"data.max_prompt_length={prompt} leaves no room for a response within "
                f"data.max_length={total}: set it below (e.g. data.max_prompt_length={total // 2})"
                " or raise data.max_length"
            )

    def _check_columns(self) -> None:
        """Each key a field preftune reads (the nearest one named when not, and a mapping
        written the wrong way round recognised), each value a column name."""
        for field, column in (self.columns or {}).items():
            if field in FIELDS:
                if not column:
                    raise ConfigError(f"data.columns.{field} names no column")
                continue
            if column in FIELDS:
                raise ConfigError(
                    f"data.columns maps preftune's fields to the file's columns: write "
                    f"{{{column}: {field}}}, not {{{field}: {column}}}"
                )
            close = difflib.get_close_matches(field, FIELDS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"fields: {', '.join(FIELDS)}"
            raise ConfigError(f"data.columns: unknown field '{field}'; {hint}")


def check_sources_exist(key: str, value: str | list[str] | None) -> None:
    """Refuse a local file or directory ``key`` names that is not there, when the config is
    built rather than once a model has loaded; hub ids are left to the reader."""
    for spec in [value] if isinstance(value, str) else value or []:
        if missing(spec):
            raise ConfigError(f"{key}: {spec}: no such file or directory")
