"""``preftune <command> [--config FILE] [key=value ...]``; user errors print as one line."""

from __future__ import annotations

import argparse
import os
import re
import sys

from preftune import __version__
from preftune.commands import REGISTRY, TRAINING
from preftune.commands.data_check import run_data_check, training_config
from preftune.config import describe, load_config
from preftune.errors import PreftuneError
from preftune.train.interrupt import Interrupted, Stopped, signals_stop_at_once

DATA_CHECK = "data check"
DATA_CHECK_USAGE = """\
Each PATH (default: data.train and data.eval) is read, validated and tokenized with the
tokenizer of model.path and the data.* settings, as the training commands would: the same
--config file works. Prints a summary per dataset on stdout and one line per problem on stderr;
exits 0 when no problem was found, 1 when some were, 2 on an error that stops the check.
"""
# ``key=value`` where the key is a dotted config name; anything else is a dataset path.
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def key_table(config_class: type, prefixes: tuple[str, ...] = ()) -> str:
    rows = [row for row in describe(config_class) if row[0].startswith(prefixes or "")]
    width = max(len(key) for key, _, _ in rows)
    lines = [f"  {key:<{width}}  {help} (default: {default})" for key, default, help in rows]
    return "config keys (set in the YAML file or as key=value):\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per command of the registry; ``data check`` under ``data``."""
    parser = argparse.ArgumentParser(
        prog="preftune", description="Direct preference optimization for causal language models."
    )
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (or PREFTUNE_DEBUG=1)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in REGISTRY.values():
        if command.name == DATA_CHECK:
            continue
        sub = commands.add_parser(
            command.name,
            help=command.summary,
            description=command.summary,
            epilog=key_table(command.config),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--config", metavar="FILE", help="YAML config file")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="override a config key")
    _add_data_parser(commands)
    return parser


def _add_data_parser(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="check a dataset", description="Dataset tools.")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    summary = REGISTRY[DATA_CHECK].summary
    check = actions.add_parser(
        "check",
        help=summary,
        description=f"{summary}.\n\n{DATA_CHECK_USAGE}",
        epilog=key_table(REGISTRY["dpo"].config, ("model.", "data.")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "--config", metavar="FILE", help="YAML config file (as for dpo, sft, kto, spin or rm)"
    )
    check.add_argument(
        "--kind",
        choices=("auto", "pairs", "sft", "unpaired"),
        default="auto",
        help="read rows as preference pairs, SFT demonstrations or judged completions (KTO's "
        "prompt/completion/label) (auto: from the first row)",
    )
    check.add_argument("items", nargs="*", metavar="PATH | key=value", help="dataset or override")


def run() -> None:
    """The command line's entry point: :func:`main`, then exit with its status. The processes of
    a multi-process run wait for each other, then leave at once, without tearing down their
    process group or running the interpreter's teardown: gloo can hang or abort there
    (``terminate called without an active exception``) after a run that succeeded."""
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if status == 0:  # a failed process must not wait for others that may never come
            _barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def main(argv: list[str] | None = None) -> int:
    """Run a command; every error a user or the machine causes is one line on stderr (with
    ``--debug`` or ``PREFTUNE_DEBUG=1``, its traceback); an internal error keeps its traceback,
    being a bug."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("PREFTUNE_DEBUG", "") not in ("", "0")
    try:
        with signals_stop_at_once():
            return _run(args)
    except (Interrupted, Stopped) as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"preftune: {stop}", file=sys.stderr)
        return stop.status
    except KeyboardInterrupt:  # a Ctrl-C that Python delivered before preftune's handler
        print("preftune: stopped at once by SIGINT", file=sys.stderr)
        return 130
    except (PreftuneError, OSError) as error:
        if debug:
            raise
        print(f"preftune: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "data":
        overrides = [item for item in args.items if _OVERRIDE.match(item)]
        paths = [item for item in args.items if not _OVERRIDE.match(item)]
        training = [REGISTRY[name] for name in TRAINING]
        config = training_config(args.config, overrides, training)
        return run_data_check(config, paths, args.kind)
    command = REGISTRY[args.command]
    command.run(load_config(command.config, args.config, args.overrides))
    return 0


def _one_line(error: BaseException) -> str:
    """A preftune error as it is; an error of the machine (disk full, permissions) with the file
    it concerns."""
    if isinstance(error, OSError) and not isinstance(error, PreftuneError):
        what = error.strerror or str(error) or type(error).__name__
        return f"{what}: {error.filename}" if error.filename else what
    return str(error)
