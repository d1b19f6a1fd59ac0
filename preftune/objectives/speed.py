"""Speed and memory keys (``speed.*``): every lever is exact, so all are on by default."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.fields import option


@dataclass
class SpeedConfig:
    reference_cache: bool = option(
        True,
        "compute reference log-probs once before training, cache them on disk, free the reference",
    )
    cache_dir: str | None = option(
        None, "reference cache directory (null: $PREFTUNE_CACHE or ~/.cache/preftune)"
    )
    reference_batch_size: int = option(
        0, "pairs per forward when precomputing reference log-probs (0: 2 x micro-batch)"
    )
    prefix_sharing: bool = option(
        True, "lay each pair out as prompt + chosen + rejected, computing the prompt once"
    )
    packing: bool = option(True, "pack the pairs of a micro-batch into rows, without padding")
    pack_length: int = option(0, "longest packed row in tokens (0: the longest pair's length)")
    logits_chunk: int = option(
        1024,
        "response positions per chunk through the output layer, recomputed in backward "
        "(0: logits of every position at once)",
    )
