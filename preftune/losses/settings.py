"""Loss keys (``loss.*``) of the paired objectives, checked when the config is built."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from preftune.errors import ConfigError
from preftune.fields import check_fields, option
from preftune.losses.names import ALIASES, LOSS_NAMES, NOT_PAIRED, canonical

if TYPE_CHECKING:
    from preftune.losses import PairedLoss


@dataclass
class LossSettings:
    type: list[str] = option(
        ["sigmoid"],
        f"paired loss, or a list of them to add up: {', '.join(LOSS_NAMES)} (also "
        f"{', '.join(f'{alias}: {name}' for alias, name in ALIASES.items())})",
    )
    # A negative weight would maximize its loss.
    weights: list[float] = option([], "weight of each loss in loss.type ([]: 1 each)", at_least=0)
    beta: float = option(
        0.1,
        "β: strength of the KL constraint to the reference (orpo: weight λ of the odds ratio)",
        above=0,
    )
    label_smoothing: float = option(
        0.0,
        "assumed label-flip rate ε for sigmoid (cDPO), robust, exo_pair (0: its 1e-3), aot and "
        "aot_pair",
        at_least=0,
        below=0.5,
    )
    soft_labels: bool = option(
        False,
        "each pair's ε = 1 − its chosen_probability column (a judge's P(chosen ≻ rejected), "
        "e.g. written by `preftune label`) in place of loss.label_smoothing",
    )
    reference_free: bool = option(False, "use a uniform reference (no reference model is built)")
    sft_weight: float = option(
        0.0,
        "weight of the NLL of chosen responses added to the loss (RPO; same as adding sft)",
        at_least=0,
    )
    simpo_gamma: float = option(
        0.5, "simpo: target reward margin γ (the paper's γ, not γ/β)", at_least=0
    )
    discopop_tau: float = option(
        0.05, "discopop: temperature τ of the log-ratio modulation", above=0
    )

    def __post_init__(self) -> None:
        check_fields(self, "loss")
        self.type = [canonical(name) for name in self.type]
        for name in self.type:
            _check_name(name)
        # The registry loads the losses, and torch: only once the names are known to be right.
        from preftune.losses import combined_loss

        try:
            spec = combined_loss(self.type, self.weights)
        except ValueError as error:
            raise ConfigError(f"loss.type, loss.weights: {error}") from None
        named = self.type[0] if len(self.type) == 1 else f"[{', '.join(self.type)}]"
        if self.label_smoothing and not spec.uses_label_smoothing:
            raise ConfigError(f"loss.label_smoothing has no effect with loss.type={named}")
        if self.soft_labels:
            self._check_soft_labels(spec, named)
        if self.reference_free and not spec.needs_reference:
            raise ConfigError(
                f"loss.reference_free has no effect with loss.type={named}, which uses no reference"
            )
        # A parameter of one loss, set away from its default while that loss is not used, would
        # do nothing: say so instead.
        for key, owner in (("simpo_gamma", "simpo"), ("discopop_tau", "discopop")):
            default = LossSettings.__dataclass_fields__[key].default
            if getattr(self, key) != default and owner not in self.type:
                raise ConfigError(f"loss.{key} has no effect with loss.type={named}")

    def _check_soft_labels(self, spec: PairedLoss, named: str) -> None:
        """Soft labels are each pair's own label smoothing: refused where that has no meaning."""
        from preftune.losses import PAIRED_LOSSES

        takers = ", ".join(name for name in LOSS_NAMES if PAIRED_LOSSES[name].soft_labels)
        if self.label_smoothing:
            raise ConfigError(
                "loss.soft_labels and loss.label_smoothing both set ε: soft labels take each "
                "pair's from its chosen_probability; unset loss.label_smoothing"
            )
        if not spec.uses_label_smoothing:
            raise ConfigError(
                f"loss.soft_labels has no effect with loss.type={named}, which uses no label "
                f"smoothing: use {takers}"
            )
        if not spec.soft_labels:
            quantiles = [
                name
                for name in self.type
                if PAIRED_LOSSES[name].uses_label_smoothing and not PAIRED_LOSSES[name].soft_labels
            ]
            raise ConfigError(
                f"loss.soft_labels: {', '.join(quantiles)} compares sorted quantiles of the batch, "
                f"not pairs, so a pair's own ε has nothing to apply to: use {takers}"
            )


def _check_name(name: str) -> None:
    """Refuse a name that is no paired loss, with where to go instead or the nearest name."""
    if name in LOSS_NAMES:
        return
    if name in NOT_PAIRED:
        raise ConfigError(f"loss.type={name}: {NOT_PAIRED[name]}")
    close = difflib.get_close_matches(name, [*LOSS_NAMES, *ALIASES], n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"loss.type: '{name}' is not one of {', '.join(LOSS_NAMES)}{hint}")
