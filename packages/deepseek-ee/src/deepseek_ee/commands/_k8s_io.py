"""Shared by `launch` and `deploy`: print manifests (dry run) or apply them to the current cluster."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import CommandError


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--dry-run, -o/--output and --context."""
    parser.add_argument("--dry-run", action="store_true", help="print the manifests instead of applying them")
    parser.add_argument(
        "-o", "--output", choices=("yaml", "json"), default="yaml", help="manifest format (default: yaml)"
    )
    parser.add_argument(
        "--context", default=None, help="kubeconfig context to apply to (default: the current one)"
    )


def emit_or_apply(manifests: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """Print the manifests when --dry-run, else server-side apply them to the kubeconfig's cluster."""
    from ..k8s.common import dump_manifests

    if args.dry_run:
        sys.stdout.write(dump_manifests(manifests, args.output))
        return 0
    from ..k8s.apply import ClusterUnavailableError, apply_manifests, connect

    try:
        api_client = connect(args.context)
        applied = apply_manifests(manifests, api_client)
    except ClusterUnavailableError as exc:
        raise CommandError(str(exc), exit_code=1) from None
    for name in applied:
        print(f"{name} applied", file=sys.stderr)
    return 0
