"""Subcommands of `deepseek-ee`: one module per subcommand, each exposing ``register(subparsers)``.

``register`` adds a parser to the argparse sub-parsers and sets ``func=handler`` where
``handler(args: argparse.Namespace) -> int`` returns the exit code. A handler reports a user-facing
failure by raising ``CommandError`` (message, exit code); ``deepseek_core`` errors such as ConfigError are
reported the same way by the dispatcher (exit code 2).
"""

from __future__ import annotations

__all__ = ["CommandError"]


class CommandError(Exception):
    """A failure to report to the user as one line, with the process exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
