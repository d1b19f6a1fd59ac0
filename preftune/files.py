"""Files replaced whole or not at all: a reader never sees one half-written."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; when the block ends without an error it is
    renamed over ``path`` in one step, else removed."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    with replaced_atomically(path) as partial:
        partial.write_text(text, encoding="utf-8")


CHECKPOINT_FILES = ("training_state.pt", "state.json")
"""What every checkpoint holds (its weights files are listed in its state.json); written last,
they make it complete."""


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a complete checkpoint of a run: it holds ``training_state.pt`` and
    ``state.json`` (not verified)."""
    return all((path / name).is_file() for name in CHECKPOINT_FILES)
