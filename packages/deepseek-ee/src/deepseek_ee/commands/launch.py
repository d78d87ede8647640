"""`deepseek-ee launch`: run the training of an EE config as a multi-node job on Kubernetes."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ._k8s_io import add_output_arguments, emit_or_apply


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `launch` subcommand."""
    parser = subparsers.add_parser(
        "launch",
        help="run `deepseek-ee train` for a config on Kubernetes (PyTorchJob or Indexed Job)",
        description=(
            "Render (with --dry-run) or apply a multi-node training job for an EE config: a ConfigMap holding "
            "the config plus a Kubeflow PyTorchJob (Master + Workers) or an Indexed Job with a headless "
            "Service for rendezvous. Each pod is one node with distributed.gpus GPUs."
        ),
    )
    parser.add_argument("--config", required=True, type=Path, help="EE YAML config (see deepseek_ee.config)")
    parser.add_argument(
        "--kind", choices=("pytorchjob", "indexed-job"), default="pytorchjob",
        help="pytorchjob needs the Kubeflow training operator; indexed-job needs only Kubernetes >= 1.24",
    )  # fmt: skip
    parser.add_argument("--name", default=None, help="job name (default: kubernetes.name from the config)")
    parser.add_argument("--namespace", default=None, help="namespace (default: kubernetes.namespace)")
    parser.add_argument("--image", default=None, help="container image (default: kubernetes.image)")
    add_output_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load and validate the config, render the job, then print or apply it."""
    from deepseek_core.errors import ConfigError

    from ..config import load_ee_config
    from ..k8s.training import render_training

    config = load_ee_config(args.config)
    overrides = {
        key: value
        for key, value in (("name", args.name), ("namespace", args.namespace), ("image", args.image))
        if value
    }
    if overrides:
        config.kubernetes = dataclasses.replace(config.kubernetes, **overrides)
        try:
            config.kubernetes.validate("kubernetes")
        except ValueError as exc:
            raise ConfigError(f"command line: --{str(exc).removeprefix('kubernetes.')}") from None
    manifests = render_training(config, args.config.read_text(encoding="utf-8"), kind=args.kind)
    return emit_or_apply(manifests, args)
