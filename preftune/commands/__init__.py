"""The commands of ``preftune``, registered in :data:`REGISTRY` by name, one-line summary, and
where their config class and runner live.

Registering a command imports nothing: its config class loads when the command line needs its
keys (for ``--help`` or to build a config; the configs import no torch, see
:mod:`preftune.commands.configs`) and its runner, with the libraries it needs, only when the
command runs. ``preftune --help`` so takes a fraction of a second.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    """A command of the command line: its name, what it does in one line, and where the config
    class whose keys it takes and the function that runs it on such a config are, each as
    ``module:name`` (loaded on first use)."""

    name: str
    summary: str
    config_path: str
    runner_path: str

    @property
    def config(self) -> type:
        """The config class, imported."""
        return _load(self.config_path)

    @property
    def run(self) -> Callable[..., Any]:
        """The runner, imported with its command module. A training command's runner takes the
        config alone; data check's also the paths and kind, export's two directories."""
        return _load(self.runner_path)


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_CONFIGS = "preftune.commands.configs"
REGISTRY: dict[str, Command] = {
    command.name: command
    for command in (
        Command(
            "dpo",
            "align a model to preference pairs (DPO, IPO, SLiC, …)",
            f"{_CONFIGS}:DPOConfig",
            "preftune.commands.dpo:run_dpo",
        ),
        Command(
            "sft",
            "supervised fine-tuning on prompt/completion or messages rows",
            f"{_CONFIGS}:SFTConfig",
            "preftune.commands.sft:run_sft",
        ),
        Command(
            "unlikelihood",
            "the DPO paper's Unlikelihood baseline: raise the preferred response, push down each "
            "token of the other",
            f"{_CONFIGS}:UnlikelihoodConfig",
            "preftune.commands.unlikelihood:run_unlikelihood",
        ),
        Command(
            "kto",
            "align a model to completions judged desirable or not (KTO)",
            f"{_CONFIGS}:KTOConfig",
            "preftune.commands.kto:run_kto",
        ),
        Command(
            "spin",
            "self-play fine-tuning: SFT data against the model's own completions",
            f"{_CONFIGS}:SPINConfig",
            "preftune.commands.spin:run_spin",
        ),
        Command(
            "rm",
            "train a reward model on pairs (Bradley–Terry) or rankings (Plackett–Luce)",
            f"{_CONFIGS}:RMConfig",
            "preftune.commands.rm:run_rm",
        ),
        Command(
            "ppo",
            "RLHF: optimise the policy against a reward with PPO, KL-penalised toward the start",
            f"{_CONFIGS}:PPOConfig",
            "preftune.commands.rl:run_ppo",
        ),
        Command(
            "rloo",
            "optimise the policy against a reward with REINFORCE leave-one-out (k samples a "
            "prompt)",
            f"{_CONFIGS}:RLOOConfig",
            "preftune.commands.rl:run_rloo",
        ),
        Command(
            "online",
            "online DPO: sample pairs from the policy as it trains, judged by a reward model, a "
            "function or a language model, and train on them with a paired loss",
            f"{_CONFIGS}:OnlineConfig",
            "preftune.commands.online:run_online",
        ),
        Command(
            "label",
            "offline RLAIF: sample completions of prompts, judge them, and write preference pairs "
            "with the judge's probabilities (or ranked rows)",
            f"{_CONFIGS}:LabelConfig",
            "preftune.commands.label:run_label",
        ),
        Command(
            "score",
            "score prompt/completion rows or pairs with a trained reward model",
            f"{_CONFIGS}:ScoreConfig",
            "preftune.commands.score:run_score",
        ),
        Command(
            "eval",
            "win rate of a policy against a baseline (the data's responses or another model) on "
            "held-out prompts under a judge, with its 95% interval and a length-controlled rate",
            f"{_CONFIGS}:EvalConfig",
            "preftune.commands.evaluate:run_eval",
        ),
        Command(
            "demo",
            "the DPO paper's controlled-sentiment experiment, offline, in minutes",
            "preftune.demo.settings:DemoConfig",
            "preftune.commands.demo:run_demo",
        ),
        Command(
            "data check",
            "read datasets exactly as training would: every bad row, token lengths, duplicates",
            f"{_CONFIGS}:RunConfig",
            "preftune.commands.data_check:run_data_check",
        ),
        Command(
            "export",
            "write a checkpoint as a model directory (LoRA adapters merged, shards gathered)",
            f"{_CONFIGS}:RunConfig",
            "preftune.commands.export:run_export",
        ),
    )
}
TRAINING = ("dpo", "kto", "spin", "rm", "sft")
"""Commands whose config has the model.* and data.* keys, most general first."""
