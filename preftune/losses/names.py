"""The names of the paired losses, and the other names users bring for them, readable without
loading the losses themselves (and torch): the config checks ``loss.type``, and ``--help`` lists
the names, from here. Each loss registers its own name as it is defined
(:func:`~preftune.losses.base.paired_loss`); a test keeps the two lists equal."""

from __future__ import annotations

LOSS_NAMES = (
    "aot",
    "aot_pair",
    "apo_down",
    "apo_zero",
    "bco_pair",
    "cpo",
    "discopop",
    "exo_pair",
    "hinge",
    "ipo",
    "nca_pair",
    "orpo",
    "robust",
    "sft",
    "sigmoid",
    "sigmoid_norm",
    "simpo",
    "sppo_hard",
)

ALIASES = {
    "dpo": "sigmoid",
    "slic": "hinge",
    # TRL's name since it renamed its aot_pair (the unpaired AOT, preftune's aot_pair).
    "aot_unpaired": "aot_pair",
}
"""Other names of a loss, each for the same formula: accepted in ``loss.type`` and recorded as
the loss's own name. TRL's other ``loss_type`` names are preftune's too."""

NOT_PAIRED = {
    "kto_pair": "KTO is a command of its own, not a paired loss: preftune kto (it reads pairs "
    "too, as one desirable and one undesirable completion)",
}
"""Names of losses users look for in ``loss.type`` that are not paired losses, and where to go."""


def canonical(name: str) -> str:
    """``name`` as the loss registry knows it: an alias's loss, any other name as it is."""
    return ALIASES.get(name, name)
