"""Decisions made once, on the main process, and shared with every process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from preftune.errors import PreftuneError

T = TypeVar("T")


def decide_on_main(acc: Accelerator, decide: Callable[[], T]) -> T:
    """``decide()`` run on the main process only; every process returns its result, or raises
    the same one-line error when it raised one. The result must pickle."""
    # (result, error): the main process's, unpickled on every other one.
    outcome: list[Any] = [None, None]
    if acc.is_main_process:
        try:
            outcome[0] = decide()
        except PreftuneError as error:
            outcome[1] = error
    if acc.num_processes > 1:
        broadcast_object_list(outcome)
    result, failure = outcome
    if failure is not None:
        raise failure
    return result
