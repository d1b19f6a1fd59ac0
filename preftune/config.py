"""Typed configs built from YAML plus dotted ``key=value`` overrides: any dataclass of sections
(each command's config is declared beside the command, in :mod:`preftune.commands`).

Every leaf key is reachable as an override, so a run needs no config file at all. Unknown keys
and ill-typed or out-of-range values are :class:`ConfigError`s that name the key and its closest
valid spelling or its range (each config checks its own fields when built:
:func:`~preftune.fields.check_fields`). YAML is read safely: no Python tags, and no document
whose aliases would expand past :data:`MAX_YAML_VALUES` values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from preftune.errors import ConfigError

if typing.TYPE_CHECKING:
    from _typeshed import DataclassInstance

# A section given as a plain value sets this key, e.g. ``model: tiny`` is ``model.path: tiny``.
SHORTHANDS = {"model": "path"}

C = TypeVar("C", bound="DataclassInstance")

# Values a YAML document may hold once its aliases are expanded: a config has about a hundred,
# and a "billion laughs" document, a few nested anchors, would otherwise expand to billions.
MAX_YAML_VALUES = 10_000


def describe(cls: type) -> list[tuple[str, str, str]]:
    """Every dotted key of a config class as (key, default, help), in declaration order; the
    help ends with the key's range, if it has one."""
    rows = []
    for key, f, _ in _leaves(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...")
        bounds = str(f.metadata["bounds"])
        rows.append(
            (key, text, f"{f.metadata['help']}; {bounds}" if bounds else f.metadata["help"])
        )
    return rows


def load_config(cls: type[C], path: str | None = None, overrides: Sequence[str] = ()) -> C:
    """Build ``cls`` from an optional YAML file and ``key=value`` overrides (later wins)."""
    return _build(cls, given_keys(path, overrides))


def given_keys(path: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The dotted keys a YAML file and ``key=value`` overrides set, unchecked (later wins)."""
    flat: dict[str, Any] = {}
    if path is not None:
        _flatten(_read_yaml(path), "", flat)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        _flatten(_safe_yaml(text, f"override '{item}'") if text else "", key.strip(), flat)
    return flat


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    _flatten(tree, "", flat)
    return flat


def _safe_yaml(text: str, source: str) -> Any:
    """The value of the YAML document ``text``, or a one-line :class:`ConfigError` naming
    ``source``. Plain YAML only (no Python tags); the document's size after alias expansion is
    counted on its node graph, where an alias is the node it names again, before anything is
    built from it."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise ConfigError(f"{source}: aliases expand to more than {MAX_YAML_VALUES} values")
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(error)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values under ``node`` once aliases are expanded, capped just past the limit. Each node is
    counted once (``sizes``, by id), so nested aliases cost their node count, not their
    expansion; a node met again while it is being counted contains itself: endless."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = MAX_YAML_VALUES + 1
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
    size = min(1 + sum(_expanded_size(child, sizes) for child in children), MAX_YAML_VALUES + 1)
    sizes[id(node)] = size
    return size


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong and where, on one line (PyYAML's own message spans several)."""
    problem = getattr(error, "problem", None)
    if problem is None:
        return str(error).splitlines()[0]
    mark = error.problem_mark
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read config: not UTF-8 text") from None
    data = _safe_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    return data


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def _leaves(cls: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], key + ".")
        else:
            yield key, f, hints[f.name]


def _build(cls: type[C], flat: dict[str, Any]) -> C:
    """``cls`` from dotted keys: unknown keys are refused here, values by the configs' own
    field checks as they are built."""
    leaves = {key: hint for key, _, hint in _leaves(cls)}
    sections = {key.rsplit(".", 1)[0] for key in leaves if "." in key}
    values: dict[str, Any] = {}
    for key, value in flat.items():
        if key in sections and key in SHORTHANDS:
            key = f"{key}.{SHORTHANDS[key]}"
        if key not in leaves:
            close = difflib.get_close_matches(key, [*leaves, *sections], n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        values[key] = _coerce(key, value, leaves[key])
    return _instantiate(cls, values, "")


def _instantiate(cls: type[C], values: dict[str, Any], prefix: str) -> C:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _instantiate(hints[f.name], values, key + ".")
        elif key in values:
            kwargs[f.name] = values[key]
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as YAML read it, converted toward the field's type: a number YAML read as text
    (``1e-5`` has no dot, ``nan`` no leading one) for a float, a number for a string, one item
    for a list. What cannot be converted is left as it is, for the field check to refuse."""
    if value is None:
        return None
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    listed = next((kind for kind in kinds if typing.get_origin(kind) is list), None)
    if listed is not None and (isinstance(value, list) or len(kinds) == 1):
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ConfigError(f"config key '{key}' needs at least one value")
        (item_hint,) = typing.get_args(listed)
        return [_coerce(key, item, item_hint) for item in items]
    if float in kinds and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    if str in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value
