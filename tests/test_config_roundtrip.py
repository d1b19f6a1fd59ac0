"""The config a run writes (``preftune_config.yaml``) reads back as the same config with
``--config``, for every command."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from preftune.commands import REGISTRY
from preftune.config import load_config, to_dict

# Commands whose defaults are not a config by themselves (a required model, paths).
WITHOUT_DEFAULTS = ("data check", "export", "score")


@pytest.mark.parametrize("name", [n for n in REGISTRY if n not in WITHOUT_DEFAULTS])
def test_a_written_config_reads_back_the_same(name: str, tmp_path: Path) -> None:
    config_class = REGISTRY[name].config
    written = to_dict(config_class())
    path = tmp_path / "preftune_config.yaml"
    path.write_text(yaml.safe_dump(written, sort_keys=False))
    assert to_dict(load_config(config_class, str(path), [])) == written
