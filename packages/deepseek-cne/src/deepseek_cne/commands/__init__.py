"""Subcommands of `deepseek-cne`: each module exposes register(subparsers)."""
