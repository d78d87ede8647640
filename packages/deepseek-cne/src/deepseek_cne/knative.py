"""Knative Serving manifests: a scale-to-zero Service for one model, and gVisor's RuntimeClass.

The Service runs ``deepseek-core serve`` (the OpenAI-compatible server) on the port Knative routes to, with
the Knative Pod Autoscaler scaling on in-flight requests (concurrency). Three Knative feature flags of the
``config-features`` ConfigMap (namespace knative-serving) must be enabled for the scheduling fields used here:
``kubernetes.podspec-affinity`` (GPU kind), ``kubernetes.podspec-runtimeclassname`` (gVisor) and, for
``--secret``, nothing extra. ``feature_flags_configmap()`` renders that ConfigMap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .gpu import GIB, GPU_RESOURCE, GpuChoice

SERVING_API = "serving.knative.dev/v1"
RUNTIME_CLASS_API = "node.k8s.io/v1"
KPA_CLASS = "kpa.autoscaling.knative.dev"
FEATURE_FLAGS = {
    "kubernetes.podspec-affinity": "enabled",
    "kubernetes.podspec-runtimeclassname": "enabled",
}
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DURATION = re.compile(r"^(\d+(\.\d+)?(h|m|s|ms))+$")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
MAX_CONTAINER_CONCURRENCY = 1000  # Knative's limit (config-defaults: container-concurrency-max-limit)
MAX_SCALE_DOWN_DELAY_S = 3600.0  # Knative refuses a scale-down-delay over one hour


@dataclass
class ServiceSpec:
    """What `render_service` needs; `validate()` names the option at fault."""

    name: str
    model: str
    image: str
    namespace: str = "default"
    dtype: str = "bfloat16"
    min_scale: int = 0
    max_scale: int = 4
    target: int = 32
    container_concurrency: int = 64
    scale_down_delay: str = "5m"
    sandbox: bool = True
    runtime_class: str = "gvisor"
    gpu: GpuChoice | None = None  # None: CPU only
    gpu_label_scheme: str = "nvidia"
    port: int = 8080
    env: dict[str, str] = field(default_factory=dict)
    secret: str | None = None  # Secret with storage credentials (AWS_*, GOOGLE_*), loaded as env
    timeout_seconds: int = 600
    weight_bytes: int = 0  # sizes the memory request

    def validate(self) -> None:
        """Raise ValueError naming the field when a value cannot render a valid Service."""
        if not _DNS_1035.match(self.name) or len(self.name) > 63:
            raise ValueError(
                f"--name: {self.name!r} must be a DNS-1035 label (lowercase letters, digits, '-', starting with a "
                "letter, at most 63 characters)"
            )
        if not _DNS_1035.match(self.namespace) or len(self.namespace) > 63:
            raise ValueError(f"--namespace: {self.namespace!r} must be a DNS label")
        if not self.model:
            raise ValueError("--model: required")
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"--image: {self.image!r} is not an image reference")
        if self.min_scale < 0:
            raise ValueError(f"--min-scale: must be >= 0, got {self.min_scale}")
        if self.max_scale < 1 or self.max_scale < self.min_scale:
            raise ValueError(
                f"--max-scale: must be >= 1 and >= --min-scale ({self.min_scale}), got {self.max_scale}"
            )
        if not 0 <= self.container_concurrency <= MAX_CONTAINER_CONCURRENCY:
            raise ValueError(
                f"--container-concurrency: must be in [0, {MAX_CONTAINER_CONCURRENCY}] (0 = unlimited), "
                f"got {self.container_concurrency}"
            )
        if self.target < 1:
            raise ValueError(f"--target: must be >= 1, got {self.target}")
        if self.container_concurrency and self.target > self.container_concurrency:
            raise ValueError(
                f"--target: {self.target} exceeds --container-concurrency {self.container_concurrency} "
                "(a pod never receives more requests than its container concurrency)"
            )
        delay = parse_duration(self.scale_down_delay, "--scale-down-delay")
        if delay > MAX_SCALE_DOWN_DELAY_S:
            raise ValueError(f"--scale-down-delay: at most 1h, got {self.scale_down_delay!r}")
        if self.sandbox and not _DNS_1035.match(self.runtime_class):
            raise ValueError(f"--runtime-class: {self.runtime_class!r} must be a DNS label")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port: must be a TCP port, got {self.port}")
        for key in self.env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"--env: {key!r} is not a valid environment variable name")


def parse_duration(text: str, option: str) -> float:
    """Seconds in a Go duration such as '5m', '90s', '1h30m'; ValueError naming `option` otherwise."""
    if not _DURATION.match(text):
        raise ValueError(f"{option}: {text!r} is not a duration (use e.g. 30s, 5m, 1h)")
    return sum(float(n) * _DURATION_UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)(h|ms|m|s)", text))


def _quantity_gi(num_bytes: float) -> str:
    return f"{max(1, math.ceil(num_bytes / GIB))}Gi"


def render_service(spec: ServiceSpec) -> dict[str, Any]:
    """The Knative Service (serving.knative.dev/v1) serving `spec.model`."""
    spec.validate()
    labels = {
        "app.kubernetes.io/name": "deepseek",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": "inference",
        "app.kubernetes.io/managed-by": "deepseek-cne",
    }
    annotations = {
        "autoscaling.knative.dev/class": KPA_CLASS,
        "autoscaling.knative.dev/metric": "concurrency",
        "autoscaling.knative.dev/target": str(spec.target),
        "autoscaling.knative.dev/min-scale": str(spec.min_scale),
        "autoscaling.knative.dev/max-scale": str(spec.max_scale),
        "autoscaling.knative.dev/scale-down-delay": spec.scale_down_delay,
    }
    args = [
        "--model", spec.model,
        "--host", "0.0.0.0",
        "--port", str(spec.port),
        "--dtype", spec.dtype,
        "--served-model-name", spec.name,
    ]  # fmt: skip
    if spec.container_concurrency:
        args += ["--max-num-seqs", str(spec.container_concurrency)]
    env = [{"name": "DEEPSEEK_CACHE", "value": "/tmp/deepseek-cache"}]
    env += [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    # Host memory: the weights pass through RAM on their way to the GPU (or stay there on CPU).
    host_bytes = spec.weight_bytes * (1.0 if spec.gpu else 1.2) + 2 * GIB
    resources: dict[str, Any] = {
        "requests": {
            "cpu": str(max(2, 4 * (spec.gpu.count if spec.gpu else 0))),
            "memory": _quantity_gi(host_bytes),
        },
        "limits": {"memory": _quantity_gi(host_bytes)},
    }
    container: dict[str, Any] = {
        "name": "model",
        "image": spec.image,
        "command": ["deepseek-core", "serve"],
        "args": args,
        "ports": [{"name": "http1", "containerPort": spec.port, "protocol": "TCP"}],
        "env": env,
        "resources": resources,
        # No periodSeconds: Knative's queue-proxy then probes aggressively, which is what makes cold starts short.
        # No liveness probe: loading a large model takes longer than any fixed liveness budget.
        "readinessProbe": {"httpGet": {"path": "/ready"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if spec.secret:
        container["envFrom"] = [{"secretRef": {"name": spec.secret}}]
    pod: dict[str, Any] = {
        "containerConcurrency": spec.container_concurrency,
        "timeoutSeconds": spec.timeout_seconds,
        "containers": [container],
    }
    if spec.gpu is not None:
        resources["requests"][GPU_RESOURCE] = str(spec.gpu.count)
        resources["limits"][GPU_RESOURCE] = str(spec.gpu.count)
        pod["affinity"] = spec.gpu.node_affinity(spec.gpu_label_scheme)
        annotations["deepseek.ai/gpu"] = f"{spec.gpu.count}x{spec.gpu.kind}"
    if spec.sandbox:
        pod["runtimeClassName"] = spec.runtime_class
    return {
        "apiVersion": SERVING_API,
        "kind": "Service",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": dict(labels)},
        "spec": {
            "template": {
                "metadata": {"labels": dict(labels), "annotations": annotations},
                "spec": pod,
            },
            "traffic": [{"latestRevision": True, "percent": 100}],
        },
    }


def render_runtime_class(name: str = "gvisor", handler: str = "runsc") -> dict[str, Any]:
    """The RuntimeClass (node.k8s.io/v1) that runs sandboxed tenants' pods under gVisor's runsc."""
    if not _DNS_1035.match(name):
        raise ValueError(f"--runtime-class: {name!r} must be a DNS label")
    if not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", handler):
        raise ValueError(f"--runtime-handler: {handler!r} must be a DNS label (the CRI handler name)")
    return {
        "apiVersion": RUNTIME_CLASS_API,
        "kind": "RuntimeClass",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "deepseek-cne"}},
        "handler": handler,
    }


def feature_flags_configmap() -> dict[str, Any]:
    """Knative's config-features ConfigMap enabling the pod-spec fields the Service uses."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "config-features", "namespace": "knative-serving"},
        "data": dict(FEATURE_FLAGS),
    }
