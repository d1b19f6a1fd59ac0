"""Keys of rollouts: how completions are sampled (``generation.*``), scored (``reward.*``) and
judged against each other (``judge.*``; the judges: :mod:`preftune.train.judges`)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from preftune.errors import ConfigError
from preftune.fields import check_fields, option


@dataclass
class GenerationSettings:
    max_new_tokens: int = option(64, "longest sampled response in tokens", at_least=1)
    temperature: float = option(1.0, "sampling temperature", above=0)
    top_p: float = option(
        1.0,
        "nucleus sampling: draw from the likeliest tokens holding this much probability",
        above=0,
        at_most=1,
    )
    batch_size: int = option(
        16, "prompts per generation batch (a batch is the unit of work a process takes)", at_least=1
    )
    backend: str = option(
        "hf",
        "hf (transformers' generate on the policy) or vllm (an engine on the GPU holding a copy "
        "of the policy, given its weights before each rollout; one process)",
        ("hf", "vllm"),
    )
    vllm_memory: float = option(
        0.3,
        "generation.backend=vllm: the share of the GPU's memory the engine takes for its copy "
        "of the weights and its KV cache (the rest is training's)",
        above=0,
        at_most=1,
    )

    def __post_init__(self) -> None:
        check_fields(self, "generation")


@dataclass
class RewardSettings:
    model: str | None = option(
        None, "a reward model directory written by `preftune rm`; or set reward.function"
    )
    function: str | None = option(
        None, "module:callable taking (prompt, completion) texts and returning a float"
    )
    missing_eos_penalty: float = option(
        0.0, "subtracted from the reward of a response that does not end (no EOS)", at_least=0
    )
    whiten: bool = option(False, "whiten each rollout's rewards (mean 0, variance 1)")
    clip: float = option(
        0.0, "clip rewards to [-clip, clip] after whitening (0: no clip)", at_least=0
    )

    def __post_init__(self) -> None:
        check_fields(self, "reward")

    def check(self) -> None:
        """Exactly one source of rewards, checked when a run starts."""
        if (self.model is None) == (self.function is None):
            raise ConfigError(
                "set exactly one of reward.model (a `preftune rm` directory) and reward.function "
                "(module:callable)"
            )


JUDGE_KINDS = ("rm", "function", "llm")


@dataclass
class JudgeSettings:
    spec: str | None = option(
        None, "rm:DIR (a `preftune rm` model) | function:module:callable | llm:MODEL"
    )
    template: str | None = option(
        None,
        "llm judges: the pairwise template (a file, or the text itself) with {prompt}, {a} and "
        "{b}, after which the next token is read as A or B (null: a built-in one)",
    )
    batch_size: int = option(8, "pairs (or completions) judged per forward pass", at_least=1)
    max_length: int = option(
        1024, "llm judges: longest rendered comparison in tokens (the start is cut)", at_least=8
    )

    def __post_init__(self) -> None:
        check_fields(self, "judge")
        if self.spec:
            check_judge_spec(self.spec)
            if self.template is not None and not self.spec.startswith("llm:"):
                raise ConfigError(
                    f"judge.template is read by llm judges only, not by judge.spec={self.spec}: "
                    "unset it"
                )


def check_judge_spec(spec: str) -> None:
    """Refuse a ``judge.spec`` of no known kind, or naming nothing, in one line: when the config
    is built, before any model loads."""
    kind, _, target = spec.partition(":")
    if kind not in JUDGE_KINDS or not target:
        near = difflib.get_close_matches(kind, JUDGE_KINDS, n=1)
        hint = f" (did you mean {near[0]}:…?)" if near and kind not in JUDGE_KINDS else ""
        raise ConfigError(
            f"judge.spec={spec!r}: expected rm:DIR, function:module:callable or llm:MODEL{hint}"
        )
