"""Self-play keys (``spin.*``) of ``preftune spin``."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.errors import ConfigError
from preftune.fields import option


@dataclass
class SPINSettings:
    iterations: int = option(
        3, "self-play iterations: each generates with the previous iterate, then trains it"
    )
    max_new_tokens: int | None = option(
        None,
        "longest generated completion in tokens (null: the room data.max_length leaves after "
        "the shortest prompt)",
    )
    do_sample: bool = option(True, "sample completions (true) or decode greedily (false)")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(
        1.0, "nucleus sampling: draw from the likeliest tokens holding this much probability"
    )
    batch_size: int = option(32, "prompts per generation batch on each process")

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"spin.iterations must be at least 1, got {self.iterations}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"spin.max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"spin.batch_size must be at least 1, got {self.batch_size}")
        if self.temperature <= 0:
            raise ConfigError("spin.temperature must be positive (spin.do_sample=false is greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"spin.top_p must be in (0, 1], got {self.top_p}")
        for key, value in (("temperature", self.temperature), ("top_p", self.top_p)):
            if not self.do_sample and value != 1.0:
                raise ConfigError(f"spin.{key} has no effect with spin.do_sample=false")
