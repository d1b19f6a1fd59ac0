"""What the processes of a run share: decisions made once, on the main process, and lists of
items shared out for work without gradients (the reference pass, evaluation)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
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


def on_every_node(acc: Accelerator, present: Callable[[], bool], make: Callable[[], Any]) -> None:
    """For a file the main process wrote to its disk, which another node may not mount: the
    first process of each node where ``present()`` is false runs ``make()`` while the others
    wait. When one of them cannot, every process raises: that one its own one-line error, the
    others a line naming it."""
    if acc.num_processes == 1:
        return
    failure: PreftuneError | None = None
    if acc.is_local_main_process and not acc.is_main_process and not present():
        try:
            make()
        except PreftuneError as error:
            failure = error
    failed = torch.tensor([acc.process_index + 1 if failure else 0], device=acc.device)
    first = int(acc.reduce(failed, "max").item())
    if failure is not None:
        raise failure
    if first:
        raise PreftuneError(
            f"process {first - 1} could not make its node's copy of a cache; its error is above"
        )


def process_parts(
    count: int, process_index: int, num_processes: int, size: int, lockstep: bool
) -> list[list[int]]:
    """This process's items, every ``num_processes``-th of ``count`` from ``process_index``, in
    parts of at most ``size``. With ``lockstep`` (a sharded model, whose every forward all
    processes must take part in) each process gets the same number of parts, padded with empty
    ones that the caller runs on a stand-in item and discards."""
    mine = list(range(process_index, count, num_processes))
    parts = [mine[start : start + size] for start in range(0, len(mine), size)]
    if lockstep:
        rounds = math.ceil(math.ceil(count / num_processes) / size)
        parts += [[] for _ in range(rounds - len(parts))]
    return parts
