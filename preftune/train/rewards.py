"""Where a rollout's rewards come from: a reward model trained by ``preftune rm``, or a Python
function of the prompt and completion texts."""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Callable

import torch

from preftune.errors import ConfigError, PreftuneError
from preftune.train.rollout_settings import RewardSettings

Reward = Callable[[list[str], list[str]], list[float]]
"""Prompts and completions in, one reward per completion out."""


def load_reward(settings: RewardSettings, device: torch.device) -> Reward:
    """The reward ``settings`` name: ``reward.model`` scored on ``device``, or
    ``reward.function``, each reward checked to be a finite number."""
    settings.check()
    if settings.model is not None:
        from preftune.models.reward import RewardScorer

        scorer = RewardScorer(settings.model, device=device)
        return _checked(scorer.score, f"reward.model={settings.model}")
    assert settings.function is not None
    return checked_function_scorer(settings.function, "reward.function")


def checked_function_scorer(spec: str, key: str) -> Reward:
    """The scorer of ``module:callable`` (named by config key ``key``), called on each
    (prompt, completion), each score checked to be a finite number."""
    function = import_function(spec, key)

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return [function(p, c) for p, c in zip(prompts, completions, strict=True)]

    return _checked(score, f"{key}={spec}")


def import_function(spec: str, key: str = "reward.function") -> Callable[[str, str], float]:
    """``module:callable``, imported; one line naming what is missing otherwise."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(f"{key}={spec!r}: expected module:callable, e.g. mypkg:score")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{key}={spec}: cannot import {module_name}: {error}") from None
    function = getattr(module, name, None)
    if not callable(function):
        known = [key for key in vars(module) if callable(getattr(module, key))]
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {module_name}:{near[0]}?" if near else ""
        raise ConfigError(f"{key}={spec}: {module_name} has no callable {name}{hint}")
    return function


def _checked(score: Reward, origin: str) -> Reward:
    def checked(prompts: list[str], completions: list[str]) -> list[float]:
        rewards = score(prompts, completions)
        for index, value in enumerate(rewards):
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise PreftuneError(
                    f"{origin} returned {value!r} for the completion {completions[index][:60]!r}: "
                    "rewards must be finite numbers"
                )
        return [float(value) for value in rewards]

    return checked
