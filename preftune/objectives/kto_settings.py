"""KTO keys (``kto.*``), checked when the config is built."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.fields import check_fields, option


@dataclass
class KTOSettings:
    beta: float = option(
        0.1, "β: scale of the implicit reward β log π/π_ref and of the KL reference point", above=0
    )
    desirable_weight: float = option(
        1.0, "λ_D: weight of the loss of desirable completions", above=0
    )
    undesirable_weight: float = option(
        1.0, "λ_U: weight of the loss of undesirable completions", above=0
    )

    def __post_init__(self) -> None:
        check_fields(self, "kto")
