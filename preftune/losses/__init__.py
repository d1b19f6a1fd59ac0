"""Pure loss functions on log-probability tensors, registered by name."""

from preftune.losses import paired as _paired  # noqa: F401  (registers the paired losses)
from preftune.losses.base import (
    PAIRED_LOSSES,
    LossOutput,
    LossParams,
    PairedLoss,
    PairLogps,
)

LOSS_NAMES = tuple(PAIRED_LOSSES)

__all__ = ["LOSS_NAMES", "PAIRED_LOSSES", "LossOutput", "LossParams", "PairLogps", "PairedLoss"]
