"""How a run shows its progress: live progress bars on a terminal, or plain lines through the
``preftune`` logger where output goes to a file (a CI or cluster job log), where ``\\r``-joined
bar redraws are unreadable.

The format is chosen once per process (the command line does, from ``log.format``); every bar
preftune draws and every progress line it logs asks here whether to.
"""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType

FORMATS = ("auto", "bar", "plain", "quiet")
"""``auto``: a bar on a terminal, plain lines otherwise; ``bar``; ``plain``: one line per logged
step and per evaluation; ``quiet``: neither, only warnings, errors and each run's summary."""

logger = logging.getLogger("preftune")
"""Where the progress lines and run summaries go, as INFO records: a host application routes
them with its own handlers; the command line writes them to stderr when nothing else does."""

_chosen = "auto"


def choose(fmt: str) -> None:
    """Set the format of this process's progress, one of :data:`FORMATS`."""
    global _chosen
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    _chosen = fmt


def current() -> str:
    """The format in effect: ``bar``, ``plain`` or ``quiet``. ``auto`` is a bar when stderr, where
    bars are drawn, is a terminal and ``TQDM_DISABLE`` does not turn bars off; else plain."""
    if _chosen != "auto":
        return _chosen
    return "bar" if sys.stderr.isatty() and not _tqdm_disabled() else "plain"


def bars_shown() -> bool:
    """Whether preftune draws its progress bars (an explicit ``disable`` given to tqdm overrides
    ``TQDM_DISABLE``, which is why each bar asks here)."""
    return current() == "bar" and not _tqdm_disabled()


def _tqdm_disabled() -> bool:
    """``TQDM_DISABLE`` read as tqdm reads it: any value that is not empty turns bars off."""
    return bool(os.environ.get("TQDM_DISABLE", ""))


_libraries_quiet = False


def quiet_datasets() -> None:
    """Silence datasets' progress bars and messages (but errors) for the rest of the process:
    now if it is imported, else when :func:`imported_datasets` first imports it (importing it
    takes seconds, which runs that never read a hub or saved dataset do not spend)."""
    global _libraries_quiet
    _libraries_quiet = True
    if "datasets" in sys.modules:
        imported_datasets()


def imported_datasets() -> ModuleType:
    """The datasets package, silenced if :func:`quiet_datasets` asked for it."""
    import datasets

    if _libraries_quiet:
        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    return datasets
