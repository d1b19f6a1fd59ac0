"""A run's output directory: claimed before anything is written there.

``output_dir`` must be absent, empty, or a preftune run (recognised by the marker file preftune
writes into it); anything else is someone else's files, and is refused with one line. While a
run works in it, the directory is locked: a lock file naming the host and process, held with an
advisory lock (``flock``) that the operating system releases when the process ends, however it
ends. A second run on the same directory is refused, naming the first; a lock file left by a
process that died on this host is taken over with a line saying so; one written on another host
is refused with that host's name, since whether that process lives cannot be told from here.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from preftune import __version__
from preftune.errors import ConfigError
from preftune.files import write_text_atomically
from preftune.shares import decide_on_main

MARKER = ".preftune-run"
LOCK = ".preftune-lock"
# Written into every run directory before the marker existed.
OLDER_MARKERS = ("preftune_config.yaml",)


def check_output_dir(path: Path) -> None:
    """A one-line error unless ``path`` is absent, an empty directory or a preftune run."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {path} is a file, not a directory")
    if not path.exists():
        return
    names = sorted(entry.name for entry in path.iterdir())
    if names and not any(name in names for name in (MARKER, LOCK, *OLDER_MARKERS)):
        shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        raise ConfigError(
            f"output_dir {path} holds files that are not a preftune run's ({shown}): choose an "
            "empty or new directory"
        )


def mark(path: Path, command: str) -> None:
    """Write the marker that makes ``path`` recognisable as a preftune run."""
    if not (path / MARKER).exists():
        record = {"command": command, "version": __version__}
        write_text_atomically(path / MARKER, json.dumps(record) + "\n")


class Lock:
    """The held lock of one output directory."""

    def __init__(self, path: Path, descriptor: int, created_dir: bool) -> None:
        self.path = path
        self.descriptor = descriptor
        self.created_dir = created_dir

    @classmethod
    def take(cls, directory: Path, say: Callable[[str], None]) -> Lock:
        created = not directory.exists()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return cls._take(directory, say, created)
        except OSError as error:
            raise ConfigError(
                f"output_dir {directory}: cannot write there: {_reason(error)}"
            ) from None

    @classmethod
    def _take(cls, directory: Path, say: Callable[[str], None], created: bool) -> Lock:
        path = directory / LOCK
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(8):
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(descriptor)
                os.close(descriptor)
                raise ConfigError(
                    f"output_dir {directory} is in use by another run ({_describe(holder)}): "
                    "wait for it to end, or choose another output_dir"
                ) from None
            # The file may have been removed by the run that held it while we waited to lock.
            if not path.exists() or os.stat(path).st_ino != os.fstat(descriptor).st_ino:
                os.close(descriptor)
                continue
            holder = _holder(descriptor)
            if holder and holder.get("host") != me["host"]:
                os.close(descriptor)
                raise ConfigError(
                    f"output_dir {directory} is locked by a run on host {holder.get('host')} "
                    f"(pid {holder.get('pid')}); if that run has ended, delete {path}"
                )
            if holder:
                say(
                    f"{directory}: took over the lock left by pid {holder.get('pid')}, which is "
                    "no longer running"
                )
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(descriptor)
            return cls(path, descriptor, created)
        raise ConfigError(f"output_dir {directory}: could not lock {path}")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.descriptor)
        directory = self.path.parent
        if self.created_dir and not any(directory.iterdir()):
            directory.rmdir()  # nothing was written: leave no trace of a refused run


def _holder(descriptor: int) -> dict[str, Any]:
    try:
        text = os.pread(descriptor, 4096, 0).decode("utf-8", "replace")
        holder = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "its lock file names no process yet"
    return f"pid {holder.get('pid')} on host {holder.get('host')}"


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


@contextmanager
def claimed(output_dir: str | Path, acc: Accelerator) -> Iterator[Path]:
    """Within the context ``output_dir`` is checked and locked by the main process; every
    process raises the same one-line error when it cannot be. Nothing but the lock file is
    written here; the marker is written by :func:`mark` once the run's own checks pass."""
    path = Path(output_dir)
    held: list[Lock] = []

    def take() -> dict[str, Any]:
        """Check and lock the directory; what the lock file then says of its holder."""
        check_output_dir(path)
        held.append(Lock.take(path, acc.print))
        return _holder_of(path / LOCK)

    holder = decide_on_main(acc, take)
    try:
        check_shared(path, holder, acc)
        yield path
    finally:
        for lock in held:
            lock.release()


def check_shared(path: Path, holder: dict[str, Any], acc: Accelerator) -> None:
    """Every process must see the lock the main process took: checkpoints and the final model
    are written by it (and by every process, shard by shard) into one directory, which all of
    them must share (a network filesystem across nodes). A one-line error on every process
    otherwise, naming a process that cannot see it."""
    blind = torch.tensor(
        [acc.process_index + 1 if _holder_of(path / LOCK) != holder else 0], device=acc.device
    )
    first = int(acc.reduce(blind, "max").item())
    if first:
        raise ConfigError(
            f"output_dir {path} is not shared by every process: process {first - 1} cannot see "
            f"the lock file the main process wrote there; put output_dir on a filesystem "
            "every node mounts"
        )


def _holder_of(path: Path) -> dict[str, Any]:
    """What the lock file at ``path`` says of its holder ({} when it cannot be read)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
