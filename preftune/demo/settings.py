"""Keys of ``preftune demo``: every stage's size is a key, so the same command scales up."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from preftune.errors import ConfigError
from preftune.fields import check_fields, option

METHODS = ("dpo", "preferred-ft", "unlikelihood", "ppo", "ppo-gt", "rloo", "online-dpo")
"""The methods the demo can train from the SFT policy, in the order it trains them."""


@dataclass
class CorpusSettings:
    source: str = option(
        "builtin", "`builtin` (generated reviews) or a dataset with a text column, e.g. imdb"
    )
    size: int = option(4000, "reviews used for SFT", at_least=1)
    text_column: str = option("text", "column holding the review text (datasets only)")
    prompt_words: int = option(
        4, "words of a held-out review that make a prompt (datasets only)", at_least=1
    )

    def __post_init__(self) -> None:
        check_fields(self, "corpus")


@dataclass
class DemoModelSettings:
    path: str = option("tiny", "`tiny` (tokenizer learned from the corpus), a model dir or hub id")
    hidden_size: int | None = option(None, "tiny only: hidden size (null: 128)", at_least=1)
    num_layers: int | None = option(None, "tiny only: layers (null: 4)", at_least=1)
    num_heads: int | None = option(None, "tiny only: attention heads (null: 4)", at_least=1)
    dtype: str = option("auto", "compute dtype", ("auto", "float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        check_fields(self, "model")


@dataclass
class StageSFTSettings:
    steps: int = option(300, "SFT optimizer steps on the corpus", at_least=1)
    batch_size: int = option(32, "reviews per SFT step", at_least=1)
    learning_rate: float = option(3e-3, "SFT peak learning rate", above=0)

    def __post_init__(self) -> None:
        check_fields(self, "sft")


@dataclass
class PairsSettings:
    prompts: int = option(512, "prompts sampled to build preference pairs", at_least=1)
    # One completion per prompt has nothing to pair with.
    samples_per_prompt: int = option(
        4, "completions per prompt; any two with unequal rewards pair", at_least=2
    )
    # Both DPO's training and its held-out accuracy need pairs.
    eval_fraction: float = option(
        0.1, "share of prompts whose pairs are held out for accuracy", above=0, below=1
    )
    max_new_tokens: int = option(
        48, "longest completion sampled, in tokens (also for eval)", at_least=1
    )
    temperature: float = option(1.0, "sampling temperature (also for eval)", above=0)

    def __post_init__(self) -> None:
        check_fields(self, "pairs")


@dataclass
class StageDPOSettings:
    betas: list[float] = option([0.5, 1.0, 2.0, 3.0, 5.0], "β of each DPO policy trained", above=0)
    steps: int = option(150, "optimizer steps of each DPO and Preferred-FT run", at_least=1)
    batch_size: int = option(32, "pairs per step", at_least=1)
    learning_rate: float = option(2e-4, "DPO peak learning rate", above=0)
    preferred_ft_learning_rate: float = option(2e-4, "Preferred-FT peak learning rate", above=0)

    def __post_init__(self) -> None:
        check_fields(self, "dpo")


@dataclass
class StageRLSettings:
    kl_coefs: list[float] = option(
        [0.05, 0.2], "β_KL of each PPO and PPO-GT policy trained", at_least=0
    )
    steps: int = option(
        128,
        "optimizer steps of each PPO, PPO-GT and RLOO run (128: 2048 samples, as many as the "
        "pairs are drawn from)",
        at_least=1,
    )
    batch_size: int = option(32, "samples per step", at_least=1)
    rollout_size: int = option(64, "prompts per rollout", at_least=1)
    epochs: int = option(2, "passes over each rollout", at_least=1)
    learning_rate: float = option(1e-4, "PPO and RLOO peak learning rate", above=0)
    rloo_k: int = option(4, "RLOO samples per prompt", at_least=2)
    rloo_kl_coef: float = option(0.05, "β_KL of the RLOO policy", at_least=0)
    unlikelihood_alpha: float = option(
        1.0, "weight of the Unlikelihood term (its run has dpo.steps of dpo.batch_size)", at_least=0
    )

    def __post_init__(self) -> None:
        check_fields(self, "rl")


@dataclass
class StageOnlineSettings:
    betas: list[float] = option([1.0], "β of each online DPO policy trained", above=0)
    k: int = option(4, "completions sampled per prompt each round", at_least=2)
    prompts_per_round: int = option(
        64,
        "prompts sampled each round; the rounds sample as many completions in all as the "
        "offline pairs were drawn from, over dpo.steps steps of dpo.batch_size pairs",
        at_least=1,
    )

    def __post_init__(self) -> None:
        check_fields(self, "online")


@dataclass
class EvalSettings:
    prompts: int = option(512, "held-out prompts each policy is sampled on", at_least=1)
    samples_per_prompt: int = option(2, "completions per prompt", at_least=1)

    def __post_init__(self) -> None:
        check_fields(self, "eval")


@dataclass
class DemoConfig:
    # NumPy takes seeds below 2**32, and the demo adds small offsets (seed + 1 for sampling).
    seed: int = option(
        42,
        "seed for the corpus, models, sampling and data order",
        at_least=0,
        at_most=2**31 - 1,
    )
    output_dir: str = option("runs/demo", "where every stage, results.json and plots go")
    judge: str = option(
        "vader", "ground-truth reward: vader, or a reward model directory from `preftune rm`"
    )
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    model: DemoModelSettings = field(default_factory=DemoModelSettings)
    sft: StageSFTSettings = field(default_factory=StageSFTSettings)
    pairs: PairsSettings = field(default_factory=PairsSettings)
    dpo: StageDPOSettings = field(default_factory=StageDPOSettings)
    rl: StageRLSettings = field(default_factory=StageRLSettings)
    online: StageOnlineSettings = field(default_factory=StageOnlineSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    methods: list[str] = option(
        list(METHODS),
        "policies to train besides SFT: " + ", ".join(METHODS),
    )

    def __post_init__(self) -> None:
        check_fields(self)
        for method in self.methods:
            if method not in METHODS:
                near = difflib.get_close_matches(method, METHODS, n=1)
                hint = f"; did you mean {near[0]}?" if near else ""
                raise ConfigError(
                    f"methods: unknown method {method!r}{hint} (known: {', '.join(METHODS)})"
                )
