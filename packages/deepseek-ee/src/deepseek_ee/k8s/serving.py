"""Autoscaled serving on Kubernetes: Deployment, Service, HPA (autoscaling/v2), PDB and ServiceMonitor.

The pods run ``deepseek-core serve``. Draining: on scale-in or rollout, the pod is first removed from the
Service endpoints; the preStop sleep keeps it serving while that propagates, then SIGTERM makes the server
finish in-flight requests. terminationGracePeriodSeconds covers both plus a margin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client

from ..config import DEFAULT_IMAGE, HPA_METRICS, is_dns_label, is_quantity
from .common import format_quantity, selector_labels, standard_labels, to_manifest

__all__ = ["WAITING_METRIC", "ServingSpec", "render_serving"]

WAITING_METRIC = "deepseek_requests_waiting"  # gauge exposed by deepseek-core serve, per pod
COMPONENT = "server"
PORT_NAME = "http"
_GRACE_MARGIN_S = 5
# The ServiceMonitor CRD's pattern for durations, and Kubernetes' label key/value syntax.
_DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


@dataclass
class ServingSpec:
    """What `deepseek-ee deploy` renders; validated on construction (ValueError naming the field)."""

    name: str
    model: str
    namespace: str = "default"
    image: str = DEFAULT_IMAGE
    replicas: int = 1
    min_replicas: int | None = None  # default: replicas
    max_replicas: int | None = None  # default: max(replicas, 4)
    gpus: int = 0
    hpa_metric: str = "cpu"
    target_cpu_utilization: int = 70
    target_waiting: float = 4.0
    port: int = 8000
    cpu: str = "2"
    memory: str = "8Gi"
    pre_stop_seconds: int = 10  # time for endpoint removal to reach every proxy before SIGTERM
    drain_seconds: int = 60  # time the server may take to finish in-flight requests after SIGTERM
    startup_seconds: int = 600  # model loading allowance before liveness checks begin
    volume_claim: str | None = None  # a PersistentVolumeClaim holding the model, mounted read-only
    mount_path: str = "/models"
    image_pull_policy: str = "IfNotPresent"
    service_monitor: bool = True
    monitor_labels: dict[str, str] = field(default_factory=dict)  # e.g. release: prometheus
    scrape_interval: str = "15s"

    def __post_init__(self) -> None:
        if self.min_replicas is None:
            self.min_replicas = self.replicas
        if self.max_replicas is None:
            self.max_replicas = max(self.replicas, self.min_replicas, 4)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field Kubernetes would refuse or that cannot work."""

        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ValueError(f"{name}: {why}, got {getattr(self, name)!r}")

        need(
            is_dns_label(self.name),
            "name",
            "must be a DNS label (lowercase a-z, 0-9, '-'; at most 63 characters)",
        )
        need(bool(self.model.strip()), "model", "must be a non-empty model URI or path")
        need(is_dns_label(self.namespace), "namespace", "must be a DNS label")
        need(bool(self.image.strip()), "image", "must be a non-empty image reference")
        need(self.replicas >= 1, "replicas", "must be >= 1")
        assert self.min_replicas is not None and self.max_replicas is not None
        need(self.min_replicas >= 1, "min_replicas", "must be >= 1")
        need(
            self.max_replicas >= self.min_replicas,
            "max_replicas",
            f"must be >= min_replicas ({self.min_replicas})",
        )
        need(
            self.min_replicas <= self.replicas <= self.max_replicas,
            "replicas",
            f"must be within [min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]",
        )
        need(self.gpus >= 0, "gpus", "must be >= 0")
        need(self.hpa_metric in HPA_METRICS, "hpa_metric", f"must be one of {', '.join(HPA_METRICS)}")
        need(1 <= self.target_cpu_utilization <= 100, "target_cpu_utilization", "must be in 1..100")
        need(self.target_waiting > 0, "target_waiting", "must be > 0")
        need(1 <= self.port <= 65535, "port", "must be a TCP port")
        need(is_quantity(self.cpu), "cpu", "must be a Kubernetes quantity such as 2 or 500m")
        need(is_quantity(self.memory), "memory", "must be a Kubernetes quantity such as 8Gi")
        need(self.pre_stop_seconds >= 0, "pre_stop_seconds", "must be >= 0")
        need(self.drain_seconds >= 1, "drain_seconds", "must be >= 1")
        need(self.startup_seconds >= 10, "startup_seconds", "must be >= 10")
        need(
            self.volume_claim is None or is_dns_label(self.volume_claim),
            "volume_claim",
            "must be a DNS label",
        )
        need(self.mount_path.startswith("/"), "mount_path", "must be an absolute path")
        need(
            self.image_pull_policy in ("Always", "IfNotPresent", "Never"),
            "image_pull_policy",
            "must be Always, IfNotPresent or Never",
        )
        need(
            bool(_DURATION.match(self.scrape_interval)),
            "scrape_interval",
            "must be a Prometheus duration such as 15s or 1m",
        )
        for key, value in self.monitor_labels.items():
            need(
                bool(_LABEL_KEY.match(key)) and bool(_LABEL_VALUE.match(value)),
                "monitor_labels",
                f"invalid label {key}={value}",
            )

    @property
    def termination_grace_seconds(self) -> int:
        """Long enough for the preStop sleep, the server's drain and a margin."""
        return self.pre_stop_seconds + self.drain_seconds + _GRACE_MARGIN_S


