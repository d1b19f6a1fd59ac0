"""Keys of the objectives: the speed levers of the paired ones (``speed.*``), KTO's (``kto.*``)
and self-play's (``spin.*``), each checked when the config is built."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.errors import ConfigError
from preftune.fields import check_fields, option


@dataclass
class SpeedSettings:
    reference_cache: bool = option(
        True,
        "compute reference log-probs once before training, cache them on disk, free the reference",
    )
    cache_dir: str | None = option(
        None, "reference cache directory (null: $PREFTUNE_CACHE or ~/.cache/preftune)"
    )
    reference_batch_size: int = option(
        0,
        "pairs per forward when precomputing reference log-probs (0: 2 x micro-batch)",
        at_least=0,
    )
    prefix_sharing: bool = option(
        True, "lay each pair out as prompt + chosen + rejected, computing the prompt once"
    )
    packing: bool = option(True, "pack the pairs of a micro-batch into rows, without padding")
    pack_length: int = option(
        0, "longest packed row in tokens (0: the longest pair's length)", at_least=0
    )
    logits_chunk: int = option(
        1024,
        "response positions per chunk through the output layer, recomputed in backward "
        "(0: logits of every position at once)",
        at_least=0,
    )

    def __post_init__(self) -> None:
        check_fields(self, "speed")


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
