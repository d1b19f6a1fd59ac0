"""``preftune <command> [--config FILE] [key=value ...]``; user errors print as one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from preftune import __version__
from preftune.config import DPOConfig, SFTConfig, describe, load_config
from preftune.demo.settings import DemoConfig
from preftune.errors import PreftuneError

COMMANDS: dict[str, tuple[type, str]] = {
    "dpo": (DPOConfig, "align a model to preference pairs (DPO, IPO, SLiC, …)"),
    "sft": (SFTConfig, "supervised fine-tuning on prompt/completion or messages rows"),
    "demo": (DemoConfig, "the DPO paper's controlled-sentiment experiment, offline, in minutes"),
}


def key_table(config_class: type) -> str:
    rows = describe(config_class)
    width = max(len(key) for key, _, _ in rows)
    lines = [f"  {key:<{width}}  {help} (default: {default})" for key, default, help in rows]
    return "config keys (set in the YAML file or as key=value):\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune", description="Direct preference optimization for causal language models."
    )
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
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
    return parser


def _runner(command: str) -> Callable:
    # Imported lazily so that --help answers without loading torch and transformers.
    from preftune import commands
    from preftune.demo.pipeline import run_demo

    return {"dpo": commands.run_dpo, "sft": commands.run_sft, "demo": run_demo}[command]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config_class, _ = COMMANDS[args.command]
    try:
        config = load_config(config_class, args.config, args.overrides)
        _runner(args.command)(config)
    except PreftuneError as error:
        print(f"preftune: error: {error}", file=sys.stderr)
        return 2
    return 0
