"""Loss keys (``loss.*``) of the paired objectives."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.fields import option
from preftune.losses import LOSS_NAMES


@dataclass
class LossConfig:
    type: str = option("sigmoid", "paired loss (see the README's loss table)", LOSS_NAMES)
    beta: float = option(0.1, "β: strength of the KL constraint to the reference")
    label_smoothing: float = option(0.0, "sigmoid only: assumed label-flip rate ε (cDPO)")
    reference_free: bool = option(False, "use a uniform reference (no reference model is built)")
    sft_weight: float = option(0.0, "weight of the NLL of chosen responses added to the loss (RPO)")
