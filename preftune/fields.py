"""Config fields that carry their own help text, valid values and range, and the one check that
enforces them whenever a config object is built.

A section's ``__post_init__`` calls :func:`check_fields` first, so a config written by hand in
Python (``TrainSettings(learning_rate="1e-5")``) is refused as one from a YAML file would be,
with one line naming the key, what it must be and what it got.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from preftune.errors import ConfigError


@dataclass(frozen=True)
class Bounds:
    """The range of a numeric field (of each item, for a list): each side open or closed."""

    low: float | None = None
    low_closed: bool = True
    high: float | None = None
    high_closed: bool = True

    def admit(self, value: float) -> bool:
        """Whether ``value`` is in range; NaN never is (every comparison with it is false)."""
        above_low = self.low is None or (value >= self.low if self.low_closed else value > self.low)
        below_high = self.high is None or (
            value <= self.high if self.high_closed else value < self.high
        )
        return above_low and below_high

    def __str__(self) -> str:
        """The range in words: ``0 or more``, ``at least 1``, ``positive``, ``in [0, 0.5)``."""
        if self.low is not None and self.high is not None:
            opening, closing = "[("[not self.low_closed], "])"[not self.high_closed]
            return f"in {opening}{self.low}, {self.high}{closing}"
        if self.low is not None:
            if self.low == 0:
                return "0 or more" if self.low_closed else "positive"
            return f"{'at least' if self.low_closed else 'above'} {self.low}"
        if self.high is not None:
            return f"{'at most' if self.high_closed else 'below'} {self.high}"
        return ""


def option(
    default: Any,
    help: str,
    choices: tuple[str, ...] = (),
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> Any:
    """A config field with its meaning (shown by ``--help``) and its valid values: ``choices``
    for names, at most one lower (``at_least``/``above``) and one upper (``at_most``/``below``)
    bound for numbers. Non-finite floats are refused whatever the bounds."""
    if (at_least is not None and above is not None) or (at_most is not None and below is not None):
        raise ValueError("a field has at most one lower and one upper bound")
    bounds = Bounds(
        low=above if at_least is None else at_least,
        low_closed=at_least is not None,
        high=below if at_most is None else at_most,
        high_closed=at_most is not None,
    )
    metadata = {"help": help, "choices": choices, "bounds": bounds}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_fields(config: Any, section: str = "") -> None:
    """Check every field of the dataclass ``config`` against its type, choices and bounds.

    Values are settled where the type allows, as YAML would read them: an int becomes a float
    for a float field, and one item a one-item list for a list field. ``section`` is the
    dotted prefix of the keys (``"train"``; empty for a top-level config), for the messages.
    """
    # A class is hashable; mypy takes type[Any] for unhashable (python/mypy#11470).
    hints = _type_hints(type(config))  # type: ignore[arg-type]
    for f in dataclasses.fields(config):
        key = f"{section}.{f.name}" if section else f.name
        value = _settled(getattr(config, f.name), hints[f.name])
        _check_type(key, value, hints[f.name], f.metadata.get("choices", ()))
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            if not (is_number(item) and takes_numbers(hints[f.name])):
                _check_choice(key, item, f.metadata.get("choices", ()), hints[f.name])
            if is_number(item):
                bounds = f.metadata.get("bounds", Bounds())
                _check_range(key if index is None else f"{key}[{index}]", item, bounds)
        setattr(config, f.name, value)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _settled(value: Any, hint: Any) -> Any:
    kinds = [kind for kind in _kinds(hint) if kind is not type(None)]
    if len(kinds) == 1 and typing.get_origin(kinds[0]) is list:
        (item_hint,) = typing.get_args(kinds[0])
        items = [value] if isinstance(value, (str, int, float)) else value
        return [_settled(item, item_hint) for item in items] if isinstance(items, list) else items
    if float in kinds and int not in kinds and is_number(value):
        return float(value)
    return value


def _conforms(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType):
        return any(_conforms(value, kind) for kind in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item_hint,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(item, item_hint) for item in value)
    if typing.get_origin(hint) is dict:
        key_hint, value_hint = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _conforms(key, key_hint) and _conforms(item, value_hint) for key, item in value.items()
        )
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return is_number(value) and (hint is float or isinstance(value, int))
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(kind) for kind in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) is dict:
        key_hint, value_hint = typing.get_args(hint)
        return f"mapping of {_type_name(key_hint)} to {_type_name(value_hint)}"
    return "null" if hint is type(None) else hint.__name__


def takes_numbers(hint: Any) -> bool:
    """A field that takes a number or a named choice (``int | str``, choices ``("auto",)``)."""
    return bool({int, float} & set(_kinds(hint)))


def _kinds(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def is_number(value: Any) -> bool:
    """An int or a float; a bool is an int to Python, never to a config."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_type(key: str, value: Any, hint: Any, choices: tuple[str, ...] = ()) -> None:
    if _conforms(value, hint):
        return
    if value is None:
        raise ConfigError(f"config key '{key}' cannot be null")
    raise ConfigError(f"config key '{key}' must be {_wanted(hint, choices)}, got {value!r}")


def _wanted(hint: Any, choices: tuple[str, ...]) -> str:
    """What a field takes, in words; a number or a name as ``int or auto``."""
    if not (choices and takes_numbers(hint)):
        return _type_name(hint)
    return " or ".join(
        " or ".join(choices) if kind is str else _type_name(kind) for kind in _kinds(hint)
    )


def _check_choice(key: str, value: Any, choices: tuple[str, ...], hint: Any) -> None:
    if choices and value not in choices:
        if takes_numbers(hint):
            raise ConfigError(f"config key '{key}' must be {_wanted(hint, choices)}, got {value!r}")
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.4)
        suggestion = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}{suggestion}")


def _check_range(key: str, value: float, bounds: Bounds) -> None:
    finite = not isinstance(value, float) or math.isfinite(value)
    if finite and bounds.admit(value):
        return
    wanted = str(bounds) if finite else " and ".join(filter(None, ("finite", str(bounds))))
    raise ConfigError(f"{key} must be {wanted}, got {value!r}")
