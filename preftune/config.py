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
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from preftune.errors import ConfigError
from preftune.fields import is_number, takes_numbers

if typing.TYPE_CHECKING:
    from _typeshed import DataclassInstance

# A section given as a plain value sets this key, e.g. ``model: tiny`` is ``model.path: tiny``.
SHORTHANDS = {"model": "path"}

C = TypeVar("C", bound="DataclassInstance")

# Values a YAML document may hold once its aliases are expanded: a config has about a hundred,
# and a "billion laughs" document, a few nested anchors, would otherwise expand to billions.
MAX_YAML_VALUES = 10_000

BATCH_NOTE = (
    "train.batch_size is the global batch per optimizer step and train.micro_batch_size the "
    "examples per process per forward pass: gradient accumulation is batch_size / (processes x "
    "micro_batch_size)"
)
FOREIGN_KEYS: dict[str, tuple[str, str]] = {
    "gradient_accumulation_steps": ("train.batch_size", BATCH_NOTE),
    "per_device_train_batch_size": ("train.batch_size", BATCH_NOTE),
    "per_device_eval_batch_size": (
        "train.micro_batch_size",
        "evaluation runs in micro-batches of train.micro_batch_size",
    ),
    "num_train_epochs": ("train.epochs", ""),
    "lr_scheduler_type": ("train.lr_scheduler", ""),
    "warmup_ratio": (
        "train.warmup_steps",
        "warmup is counted in steps: set train.warmup_steps to the ratio x the optimizer steps",
    ),
    "logging_steps": ("train.log_every", ""),
    "eval_steps": ("train.eval_every", ""),
    "save_steps": ("train.save_every", ""),
    "save_total_limit": ("train.keep_checkpoints", ""),
    "optim": ("train.optimizer", ""),
    "loss_type": ("loss.type", ""),
    "loss_weights": ("loss.weights", ""),
    "model_name_or_path": ("model.path", ""),
    "bf16": ("model.dtype", "use model.dtype=bfloat16"),
    "fp16": ("model.dtype", "use model.dtype=float16"),
    "max_completion_length": (
        "data.max_length",
        "data.max_length bounds prompt and response together, data.max_prompt_length the prompt",
    ),
    "precompute_ref_log_probs": (
        "speed.reference_cache",
        "speed.reference_cache (on by default) computes the reference's log-probs once, before "
        "training",
    ),
    "ref_model": ("reference.model", ""),
    "ref_adapter_name": (
        "reference.model",
        "under LoRA, reference.model takes the reference's adapter directory (no adapter names)",
    ),
    "model_adapter_name": (
        "lora.r",
        "the policy trains adapters of its own (lora.*): no adapter names to give",
    ),
    "sync_ref_model": (
        "reference.sync_every",
        "TR-DPO: set reference.sync_every (steps) and reference.sync_mix (alpha)",
    ),
    "ref_model_sync_steps": ("reference.sync_every", ""),
    "ref_model_mixup_alpha": ("reference.sync_mix", ""),
    "padding_free": (
        "speed.packing",
        "speed.packing (on by default) packs each micro-batch's pairs into rows, without padding",
    ),
    "use_logits_to_keep": (
        "speed.logits_chunk",
        "the output layer runs on response positions only, speed.logits_chunk of them at a time",
    ),
}
"""Keys of other trainers' configs (TRL's ``DPOConfig``, transformers' ``TrainingArguments``)
that users bring with them, by name: the preftune key that takes their place and, where that
key means something else, what to do instead. Offered, where the config has that key, before the
nearest spelling."""


