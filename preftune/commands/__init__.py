"""The commands of ``preftune``: one module each, exporting its :class:`Command` (name,
one-line summary, config class, runner) into :data:`REGISTRY`, which the command line reads."""

from __future__ import annotations

from preftune.commands import (
    data_check,
    demo,
    dpo,
    evaluate,
    kto,
    label,
    online,
    rl,
    rm,
    score,
    sft,
    spin,
    unlikelihood,
)
from preftune.commands.common import Command

REGISTRY: dict[str, Command] = {
    command.name: command
    for command in (
        dpo.COMMAND,
        sft.COMMAND,
        unlikelihood.COMMAND,
        kto.COMMAND,
        spin.COMMAND,
        rm.COMMAND,
        rl.PPO,
        rl.RLOO,
        online.COMMAND,
        label.COMMAND,
        score.COMMAND,
        evaluate.COMMAND,
        demo.COMMAND,
        data_check.COMMAND,
    )
}
TRAINING = ("dpo", "kto", "spin", "rm", "sft")
"""Commands whose config has the model.* and data.* keys, most general first."""
