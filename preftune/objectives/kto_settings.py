"""KTO keys (``kto.*``), checked when the config is built."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.errors import ConfigError
from preftune.fields import option


@dataclass
class KTOSettings:
    beta: float = option(
        0.1, "β: scale of the implicit reward β log π/π_ref and of the KL reference point"
    )
    desirable_weight: float = option(1.0, "λ_D: weight of the loss of desirable completions")
    undesirable_weight: float = option(1.0, "λ_U: weight of the loss of undesirable completions")

    def __post_init__(self) -> None:
        for key in ("beta", "desirable_weight", "undesirable_weight"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"kto.{key} must be positive, got {getattr(self, key)}")
