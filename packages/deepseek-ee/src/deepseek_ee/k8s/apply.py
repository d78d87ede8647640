"""Apply rendered manifests to the cluster of the current kubeconfig (server-side apply)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["ClusterUnavailableError", "apply_manifests", "connect"]

FIELD_MANAGER = "deepseek-ee"


class ClusterUnavailableError(RuntimeError):
    """No cluster configured, or the configured API server cannot be reached or refuses the request."""


def connect(context: str | None = None) -> Any:
    """An ApiClient for the current kubeconfig (or the in-cluster service account); clear error otherwise."""
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    # Read KUBECONFIG now: the client library reads it once, at import.
    kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    from kubernetes.client import ApiClient, Configuration

    try:
        configuration = Configuration()
        config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration, persist_config=False
        )
        # Fail fast instead of urllib3's default retries against a server that is not there.
        configuration.retries = 0
        return ApiClient(configuration=configuration)
    except (ConfigException, OSError, TypeError, ValueError) as exc:
        kube_error = exc
    # Inside a pod there is no kubeconfig but a service account.
    try:
        configuration = Configuration()
        config.load_incluster_config(client_configuration=configuration)
        configuration.retries = 0
        return ApiClient(configuration=configuration)
    except ConfigException:
        pass
    raise ClusterUnavailableError(
        f"no Kubernetes cluster configured: cannot load kubeconfig {kubeconfig!r} ({kube_error}) and not running "
        "inside a cluster. Set KUBECONFIG to a valid kubeconfig, or pass --dry-run to print the manifests instead."
    )


def apply_manifests(manifests: list[dict[str, Any]], api_client: Any) -> list[str]:
    """Server-side apply each manifest in order; returns 'kind/name' of each applied object."""
    import urllib3
    from kubernetes.client.exceptions import ApiException
    from kubernetes.dynamic import DynamicClient
    from kubernetes.dynamic.exceptions import DynamicApiError, ResourceNotFoundError

    host = getattr(api_client.configuration, "host", "?")
    try:
        dynamic = DynamicClient(api_client)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise ClusterUnavailableError(f"cannot reach the Kubernetes API server at {host}: {exc}") from None
    except (ApiException, DynamicApiError) as exc:
        raise ClusterUnavailableError(
            f"the Kubernetes API server at {host} refused discovery: {_reason(exc)}"
        ) from None

    applied = []
    for manifest in manifests:
        kind, api_version = manifest["kind"], manifest["apiVersion"]
        name = manifest["metadata"]["name"]
        try:
            resource = dynamic.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            raise ClusterUnavailableError(
                f"the cluster at {host} has no {kind} ({api_version}) API; install the operator that provides it "
                "(Prometheus Operator for ServiceMonitor, Kubeflow training operator for PyTorchJob) or render "
                "without it"
            ) from None
        try:
            resource.server_side_apply(
                body=manifest,
                name=name,
                namespace=manifest["metadata"].get("namespace"),
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ClusterUnavailableError(
                f"cannot reach the Kubernetes API server at {host}: {exc}"
            ) from None
        except (ApiException, DynamicApiError) as exc:
            raise ClusterUnavailableError(f"applying {kind}/{name} failed: {_reason(exc)}") from None
        applied.append(f"{kind.lower()}/{name}")
    return applied


def _reason(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None) or str(exc)
    return f"HTTP {status}: {reason}" if status else str(reason)