def render_serving(spec: ServingSpec) -> list[dict[str, Any]]:
    """Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget and (optionally) ServiceMonitor."""
    objects: list[Any] = [_deployment(spec), _service(spec), _hpa(spec), _pdb(spec)]
    if spec.service_monitor:
        objects.append(_service_monitor(spec))
    return [to_manifest(obj) for obj in objects]


def _metadata(spec: ServingSpec, extra_labels: dict[str, str] | None = None) -> client.V1ObjectMeta:
    labels = {**standard_labels(spec.name, COMPONENT), **(extra_labels or {})}
    return client.V1ObjectMeta(name=spec.name, namespace=spec.namespace, labels=labels)


def _selector(spec: ServingSpec) -> client.V1LabelSelector:
    return client.V1LabelSelector(match_labels=selector_labels(spec.name, COMPONENT))


def _container(spec: ServingSpec) -> client.V1Container:
    command = ["deepseek-core", "serve", "--model", spec.model, "--host", "0.0.0.0", "--port", str(spec.port)]
    limits: dict[str, str] = {"memory": spec.memory}
    if spec.gpus > 0:
        limits["nvidia.com/gpu"] = str(spec.gpus)
    mounts = None
    if spec.volume_claim:
        mounts = [client.V1VolumeMount(name="models", mount_path=spec.mount_path, read_only=True)]

    def http_get(path: str) -> client.V1HTTPGetAction:
        return client.V1HTTPGetAction(path=path, port=PORT_NAME)

    return client.V1Container(
        name="server",
        image=spec.image,
        image_pull_policy=spec.image_pull_policy,
        command=command,
        env=[client.V1EnvVar(name="PYTHONUNBUFFERED", value="1")],
        ports=[client.V1ContainerPort(name=PORT_NAME, container_port=spec.port, protocol="TCP")],
        resources=client.V1ResourceRequirements(
            requests={"cpu": spec.cpu, "memory": spec.memory}, limits=limits
        ),
        # Startup: model loading may take minutes; liveness starts only once this has passed.
        startup_probe=client.V1Probe(
            http_get=http_get("/health"),
            period_seconds=10,
            failure_threshold=max(1, spec.startup_seconds // 10),
        ),
        readiness_probe=client.V1Probe(
            http_get=http_get("/ready"), period_seconds=5, timeout_seconds=3, failure_threshold=2
        ),
        liveness_probe=client.V1Probe(
            http_get=http_get("/health"), period_seconds=10, timeout_seconds=5, failure_threshold=3
        ),
        lifecycle=client.V1Lifecycle(
            pre_stop=client.V1LifecycleHandler(
                _exec=client.V1ExecAction(command=["sleep", str(spec.pre_stop_seconds)])
            )
        ),
        volume_mounts=mounts,
    )


def _deployment(spec: ServingSpec) -> client.V1Deployment:
    volumes = None
    if spec.volume_claim:
        volumes = [
            client.V1Volume(
                name="models",
                persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                    claim_name=spec.volume_claim, read_only=True
                ),
            )
        ]
    tolerations = None
    if spec.gpus > 0:
        tolerations = [client.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    pod_spec = client.V1PodSpec(
        containers=[_container(spec)],
        termination_grace_period_seconds=spec.termination_grace_seconds,
        volumes=volumes,
        tolerations=tolerations,
        # Spread replicas over nodes so that one node's loss takes out as few as possible.
        topology_spread_constraints=[
            client.V1TopologySpreadConstraint(
                max_skew=1,
                topology_key="kubernetes.io/hostname",
                when_unsatisfiable="ScheduleAnyway",
                label_selector=_selector(spec),
            )
        ],
    )
    return client.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=_metadata(spec),
        spec=client.V1DeploymentSpec(
            replicas=spec.replicas,
            selector=_selector(spec),
            # Keep serving capacity during rollouts: add a new pod before removing an old one.
            strategy=client.V1DeploymentStrategy(
                type="RollingUpdate",
                rolling_update=client.V1RollingUpdateDeployment(max_surge=1, max_unavailable=0),
            ),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=standard_labels(spec.name, COMPONENT)), spec=pod_spec
            ),
        ),
    )


