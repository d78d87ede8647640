"""The `deepseek-cne` console command: a thin dispatcher over deepseek_cne.commands.<name>.register()."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from . import __version__

# Each name is a module deepseek_cne.commands.<name> exposing register(subparsers).
COMMANDS = ("deploy", "pipeline", "serve")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="deepseek-cne",
        description="DeepSeek Cloud-Native Edition: Knative deployment, GPU-kind scheduling, Kubeflow pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"deepseek-cne {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"deepseek_cne.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the subcommand and return its exit status (1 with a one-line error on failure)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except (ValueError, OSError, RuntimeError, ImportError) as exc:
        print(f"deepseek-cne {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
