"""``preftune <command> [--config FILE] [key=value ...]``; user errors print as one line."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable

from preftune import __version__
from preftune.config import (
    DPOConfig,
    KTOConfig,
    RMConfig,
    SFTConfig,
    SPINConfig,
    describe,
    given_keys,
    load_config,
)
from preftune.demo.settings import DemoConfig
from preftune.errors import PreftuneError
from preftune.models.reward_settings import ScoreConfig
from preftune.train.interrupt import Interrupted, Stopped, signals_stop_at_once

COMMANDS: dict[str, tuple[type, str]] = {
    "dpo": (DPOConfig, "align a model to preference pairs (DPO, IPO, SLiC, …)"),
    "sft": (SFTConfig, "supervised fine-tuning on prompt/completion or messages rows"),
    "kto": (KTOConfig, "align a model to completions judged desirable or not (KTO)"),
    "spin": (SPINConfig, "self-play fine-tuning: SFT data against the model's own completions"),
    "rm": (RMConfig, "train a reward model on pairs (Bradley–Terry) or rankings (Plackett–Luce)"),
    "score": (ScoreConfig, "score prompt/completion rows or pairs with a trained reward model"),
    "demo": (DemoConfig, "the DPO paper's controlled-sentiment experiment, offline, in minutes"),
}
DATA_CHECK = "read datasets exactly as training would: every bad row, token lengths, duplicates"
DATA_CHECK_USAGE = """\
Each PATH (default: data.train and data.eval) is read, validated and tokenized with the
tokenizer of model.path and the data.* settings, as the training commands would: the same
--config file works. Prints a summary per dataset on stdout and one line per problem on stderr;
exits 0 when no problem was found, 1 when some were, 2 on an error that stops the check.
"""
# Commands whose config has model.* and data.* keys, most general first.
TRAINING_COMMANDS = ("dpo", "kto", "spin", "rm", "sft")
# ``key=value`` where the key is a dotted config name; anything else is a dataset path.
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def key_table(config_class: type, prefixes: tuple[str, ...] = ()) -> str:
    rows = [row for row in describe(config_class) if row[0].startswith(prefixes or "")]
    width = max(len(key) for key, _, _ in rows)
    lines = [f"  {key:<{width}}  {help} (default: {default})" for key, default, help in rows]
    return "config keys (set in the YAML file or as key=value):\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune", description="Direct preference optimization for causal language models."
    )
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (or PREFTUNE_DEBUG=1)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config_class, summary) in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=key_table(config_class),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--config", metavar="FILE", help="YAML config file")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="override a config key")
    _add_data_parser(commands)
    return parser


def _add_data_parser(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="check a dataset", description="Dataset tools.")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help=DATA_CHECK,
        description=f"{DATA_CHECK}.\n\n{DATA_CHECK_USAGE}",
        epilog=key_table(DPOConfig, ("model.", "data.")),
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


def _runner(command: str) -> Callable:
    # Imported lazily so that --help answers without loading torch and transformers.
    from preftune import commands
    from preftune.demo.pipeline import run_demo
    from preftune.scoring import run_score
    from preftune.spin.pipeline import run_spin

    return {
        "dpo": commands.run_dpo,
        "sft": commands.run_sft,
        "kto": commands.run_kto,
        "spin": run_spin,
        "rm": commands.run_rm,
        "score": run_score,
        "demo": run_demo,
    }[command]


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
        return _data_check(args)
    config_class, _ = COMMANDS[args.command]
    config = load_config(config_class, args.config, args.overrides)
    _runner(args.command)(config)
    return 0


def _one_line(error: BaseException) -> str:
    """A preftune error as it is; an error of the machine (disk full, permissions) with the file
    it concerns."""
    if isinstance(error, OSError) and not isinstance(error, PreftuneError):
        what = error.strerror or str(error) or type(error).__name__
        return f"{what}: {error.filename}" if error.filename else what
    return str(error)


def _data_check(args: argparse.Namespace) -> int:
    from preftune.commands import run_data_check

    overrides = [item for item in args.items if _OVERRIDE.match(item)]
    paths = [item for item in args.items if not _OVERRIDE.match(item)]
    return run_data_check(_any_training_config(args.config, overrides), paths, args.kind)


def _any_training_config(path: str | None, overrides: list[str]):
    """The config of the training command whose sections hold every key given: ``data check``
    takes the same --config file as dpo, sft, kto, spin or rm, and reads its model.* and data.*
    keys. Keys no command knows are reported against dpo's config."""
    sections = {key.split(".")[0] for key in given_keys(path, overrides)}
    for name in TRAINING_COMMANDS:
        config_class = COMMANDS[name][0]
        if sections <= {f.name for f in dataclasses.fields(config_class)}:
            return load_config(config_class, path, overrides)
    return load_config(DPOConfig, path, overrides)
