"""Rewards for tests of the policy-gradient commands: simple functions of the completion text."""

from __future__ import annotations


def lowercase(prompt: str, completion: str) -> float:
    """How many of the completion's characters are lowercase letters, over 4: a reward that a
    tiny random model (a byte each token) earns now and then, and can learn to earn more."""
    return sum(character.islower() for character in completion) / 4


def not_a_number(prompt: str, completion: str) -> float:
    return float("nan")
