"""The model card written beside the final weights."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from preftune import __version__

# A hub model id: ``name`` or ``org/name``.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def write_model_card(
    output_dir: Path,
    command: str,
    base_model: str,
    config: dict[str, Any],
    metrics: dict[str, float],
) -> None:
    """``output_dir/README.md``: the card of a model trained by ``command`` from ``base_model``
    (``model.path``). Its ``base_model`` metadata names a hub model or nothing: a local
    directory is named by the hub model it records it came from, if any (:func:`hub_base`)."""
    rows = "\n".join(f"| `{key}` | {value:.6g} |" for key, value in sorted(metrics.items()))
    curves = _curves(output_dir)
    hub = hub_base(base_model)
    base = f"base_model: {hub}\n" if hub else ""
    text = f"""---
library_name: transformers
tags: [preftune, {command}]
{base}---

# {output_dir.name}

Trained with `preftune {command}` (preftune {__version__}) from `{base_model}`.

## Final metrics

| metric | value |
|---|---|
{rows}

## Configuration

```yaml
{yaml.safe_dump(config, sort_keys=False).strip()}
```

Metrics per step are in `metrics.jsonl`{curves}.
"""
    (output_dir / "README.md").write_text(text)


def hub_base(path: str) -> str | None:
    """The hub model ``path`` is or came from: a hub id as it is; for a local directory, the hub
    id its own card (a preftune run's) or ``config.json`` records as its base; None for
    anything else (the ``tiny`` preset, a directory that records no hub model), which the hub
    would otherwise show as a link to a model that does not exist."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return path if _is_hub_id(path) else None
    recorded = [_card_base(directory / "README.md"), _config_name(directory / "config.json")]
    return next((name for name in recorded if isinstance(name, str) and _is_hub_id(name)), None)


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` can only be a hub id: of its form, not a local path, not ``tiny``."""
    exists = Path(name).expanduser().exists()
    return bool(_HUB_ID.match(name)) and name != "tiny" and not exists


def _card_base(card: Path) -> Any:
    """The ``base_model`` of a model card's YAML front matter, if it has one."""
    try:
        _, front, _ = card.read_text(encoding="utf-8").split("---\n", 2)
        return (yaml.safe_load(front) or {}).get("base_model")
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, AttributeError):
        return None


def _config_name(config: Path) -> Any:
    """The ``_name_or_path`` a model's ``config.json`` records, if any."""
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None


def _curves(output_dir: Path) -> str:
    if (output_dir / "metrics.png").exists():
        return ", drawn below\n\n![training curves](metrics.png)"
    return ""