def describe(cls: type) -> list[tuple[str, str, str]]:
    """Every dotted key of a config class as (key, default, help), in declaration order; the
    help ends with the key's valid names (unless it names each already) and its range, if it
    has them."""
    rows = []
    for key, f, _ in _leaves(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...")
        help = f.metadata["help"]
        choices = f.metadata["choices"]
        named = all(re.search(rf"\b{re.escape(choice)}\b", help) for choice in choices)
        notes = [f"one of {', '.join(choices)}" if not named else "", str(f.metadata["bounds"])]
        rows.append((key, text, "; ".join([help, *filter(None, notes)])))
    return rows


def load_config(cls: type[C], path: str | None = None, overrides: Sequence[str] = ()) -> C:
    """Build ``cls`` from an optional YAML file and ``key=value`` overrides (later wins)."""
    return _build(cls, given_keys(path, overrides))


def build_config(cls: type[C], values: Mapping[str, Any]) -> C:
    """Build ``cls`` from Python values by dotted key (``{"train.max_steps": 10}``; a mapping
    value is flattened, ``{"train": {"max_steps": 10}}`` is the same). Keys are checked as
    overrides' are; values are taken as given, not read as YAML text, so ``"1e-5"`` stays a
    string and a float key refuses it, as the config's own field checks do."""
    return _build(cls, flatten(dict(values)), coerce=False)


def option_hint(cls: type, option: str, value: str) -> str:
    """What to write instead of the command-line option ``--option value``, other trainers'
    habit: the config key it names as ``key=value``, or what preftune has in its place."""
    name = option.replace("-", "_")
    leaves = [key for key, _, _ in _leaves(cls)]
    named = [key for key in leaves if key.rsplit(".", 1)[-1] == name]
    if name in leaves or len(named) == 1:
        return f"use {name if name in leaves else named[0]}={value}"
    key, note = FOREIGN_KEYS.get(name, ("", ""))
    if key in leaves:
        return note or f"use {key}={value}"
    return "no such option; config keys are set as key=value (--help lists them)"


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


def _build(cls: type[C], flat: dict[str, Any], coerce: bool = True) -> C:
    """``cls`` from dotted keys: unknown keys are refused here, values by the configs' own
    field checks as they are built; with ``coerce``, values read as YAML text are first
    converted toward their fields' types (:func:`_coerce`). A mapping's entries arrive
    flattened like sections' (``data.columns.prompt``, from a YAML mapping or given alone) and
    are gathered again, later entries joining earlier ones."""
    leaves = {key: hint for key, _, hint in _leaves(cls)}
    # A list whose default is empty may be given empty (as a run's saved config gives it).
    may_be_empty = {
        key
        for key, f, _ in _leaves(cls)
        if f.default_factory is not dataclasses.MISSING and f.default_factory() == []
    }
    sections = {key.rsplit(".", 1)[0] for key in leaves if "." in key}
    mappings = {key: kind for key, hint in leaves.items() if (kind := _mapped_type(hint))}
    values: dict[str, Any] = {}
    for key, value in flat.items():
        if key in sections and key in SHORTHANDS:
            key = f"{key}.{SHORTHANDS[key]}"
        parent, _, entry = key.rpartition(".")
        if key not in leaves and parent in mappings:
            if not isinstance(values.get(parent), dict):
                values[parent] = {}
            values[parent][entry] = _coerce(key, value, mappings[parent]) if coerce else value
            continue
        if key not in leaves:
            raise ConfigError(f"unknown config key '{key}'{_hint(key, [*leaves, *sections])}")
        if value == [] and key in may_be_empty:
            values[key] = []
            continue
        values[key] = _coerce(key, value, leaves[key]) if coerce else value
    return _instantiate(cls, values, "")


def _hint(key: str, known: list[str]) -> str:
    """The hint after an unknown key: what another trainer's key of that name is here
    (:data:`FOREIGN_KEYS`), else the nearest known spelling, if any is near."""
    target, note = FOREIGN_KEYS.get(key.rsplit(".", 1)[-1], ("", ""))
    if target in known:
        return f"; {note}" if note else f"; did you mean '{target}'?"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


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


def _mapped_type(hint: Any) -> Any:
    """The type of the values of the mapping a field takes (``dict[str, X]``: X), None when it
    takes no mapping."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    mapping = next((kind for kind in kinds if typing.get_origin(kind) is dict), None)
    return None if mapping is None else typing.get_args(mapping)[1]


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as YAML read it, converted toward the field's type: a number YAML read as text
    (``1e-5`` has no dot, ``nan`` no leading one) for a float, a number for a string, one item
    for a list (whether or not it may also be null). What cannot be converted is left as it is,
    for the field check to refuse."""
    if value is None:
        return None
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    listed = next((kind for kind in kinds if typing.get_origin(kind) is list), None)
    others = [kind for kind in kinds if kind is not type(None)]
    if listed is not None and (isinstance(value, list) or len(others) == 1):
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ConfigError(f"config key '{key}' needs at least one value")
        (item_hint,) = typing.get_args(listed)
        return [_coerce(key, item, item_hint) for item in items]
    if float in kinds and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    if str in kinds and is_number(value) and not takes_numbers(hint):
        return str(value)
    return value
