"""Pure loss functions on log-probability tensors, registered by name."""

from preftune.losses import anchored, paired, reference_free, transport  # noqa: F401  (registry)
from preftune.losses.base import (
    PAIRED_LOSSES,
    LossOutput,
    LossParams,
    PairedLoss,
    PairLogps,
)
from preftune.losses.combine import closest_loss_name, combined_loss

LOSS_NAMES = tuple(sorted(PAIRED_LOSSES))

__all__ = [
    "LOSS_NAMES",
    "PAIRED_LOSSES",
    "LossOutput",
    "LossParams",
    "PairLogps",
    "PairedLoss",
    "closest_loss_name",
    "combined_loss",
]
