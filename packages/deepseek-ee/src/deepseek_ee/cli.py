"""`deepseek-ee` console script: a thin dispatcher over the subcommand modules in deepseek_ee.commands.

Each module ``deepseek_ee/commands/<name>.py`` (names starting with "_" excepted) exposes
``register(subparsers)``, which adds its parser and sets ``func`` (``args -> exit code``) as a default.
Modules are discovered, so adding a subcommand means adding a module; ``register`` must stay cheap
(heavy imports belong in the handler).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

from deepseek_core.errors import DeepSeekError

from . import __version__, commands
from .commands import CommandError

__all__ = ["build_parser", "discover_commands", "main"]


def discover_commands() -> list[ModuleType]:
    """The subcommand modules, in name order; a module without `register` is a bug and raises."""
    modules = []
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if not callable(getattr(module, "register", None)):
            raise TypeError(f"{module.__name__} has no register(subparsers) function")
        modules.append(module)
    return modules


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every discovered subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="deepseek-ee",
        description="DeepSeek Enterprise Edition: distributed training, compression and Kubernetes deployment.",
    )
    parser.add_argument("--version", action="version", version=f"deepseek-ee {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in discover_commands():
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the chosen subcommand and return its exit code (errors: a message, no traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"deepseek-ee {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except DeepSeekError as exc:  # ConfigError and friends name the file/field at fault
        print(f"deepseek-ee {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deepseek-ee {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
