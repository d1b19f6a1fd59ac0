"""Data keys (``data.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.data.encode import Budget
from preftune.fields import check_fields, option


@dataclass
class DataSettings:
    train: str | None = option(
        None, "training data: .jsonl/.json/.parquet/.csv, a `datasets` dir, or hub name[:split]"
    )
    eval: str | None = option(None, "evaluation data, same forms as data.train (split: test)")
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

    def budget(self) -> Budget:
        """The length settings, as the encoders take them."""
        return Budget(
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            truncation=self.truncation,
        )
