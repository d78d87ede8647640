"""`deepseek-ee deploy`: autoscaled serving on Kubernetes, and the Grafana dashboard for it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import CommandError
from ._k8s_io import add_output_arguments, emit_or_apply

# CLI option -> ServingSpec field, for options whose default comes from the config file or ServingSpec.
_SPEC_OPTIONS = {
    "name": "name",
    "model": "model",
    "namespace": "namespace",
    "image": "image",
    "replicas": "replicas",
    "min_replicas": "min_replicas",
    "max_replicas": "max_replicas",
    "gpus": "gpus",
    "hpa_metric": "hpa_metric",
    "target_cpu_utilization": "target_cpu_utilization",
    "target_waiting": "target_waiting",
    "port": "port",
    "cpu": "cpu",
    "memory": "memory",
    "drain_seconds": "drain_seconds",
    "pre_stop_seconds": "pre_stop_seconds",
    "volume_claim": "volume_claim",
    "mount_path": "mount_path",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `deploy` subcommand."""
    parser = subparsers.add_parser(
        "deploy",
        help="serve a model on Kubernetes with autoscaling and monitoring; write the Grafana dashboard",
        description=(
            "Render (with --dry-run) or apply a Deployment running `deepseek-core serve`, a Service, a "
            "HorizontalPodAutoscaler, a PodDisruptionBudget and a Prometheus Operator ServiceMonitor. "
            "--grafana-dashboard FILE writes the dashboard JSON, alone or together with a deployment."
        ),
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="EE YAML config whose `deploy` section gives defaults"
    )
    parser.add_argument(
        "--model", default=None, help="model URI or path as `deepseek-core serve --model` takes it"
    )
    parser.add_argument(
        "--name", default=None, help="name of the Deployment, Service, HPA, PDB and ServiceMonitor"
    )
    parser.add_argument("--namespace", default=None, help="namespace (default: default)")
    parser.add_argument("--image", default=None, help="container image with deepseek-ee installed")
    parser.add_argument("--replicas", type=int, default=None, help="initial replicas (default: 1)")
    parser.add_argument(
        "--min-replicas", type=int, default=None, help="autoscaler minimum (default: --replicas)"
    )
    parser.add_argument(
        "--max-replicas", type=int, default=None, help="autoscaler maximum (default: max(replicas, 4))"
    )
    parser.add_argument(
        "--gpus", type=int, default=None, help="GPUs per replica (nvidia.com/gpu limit; default: 0)"
    )
    parser.add_argument(
        "--hpa-metric", choices=("cpu", "waiting"), default=None,
        help="scale on CPU utilization, or on deepseek_requests_waiting per pod (via the Prometheus adapter)",
    )  # fmt: skip
    parser.add_argument(
        "--target-cpu-utilization", type=int, default=None, help="percent of requested CPU (default: 70)"
    )
    parser.add_argument(
        "--target-waiting", type=float, default=None, help="waiting requests per pod (default: 4)"
    )
    parser.add_argument("--port", type=int, default=None, help="server port (default: 8000)")
    parser.add_argument("--cpu", default=None, help="CPU request per replica (default: 2)")
    parser.add_argument("--memory", default=None, help="memory request and limit per replica (default: 8Gi)")
    parser.add_argument(
        "--drain-seconds",
        type=int,
        default=None,
        help="time allowed to finish requests on shutdown (default: 60)",
    )
    parser.add_argument(
        "--pre-stop-seconds", type=int, default=None, help="preStop sleep before SIGTERM (default: 10)"
    )
    parser.add_argument(
        "--volume-claim", default=None, help="PersistentVolumeClaim with the model, mounted read-only"
    )
    parser.add_argument(
        "--mount-path", default=None, help="where --volume-claim is mounted (default: /models)"
    )
    parser.add_argument(
        "--no-service-monitor", action="store_true", help="omit the ServiceMonitor (no Prometheus Operator)"
    )
    parser.add_argument(
        "--monitor-label", action="append", default=[], metavar="KEY=VALUE",
        help="label for the ServiceMonitor so that Prometheus selects it (e.g. release=prometheus); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--grafana-dashboard",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the Grafana dashboard JSON here",
    )
    add_output_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the dashboard if asked; render and print/apply the serving manifests if a model is given."""
    values = _config_defaults(args.config) if args.config else {}
    values.update(
        {
            field: getattr(args, option)
            for option, field in _SPEC_OPTIONS.items()
            if getattr(args, option) is not None
        }
    )
    wants_deployment = bool(values.get("model") or values.get("name"))
    if not wants_deployment and args.grafana_dashboard is None:
        raise CommandError(
            "nothing to do: give --model and --name to deploy, and/or --grafana-dashboard FILE", exit_code=2
        )

    spec = None
    if wants_deployment:
        for required in ("model", "name"):
            if not values.get(required):
                raise CommandError(
                    f"--{required} is required to deploy (or set deploy.{required} in --config)", exit_code=2
                )
        spec = _serving_spec(values, args)

    if args.grafana_dashboard is not None:
        from ..grafana import write_dashboard

        try:
            write_dashboard(args.grafana_dashboard)
        except OSError as exc:
            raise CommandError(f"--grafana-dashboard {args.grafana_dashboard}: cannot write: {exc}") from None
        print(f"wrote Grafana dashboard to {args.grafana_dashboard}", file=sys.stderr)

    if spec is None:
        return 0
    from ..k8s.serving import render_serving

    return emit_or_apply(render_serving(spec), args)


def _config_defaults(path: Path) -> dict[str, Any]:
    from ..config import load_ee_config

    config = load_ee_config(path)
    deploy = config.deploy
    values: dict[str, Any] = {
        "namespace": deploy.namespace or config.kubernetes.namespace,
        "image": deploy.image or config.kubernetes.image,
        "replicas": deploy.replicas,
        "gpus": deploy.gpus,
        "hpa_metric": deploy.hpa_metric,
        "target_cpu_utilization": deploy.target_cpu_utilization,
        "target_waiting": deploy.target_waiting,
    }
    for key in ("name", "model", "min_replicas", "max_replicas"):
        if getattr(deploy, key) is not None:
            values[key] = getattr(deploy, key)
    return values


def _serving_spec(values: dict[str, Any], args: argparse.Namespace) -> Any:
    from ..k8s.serving import ServingSpec

    monitor_labels = {}
    for item in args.monitor_label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--monitor-label: expected KEY=VALUE, got {item!r}", exit_code=2)
        monitor_labels[key] = value
    try:
        return ServingSpec(
            **values, service_monitor=not args.no_service_monitor, monitor_labels=monitor_labels
        )
    except ValueError as exc:
        # ServingSpec names its field ("min_replicas: ..."); speak in terms of the option.
        field, _, why = str(exc).partition(": ")
        raise CommandError(f"--{field.replace('_', '-')}: {why}", exit_code=2) from None