def _service(spec: ServingSpec) -> client.V1Service:
    return client.V1Service(
        api_version="v1",
        kind="Service",
        metadata=_metadata(spec),
        spec=client.V1ServiceSpec(
            type="ClusterIP",
            selector=selector_labels(spec.name, COMPONENT),
            ports=[
                client.V1ServicePort(name=PORT_NAME, port=spec.port, target_port=PORT_NAME, protocol="TCP")
            ],
        ),
    )


def _hpa(spec: ServingSpec) -> client.V2HorizontalPodAutoscaler:
    if spec.hpa_metric == "cpu":
        metric = client.V2MetricSpec(
            type="Resource",
            resource=client.V2ResourceMetricSource(
                name="cpu",
                target=client.V2MetricTarget(
                    type="Utilization", average_utilization=spec.target_cpu_utilization
                ),
            ),
        )
    else:
        # Served to the HPA by the Prometheus adapter (custom.metrics.k8s.io) from the pods' own gauge.
        metric = client.V2MetricSpec(
            type="Pods",
            pods=client.V2PodsMetricSource(
                metric=client.V2MetricIdentifier(name=WAITING_METRIC),
                target=client.V2MetricTarget(
                    type="AverageValue", average_value=format_quantity(spec.target_waiting)
                ),
            ),
        )
    behavior = client.V2HorizontalPodAutoscalerBehavior(
        scale_up=client.V2HPAScalingRules(
            stabilization_window_seconds=0,
            select_policy="Max",
            policies=[client.V2HPAScalingPolicy(type="Pods", value=2, period_seconds=60)],
        ),
        # Scale in slowly: a model replica is expensive to bring back.
        scale_down=client.V2HPAScalingRules(
            stabilization_window_seconds=300,
            select_policy="Max",
            policies=[client.V2HPAScalingPolicy(type="Pods", value=1, period_seconds=120)],
        ),
    )
    return client.V2HorizontalPodAutoscaler(
        api_version="autoscaling/v2",
        kind="HorizontalPodAutoscaler",
        metadata=_metadata(spec),
        spec=client.V2HorizontalPodAutoscalerSpec(
            scale_target_ref=client.V2CrossVersionObjectReference(
                api_version="apps/v1", kind="Deployment", name=spec.name
            ),
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
            metrics=[metric],
            behavior=behavior,
        ),
    )


def _pdb(spec: ServingSpec) -> client.V1PodDisruptionBudget:
    # maxUnavailable (not minAvailable) so that a single replica never blocks node drains forever.
    return client.V1PodDisruptionBudget(
        api_version="policy/v1",
        kind="PodDisruptionBudget",
        metadata=_metadata(spec),
        spec=client.V1PodDisruptionBudgetSpec(max_unavailable=1, selector=_selector(spec)),
    )


def _service_monitor(spec: ServingSpec) -> dict[str, Any]:
    meta = _metadata(spec, spec.monitor_labels)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": selector_labels(spec.name, COMPONENT)},
            "namespaceSelector": {"matchNames": [spec.namespace]},
            "endpoints": [
                {"port": PORT_NAME, "path": "/metrics", "scheme": "http", "interval": spec.scrape_interval}
            ],
        },
    }
