"""Apply rendered manifests to the current Kubernetes cluster (server-side apply)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FIELD_MANAGER = "deepseek-cne"


def apply_manifests(objects: Sequence[dict[str, Any]], context: str | None = None) -> list[str]:
    """Server-side apply each object; return 'kind/name' for each. Uses the in-cluster config inside a pod
    (a Kubeflow step), else the kubeconfig (`context` picks one of its contexts)."""
    try:
        from kubernetes import client, config, dynamic
    except ImportError:  # pragma: no cover - kubernetes is a dependency of deepseek-cne
        raise RuntimeError(
            "applying manifests needs the kubernetes package: pip install kubernetes"
        ) from None
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config(context=context)
        except config.ConfigException as exc:
            raise RuntimeError(
                f"no Kubernetes cluster configured ({exc}); use --dry-run to print manifests"
            ) from None
    api = dynamic.DynamicClient(client.ApiClient())
    applied = []
    for obj in objects:
        resource = api.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        api.server_side_apply(
            resource,
            body=obj,
            namespace=obj["metadata"].get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )
        applied.append(f"{obj['kind']}/{obj['metadata']['name']}")
    return applied
