"""Pure loss functions on log-probability tensors, registered by name.

Importing the package is cheap: the losses, and torch with them, load on first use of a name
exported here, so that a config's ``loss.*`` keys can be checked, and ``--help`` printed, in a
fraction of a second (the names alone: :mod:`preftune.losses.names`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from preftune.losses.names import LOSS_NAMES

if TYPE_CHECKING:
    from preftune.losses.base import (
        PAIRED_LOSSES,
        LossOutput,
        LossParams,
        PairedLoss,
        PairLogps,
    )
    from preftune.losses.combine import closest_loss_name, combined_loss

_EXPORTS = {
    "PAIRED_LOSSES": "preftune.losses.base",
    "LossOutput": "preftune.losses.base",
    "LossParams": "preftune.losses.base",
    "PairedLoss": "preftune.losses.base",
    "PairLogps": "preftune.losses.base",
    "closest_loss_name": "preftune.losses.combine",
    "combined_loss": "preftune.losses.combine",
}
# The modules whose losses register themselves in PAIRED_LOSSES as they are imported.
_REGISTERING = ("anchored", "paired", "reference_free", "transport")

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


def __getattr__(name: str) -> Any:
    """A name of the registry, its losses registered first (PEP 562: called for names the
    package does not hold yet)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for module in _REGISTERING:
        importlib.import_module(f"{__name__}.{module}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
