"""Keys of the objectives: the speed levers of the paired ones (``speed.*``) and their reference
(``reference.*``), KTO's (``kto.*``) and self-play's (``spin.*``), each checked when the config
is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from preftune.errors import ConfigError
from preftune.fields import check_fields, option

if TYPE_CHECKING:
    from preftune.losses.settings import LossSettings


@dataclass
class LayoutSettings:
    """How pairs are laid out and scored (the speed levers every paired objective takes)."""

    prefix_sharing: bool = option(
        True, "lay each pair out as prompt + chosen + rejected, computing the prompt once"
    )
    packing: bool = option(True, "pack the pairs of a micro-batch into rows, without padding")
    pack_length: int = option(
        0, "longest packed row in tokens (0: the longest pair's length)", at_least=0
    )
    attention: str = option(
        "documents",
        "how laid-out rows attend under sdpa: documents (a kernel call per document, no work on "
        "other documents' positions) or dense (one call per layer under the rows' full masks)",
        ("documents", "dense"),
    )
    logits_chunk: int | str = option(
        "auto",
        "the output layer on response positions only, N of them per chunk recomputed in "
        "backward (auto: chunked only when a micro-batch's logits would not fit in memory; "
        "0: logits of every position at once, the plain computation)",
        ("auto",),
        at_least=0,
    )

    def __post_init__(self) -> None:
        check_fields(self, "speed")


@dataclass
class SpeedSettings(LayoutSettings):
    """The layout levers and the reference cache, for objectives whose reference is fixed
    data-wide (online DPO has reference log-probs from its own sampling, and takes the layout
    levers alone)."""

    reference_cache: bool = option(
        True,
        "compute reference log-probs once before training, cache them on disk, free the reference",
    )
    cache_dir: str | None = option(
        None, "reference cache directory (null: $PREFTUNE_CACHE or ~/.cache/preftune)"
    )
    reference_batch_size: int = option(
        0,
        "pairs per forward when precomputing reference log-probs (0: 2 x micro-batch)",
        at_least=0,
    )


@dataclass
class KTOSettings:
    beta: float = option(
        0.1, "β: scale of the implicit reward β log π/π_ref and of the KL reference point", above=0
    )
    desirable_weight: float = option(
        1.0, "λ_D: weight of the loss of desirable completions", above=0
    )
    undesirable_weight: float = option(
        1.0, "λ_U: weight of the loss of undesirable completions", above=0
    )

    def __post_init__(self) -> None:
        check_fields(self, "kto")


@dataclass
class SPINSettings:
    iterations: int = option(
        3,
        "self-play iterations: each generates with the previous iterate, then trains it",
        at_least=1,
    )
    max_new_tokens: int | None = option(
        None,
        "longest generated completion in tokens (null: the room data.max_length leaves after "
        "the shortest prompt)",
        at_least=1,
    )
    do_sample: bool = option(True, "sample completions (true) or decode greedily (false)")
    temperature: float = option(
        1.0, "sampling temperature (greedy decoding: spin.do_sample=false)", above=0
    )
    top_p: float = option(
        1.0,
        "nucleus sampling: draw from the likeliest tokens holding this much probability",
        above=0,
        at_most=1,
    )
    batch_size: int = option(32, "prompts per generation batch on each process", at_least=1)

    def __post_init__(self) -> None:
        check_fields(self, "spin")
        for key, value in (("temperature", self.temperature), ("top_p", self.top_p)):
            if not self.do_sample and value != 1.0:
                raise ConfigError(f"spin.{key} has no effect with spin.do_sample=false")


@dataclass
class RolloutSettings:
    """What the policy-gradient commands share: how rollouts are cut and reused, the clip of
    the policy ratio, and the KL penalty toward the reference."""

    rollout_size: int = option(
        0,
        "prompts sampled per rollout (0: train.batch_size); each rollout is then trained on for "
        "`epochs` passes of train.batch_size samples per optimizer step",
        at_least=0,
    )
    epochs: int = option(4, "passes over each rollout, each in a new random order", at_least=1)
    clip: float = option(0.2, "ε: the policy ratio is clipped to [1 - ε, 1 + ε]", above=0)
    kl_coef: float = option(
        0.05, "β_KL: per-token penalty β_KL (log π - log π_ref) on the reward", at_least=0
    )
    kl_target: float | None = option(
        None,
        "adaptive β_KL: the KL per sequence to steer toward (null: β_KL stays fixed)",
        above=0,
    )
    kl_horizon: int = option(
        10000, "samples over which the adaptive β_KL moves by up to 20%", at_least=1
    )


@dataclass
class PPOSettings(RolloutSettings):
    gamma: float = option(1.0, "γ: discount of GAE", at_least=0, at_most=1)
    lam: float = option(0.95, "λ: GAE's trade-off of bias against variance", at_least=0, at_most=1)
    value_clip: float = option(
        0.2, "values move at most this far from the rollout's (0: no clip)", at_least=0
    )
    vf_coef: float = option(0.1, "weight of the value loss", at_least=0)
    entropy_coef: float = option(0.0, "weight of the entropy bonus", at_least=0)
    whiten_advantages: bool = option(True, "whiten the rollout's advantages")
    ptx_coef: float = option(
        0.0,
        "weight of the pretraining term: the next-token loss per token on data.ptx, mixed into "
        "every step (0: off)",
        at_least=0,
    )

    def __post_init__(self) -> None:
        check_fields(self, "ppo")


@dataclass
class RLOOSettings(RolloutSettings):
    k: int = option(
        4, "samples per prompt; each is baselined by the mean reward of the others", at_least=2
    )

    def __post_init__(self) -> None:
        check_fields(self, "rloo")


@dataclass
class UnlikelihoodSettings:
    alpha: float = option(
        1.0, "α: weight of the rejected tokens' unlikelihood −Σ log(1 − π)", at_least=0
    )

    def __post_init__(self) -> None:
        check_fields(self, "unlikelihood")


@dataclass
class OnlineSettings:
    k: int = option(4, "completions sampled per prompt, judged against each other", at_least=2)
    pairs: str = option(
        "best_worst",
        "pairs formed from a prompt's judged completions: best_worst (the best against the "
        "worst) | all (every two the judge does not tie, the preferred one chosen)",
        ("best_worst", "all"),
    )
    round_steps: int = option(
        1,
        "optimizer steps per round: each round samples from the policy as it then is, judges, "
        "and trains on the pairs for this many steps (1: fully online)",
        at_least=1,
    )
    prompts_per_round: int = option(
        0, "prompts sampled per round (0: train.batch_size x round_steps)", at_least=0
    )
    reference: str = option(
        "start",
        "the loss's reference: start (the starting policy) | round (the policy as each round "
        "began: iterative DPO)",
        ("start", "round"),
    )

    def __post_init__(self) -> None:
        check_fields(self, "online")


@dataclass
class ReferenceSettings:
    """The reference of the paired losses: the starting policy, or the model (or, under LoRA,
    the adapter) ``model`` names; with ``sync_every``, moved toward the policy as it trains
    (TR-DPO)."""

    model: str | None = option(
        None,
        "the reference: a model directory or hub id with the policy's tokenizer, or under LoRA "
        "an adapter directory (saved by save_pretrained) put on the policy's base in place of "
        "its adapters (null: the starting policy)",
    )
    sync_every: int = option(
        0,
        "TR-DPO: every this many optimizer steps the reference becomes "
        "α·policy + (1 − α)·reference, α being reference.sync_mix; the reference then changes, "
        "so its log-probs are computed as it is, each step (needs speed.reference_cache=false; "
        "0: never)",
        at_least=0,
    )
    sync_mix: float = option(
        0.6,
        "α of reference.sync_every, weight by weight (under LoRA: the adapters'): 1 copies the "
        "policy (a hard update), less mixes (a soft one)",
        above=0,
        at_most=1,
    )

    def __post_init__(self) -> None:
        check_fields(self, "reference")
        default = ReferenceSettings.__dataclass_fields__["sync_mix"].default
        if self.sync_every == 0 and self.sync_mix != default:
            raise ConfigError("reference.sync_mix has no effect without reference.sync_every")
        if self.model == "tiny":
            raise ConfigError(
                "reference.model=tiny: the tiny preset is built from the run's seed, so it is the "
                "starting policy, the reference already; leave reference.model unset"
            )

    def check_run(self, loss: LossSettings, speed: SpeedSettings, distributed: str) -> None:
        """Refuse, in one line, a reference that the rest of the run's config leaves without
        effect or cannot serve: one for a loss that uses none; TR-DPO's, which changes as the run
        trains, with log-probs cached before it (``speed.reference_cache``) or with sharded
        weights (``train.distributed=fsdp2``), which are not mixed whole."""
        if self.model is None and self.sync_every == 0:
            return
        key = "reference.sync_every" if self.sync_every else "reference.model"
        # The registry loads the losses, and torch: only once a reference key is set.
        from preftune.losses import combined_loss

        if loss.reference_free:
            raise ConfigError(f"{key} has no effect with loss.reference_free=true")
        if not combined_loss(loss.type, loss.weights).needs_reference:
            raise ConfigError(
                f"{key} has no effect with loss.type={', '.join(loss.type)}, which uses no "
                "reference"
            )
        if self.sync_every and speed.reference_cache:
            raise ConfigError(
                "reference.sync_every changes the reference as the run trains, so its log-probs "
                "cannot be cached before: set speed.reference_cache=false"
            )
        if self.sync_every and distributed == "fsdp2":
            raise ConfigError(
                "reference.sync_every does not run under train.distributed=fsdp2 yet (it mixes "
                "whole weights): use train.distributed=ddp"
            )
