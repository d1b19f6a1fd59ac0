"""The model card written beside the final weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from preftune import __version__


def write_model_card(
    output_dir: Path,
    command: str,
    base_model: str,
    config: dict[str, Any],
    metrics: dict[str, float],
) -> None:
    rows = "\n".join(f"| `{key}` | {value:.6g} |" for key, value in sorted(metrics.items()))
    curves = _curves(output_dir)
    text = f"""---
library_name: transformers
tags: [preftune, {command}]
base_model: {base_model}
---

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


def _curves(output_dir: Path) -> str:
    if (output_dir / "metrics.png").exists():
        return ", drawn below\n\n![training curves](metrics.png)"
    return ""
