"""Shared pieces of manifest rendering: labels, serialization with the kubernetes client, YAML/JSON output."""

from __future__ import annotations

import json
from typing import Any

import yaml
from kubernetes.client import ApiClient

__all__ = ["OUTPUT_FORMATS", "dump_manifests", "format_quantity", "standard_labels", "to_manifest"]

OUTPUT_FORMATS = ("yaml", "json")
MANAGED_BY = "deepseek-ee"

# One ApiClient is enough: sanitize_for_serialization is pure (no network, no configuration).
_API_CLIENT: ApiClient | None = None


def to_manifest(obj: Any) -> dict[str, Any]:
    """Serialize a kubernetes client model (or a dict holding models) to the plain camelCase dict of the API."""
    global _API_CLIENT
    if _API_CLIENT is None:
        _API_CLIENT = ApiClient()
    return _API_CLIENT.sanitize_for_serialization(obj)


def standard_labels(name: str, component: str) -> dict[str, str]:
    """The recommended app.kubernetes.io labels; `name` identifies this instance."""
    return {
        "app.kubernetes.io/name": "deepseek",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "deepseek",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def selector_labels(name: str, component: str) -> dict[str, str]:
    """The stable subset of labels used in selectors (immutable on Deployments and Jobs)."""
    labels = standard_labels(name, component)
    return {
        k: labels[k]
        for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")
    }


def format_quantity(value: float) -> str:
    """A Kubernetes quantity for a number: '4' for 4.0, '500m' for 0.5."""
    if float(value).is_integer():
        return str(int(value))
    return f"{round(value * 1000)}m"


class _BlockStyleDumper(yaml.SafeDumper):
    """Multi-line strings (a config file in a ConfigMap) as readable literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStyleDumper.add_representer(str, _represent_str)


def dump_manifests(manifests: list[dict[str, Any]], output: str = "yaml") -> str:
    """Multi-document YAML, or a JSON `v1/List` (what `kubectl apply -f` accepts either way)."""
    if output == "yaml":
        return yaml.dump_all(manifests, Dumper=_BlockStyleDumper, sort_keys=False, default_flow_style=False)
    if output == "json":
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}, indent=2) + "\n"
    raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {output!r}")
