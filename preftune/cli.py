"""``preftune <command> [--config FILE] [key=value ...]``; user errors print as one line.

Building the parser imports the commands' configs, not the commands (:mod:`preftune.commands`):
``--help`` and config errors take a fraction of a second; torch loads once a command runs.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import sys

from preftune import __version__
from preftune.commands import REGISTRY, TRAINING
from preftune.commands.configs import RunConfig
from preftune.config import describe, load_config, option_hint
from preftune.errors import PreftuneError
from preftune.progress import logger
from preftune.train.interrupt import Interrupted, Stopped, signals_stop_at_once

DATA_CHECK = "data check"
DATA_CHECK_USAGE = """\
Each PATH (default: data.train and data.eval) is read, validated and tokenized with the
tokenizer of model.path and the data.* settings, as the training commands would: the same
--config file works. Prints a summary per dataset on stdout and one line per problem on stderr;
exits 0 when no problem was found, 1 when some were, 2 on an error that stops the check.
"""
EXPORT = "export"
EXPORT_USAGE = """\
CHECKPOINT_DIR is a checkpoint of a run (its OUTPUT_DIR/checkpoints/step-N). A checkpoint of
full weights written by one process or DDP is a model directory already; one of LoRA or QLoRA
adapters, FSDP2 shards or DeepSpeed partitions is not. Either way, the run's config (the
preftune_config.yaml in OUTPUT_DIR) rebuilds the model as the run built it, the checkpoint's
weights are loaded into it (adapters merged into the full-precision base, shards gathered), and
OUT_DIR, new or empty, gets the model and its tokenizer: from_pretrained and model= read it.
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
        if command.name in (DATA_CHECK, EXPORT):
            continue
        sub = commands.add_parser(
            command.name,
            help=_literal(command.summary),
            description=command.summary,
            epilog=key_table(command.config),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--config", metavar="FILE", help="YAML config file")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="override a config key")
        if issubclass(command.config, RunConfig):
            sub.add_argument(
                "--quiet",
                action="store_true",
                help="no progress bar or step lines: only warnings, errors and the final summary "
                "(log.format=quiet)",
            )
    _add_data_parser(commands)
    _add_export_parser(commands)
    return parser


def _add_data_parser(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="check a dataset", description="Dataset tools.")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    summary = REGISTRY[DATA_CHECK].summary
    check = actions.add_parser(
        "check",
        help=_literal(summary),
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


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    summary = REGISTRY[EXPORT].summary
    export = commands.add_parser(
        EXPORT,
        help=_literal(summary),
        description=f"{summary}.\n\n{EXPORT_USAGE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="the checkpoint to export")
    export.add_argument("output", metavar="OUT_DIR", help="the model directory to write")


def _literal(text: str) -> str:
    """``text`` as argparse help shows it: argparse formats help with ``%`` (``95%`` would fail)."""
    return text.replace("%", "%%")


def run() -> None:
    """The command line's entry point: :func:`main`, then exit with its status. The processes of
    a multi-process run wait for each other, then leave at once, without tearing down their
    process group or running the interpreter's teardown: gloo can hang or abort there
    (``terminate called without an active exception``) after a run that succeeded."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A job log holds stdout and stderr in one file: flushed line by line, they keep order.
        sys.stdout.reconfigure(line_buffering=True)
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
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        parser.exit(2, f"preftune: error: {_unknown_arguments(args, extras, argv)}\n")
    debug = args.debug or os.environ.get("PREFTUNE_DEBUG", "") not in ("", "0")
    _log_to_stderr()
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


def _unknown_arguments(args: argparse.Namespace, extras: list[str], argv: list[str] | None) -> str:
    """One line on arguments no parser took: an option such as ``--max_steps 1``, a habit of
    other trainers' command lines, names the config key to set instead (``train.max_steps=1``)."""
    option = next((extra for extra in extras if extra.startswith("--")), None)
    if option is None or args.command == EXPORT:
        return f"unrecognized arguments: {' '.join(extras)}"
    name, sep, value = option.removeprefix("--").partition("=")
    given = sys.argv[1:] if argv is None else argv
    following = given[given.index(option) + 1 :] if option in given else []
    if not sep:
        value = following[0] if following and not following[0].startswith("-") else "VALUE"
    config = REGISTRY[TRAINING[0] if args.command == "data" else args.command].config
    return f"{option}: {option_hint(config, name, value)}"


def _run(args: argparse.Namespace) -> int:
    if args.command == "data":
        from preftune.commands.data_check import run_data_check, training_config

        overrides = [item for item in args.items if _OVERRIDE.match(item)]
        paths = [item for item in args.items if not _OVERRIDE.match(item)]
        training = [REGISTRY[name] for name in TRAINING]
        config = training_config(args.config, overrides, training)
        return run_data_check(config, paths, args.kind)
    if args.command == EXPORT:
        REGISTRY[EXPORT].run(args.checkpoint, args.output)
        return 0
    command = REGISTRY[args.command]
    quiet = ["log.format=quiet"] if getattr(args, "quiet", False) else []
    config = load_config(command.config, args.config, [*args.overrides, *quiet])
    if isinstance(config, RunConfig):
        # Imported with the run, as its runner is: it loads transformers, which --help need not.
        from preftune.commands.common import use_log_settings

        use_log_settings(config.log)
    command.run(config)
    return 0


def _log_to_stderr() -> None:
    """The ``preftune`` logger's records (progress lines, run summaries) as plain messages on
    stderr, unless a host application routes them already: a handler on the root or
    ``preftune`` logger."""
    if logging.getLogger().handlers or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _one_line(error: BaseException) -> str:
    """A preftune error as it is; an error of the machine (disk full, permissions) with the file
    it concerns."""
    if isinstance(error, OSError) and not isinstance(error, PreftuneError):
        what = error.strerror or str(error) or type(error).__name__
        return f"{what}: {error.filename}" if error.filename else what
    return str(error)
