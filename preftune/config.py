"""Typed configs built from YAML plus dotted ``key=value`` overrides.

Every leaf key is reachable as an override, so a run needs no config file at all. Unknown keys
and ill-typed values are :class:`ConfigError`s that name the key and its closest valid spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from preftune.data.settings import DataConfig
from preftune.errors import ConfigError
from preftune.fields import option
from preftune.models.settings import LoraSettings, ModelConfig
from preftune.objectives.kto_settings import KTOSettings
from preftune.objectives.settings import LossConfig
from preftune.objectives.speed import SpeedConfig
from preftune.spin.settings import SPINSettings
from preftune.train.settings import TrainConfig


@dataclass
class SFTConfig:
    seed: int = option(42, "seed for model init (tiny), data order and sampling")
    output_dir: str = option("runs/preftune", "where the model, checkpoints and metrics go")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if self.lora.r > 0 and self.lora.dropout > 0 and self.model.disable_dropout:
            raise ConfigError(
                f"lora.dropout={self.lora.dropout} has no effect with model.disable_dropout=true, "
                "which trains the whole model, adapters included, without dropout: set "
                "lora.dropout=0, or model.disable_dropout=false"
            )


@dataclass
class DPOConfig(SFTConfig):
    loss: LossConfig = field(default_factory=LossConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)


@dataclass
class SPINConfig(DPOConfig):
    spin: SPINSettings = field(default_factory=SPINSettings)


@dataclass
class KTOConfig(SFTConfig):
    kto: KTOSettings = field(default_factory=KTOSettings)


@dataclass
class RMConfig(SFTConfig):
    """``preftune rm``: the keys of ``sft``; the model gets a one-output score head."""


# A section given as a plain value sets this key, e.g. ``model: tiny`` is ``model.path: tiny``.
SHORTHANDS = {"model": "path"}

C = TypeVar("C")


def describe(cls: type) -> list[tuple[str, str, str]]:
    """Every dotted key of a config class as (key, default, help), in declaration order."""
    rows = []
    for key, f, _ in _leaves(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...")
        rows.append((key, text, f.metadata["help"]))
    return rows


def load_config(cls: type[C], path: str | None = None, overrides: list[str] = ()) -> C:
    """Build ``cls`` from an optional YAML file and ``key=value`` overrides (later wins)."""
    return _build(cls, given_keys(path, overrides))


def given_keys(path: str | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """The dotted keys a YAML file and ``key=value`` overrides set, unchecked (later wins)."""
    flat: dict[str, Any] = {}
    if path is not None:
        _flatten(_read_yaml(path), "", flat)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        _flatten(yaml.safe_load(text) if text else "", key.strip(), flat)
    return flat


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    _flatten(tree, "", flat)
    return flat


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
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
    leaves = {key: (f, hint) for key, f, hint in _leaves(cls)}
    sections = {key.rsplit(".", 1)[0] for key in leaves if "." in key}
    values: dict[str, Any] = {}
    for key, value in flat.items():
        if key in sections and key in SHORTHANDS:
            key = f"{key}.{SHORTHANDS[key]}"
        if key not in leaves:
            close = difflib.get_close_matches(key, [*leaves, *sections], n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        f, hint = leaves[key]
        values[key] = _check_choice(key, _coerce(key, value, hint), f.metadata["choices"])
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


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> Any:
    if isinstance(value, list):
        return [_check_choice(key, item, choices) for item in value]
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.4)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}{hint}")
    return value


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type, converting strings written as numbers."""
    if typing.get_origin(hint) is list:
        (item_hint,) = typing.get_args(hint)
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ConfigError(f"config key '{key}' needs at least one value")
        return [_coerce(key, item, item_hint) for item in items]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"config key '{key}' cannot be null")
    for kind in options:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = " or ".join("null" if k is type(None) else k.__name__ for k in options)
    raise ConfigError(f"config key '{key}' must be {names}, got {value!r}")
