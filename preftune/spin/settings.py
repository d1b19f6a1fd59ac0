"""Self-play keys (``spin.*``) of ``preftune spin``."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.errors import ConfigError
from preftune.fields import check_fields, option


@dataclass
class SPINSettings:
    iterations: int = option(
        3,
        "self-play iterations: each generates with the previous iterate, then trains it",
        at_least=1,
    )
    max_new_tokens: int | None = option(
        None,
        "longest generated completion in tokens (null: the room data.max_length leaves after "
        "the shortest prompt)",
        at_least=1,
    )
    do_sample: bool = option(True, "sample completions (true) or decode greedily (false)")
    temperature: float = option(
        1.0, "sampling temperature (greedy decoding: spin.do_sample=false)", above=0
    )
    top_p: float = option(
        1.0,
        "nucleus sampling: draw from the likeliest tokens holding this much probability",
        above=0,
        at_most=1,
    )
    batch_size: int = option(32, "prompts per generation batch on each process", at_least=1)

    def __post_init__(self) -> None:
        check_fields(self, "spin")
        for key, value in (("temperature", self.temperature), ("top_p", self.top_p)):
            if not self.do_sample and value != 1.0:
                raise ConfigError(f"spin.{key} has no effect with spin.do_sample=false")
