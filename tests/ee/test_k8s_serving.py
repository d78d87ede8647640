"""`deepseek-ee deploy`: rendered serving manifests validate against Kubernetes / CRD schemas and work together."""

from __future__ import annotations

import copy
import json
import socket

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deepseek_ee.cli import main
from deepseek_ee.k8s import ServingSpec, render_serving
from k8s_validation import K8S_VERSION, by_kind, crd_validator, run_cli, validate_manifest

SPECS = {
    "cpu-default": dict(name="chat", model="/models/chat"),
    "gpu-waiting": dict(
        name="chat-gpu", model="deepseek-ai/deepseek-llm-7b-base", namespace="serving", gpus=2, replicas=2,
        min_replicas=2, max_replicas=8, hpa_metric="waiting", target_waiting=0.5, image="registry.local/ds:1",
    ),
    "pvc-monitor-labels": dict(
        name="coder", model="/models/coder-int8", volume_claim="models", monitor_labels={"release": "prometheus"},
        drain_seconds=120, pre_stop_seconds=15, cpu="500m", memory="12Gi", port=9000,
    ),
}  # fmt: skip


def _pod_labels(deployment):
    return deployment["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("case", SPECS)
def test_every_manifest_validates(case):
    manifests = render_serving(ServingSpec(**SPECS[case]))
    assert [m["kind"] for m in manifests] == [
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor",
    ]  # fmt: skip
    for manifest in manifests:
        validate_manifest(manifest)
    assert {m["apiVersion"] for m in manifests} == {
        "apps/v1", "v1", "autoscaling/v2", "policy/v1", "monitoring.coreos.com/v1",
    }  # fmt: skip


def test_validators_reject_broken_manifests():
    """Negative controls: the validation used above does refuse wrong objects."""
    manifests = by_kind(render_serving(ServingSpec(**SPECS["cpu-default"])))
    broken = copy.deepcopy(manifests["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = copy.deepcopy(manifests["HorizontalPodAutoscaler"])
    broken["spec"]["maxReplicas"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    monitor = manifests["ServiceMonitor"]
    for mutate in (
        lambda m: m["spec"]["endpoints"][0].__setitem__("interval", "15 seconds"),
        lambda m: m["spec"].pop("selector"),
        lambda m: m["spec"]["endpoints"][0].__setitem__("scheme", "ftp"),
        lambda m: m["spec"].__setitem__("endpoint", []),
    ):
        broken = copy.deepcopy(monitor)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            crd_validator("monitoring.coreos.com/v1", "ServiceMonitor").validate(broken)


@pytest.mark.parametrize("case", SPECS)
def test_objects_refer_to_each_other(case):
    spec = ServingSpec(**SPECS[case])
    m = by_kind(render_serving(spec))
    deployment, service, hpa, pdb, monitor = (
        m[k]
        for k in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor")
    )
    pod_labels = _pod_labels(deployment)
    assert _selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert _selects(service["spec"]["selector"], pod_labels)
    assert _selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [spec.namespace]
    for obj in m.values():
        assert obj["metadata"]["namespace"] == spec.namespace
    # The monitor scrapes a port the Service has, which targets the container's named port.
    port_names = {p["name"] for p in service["spec"]["ports"]}
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in container_ports
    assert container_ports[service["spec"]["ports"][0]["targetPort"]] == spec.port
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert monitor["metadata"]["labels"].items() >= spec.monitor_labels.items()


@pytest.mark.parametrize("case", SPECS)
def test_server_container_serves_drains_and_requests_resources(case):
    spec = ServingSpec(**SPECS[case])
    deployment = by_kind(render_serving(spec))["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == [
        "deepseek-core", "serve", "--model", spec.model, "--host", "0.0.0.0", "--port", str(spec.port),
    ]  # fmt: skip
    assert container["image"] == spec.image
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop == ["sleep", str(spec.pre_stop_seconds)]
    # Grace covers the preStop sleep plus the server's drain time.
    assert pod["terminationGracePeriodSeconds"] >= spec.pre_stop_seconds + spec.drain_seconds
    requests = container["resources"]["requests"]
    assert requests == {"cpu": spec.cpu, "memory": spec.memory}
    limits = container["resources"]["limits"]
    if spec.gpus:
        assert limits["nvidia.com/gpu"] == str(spec.gpus)
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert "nvidia.com/gpu" not in limits and "tolerations" not in pod
    if spec.volume_claim:
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == spec.volume_claim
        assert container["volumeMounts"][0] == {
            "mountPath": spec.mount_path,
            "name": "models",
            "readOnly": True,
        }
    assert deployment["spec"]["replicas"] == spec.replicas
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_hpa_scales_on_cpu_or_waiting_requests():
    cpu = by_kind(render_serving(ServingSpec(**SPECS["cpu-default"])))["HorizontalPodAutoscaler"]["spec"]
    assert (cpu["minReplicas"], cpu["maxReplicas"]) == (1, 4)
    assert cpu["metrics"] == [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
        }
    ]
    waiting = by_kind(render_serving(ServingSpec(**SPECS["gpu-waiting"])))["HorizontalPodAutoscaler"]["spec"]
    assert (waiting["minReplicas"], waiting["maxReplicas"]) == (2, 8)
    assert waiting["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "deepseek_requests_waiting"},
                "target": {"type": "AverageValue", "averageValue": "500m"},
            },
        }
    ]
    assert waiting["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60


def test_pdb_never_blocks_drains_of_a_single_replica():
    pdb = by_kind(render_serving(ServingSpec(**SPECS["cpu-default"])))["PodDisruptionBudget"]["spec"]
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb


def test_service_monitor_can_be_left_out():
    kinds = [m["kind"] for m in render_serving(ServingSpec(name="a", model="m", service_monitor=False))]
    assert "ServiceMonitor" not in kinds and "HorizontalPodAutoscaler" in kinds


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(name="Chat_1"), "name"),
        (dict(model=" "), "model"),
        (dict(replicas=0), "replicas"),
        (dict(min_replicas=3, max_replicas=2), "max_replicas"),
        (dict(replicas=5, min_replicas=1, max_replicas=4), "replicas"),
        (dict(gpus=-1), "gpus"),
        (dict(hpa_metric="memory"), "hpa_metric"),
        (dict(cpu="two"), "cpu"),
        (dict(scrape_interval="15 s"), "scrape_interval"),
        (dict(monitor_labels={"bad key": "x"}), "monitor_labels"),
    ],
)
def test_invalid_spec_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        ServingSpec(**{"name": "chat", "model": "m", **kwargs})


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_dry_run_yaml_is_the_rendered_manifests(capsys):
    code = main([
        "deploy", "--model", "deepseek-ai/deepseek-llm-7b-base", "--name", "chat-gpu", "--namespace", "serving",
        "--replicas", "2", "--min-replicas", "2", "--max-replicas", "8", "--gpus", "2", "--hpa-metric", "waiting",
        "--target-waiting", "0.5", "--image", "registry.local/ds:1", "--dry-run", "-o", "yaml",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    documents = list(yaml.safe_load_all(out))
    assert documents == render_serving(ServingSpec(**SPECS["gpu-waiting"]))
    for manifest in documents:
        validate_manifest(manifest)


def test_cli_dry_run_json_is_a_list(capsys):
    assert (
        main(["deploy", "--model", "m", "--name", "chat", "--no-service-monitor", "--dry-run", "-o", "json"])
        == 0
    )
    listing = json.loads(capsys.readouterr().out)
    assert listing["kind"] == "List"
    assert [i["kind"] for i in listing["items"]] == [
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ]
    for item in listing["items"]:
        validate_manifest(item)


def test_cli_takes_defaults_from_config_deploy_section(tmp_path, capsys):
    config = tmp_path / "ee.yaml"
    config.write_text(
        "kubernetes: {namespace: ml, image: registry.local/ee:2}\n"
        "deploy: {name: chat, model: /models/chat, replicas: 2, max_replicas: 6, hpa_metric: waiting}\n"
    )
    assert main(["deploy", "--config", str(config), "--max-replicas", "10", "--dry-run"]) == 0
    m = by_kind(list(yaml.safe_load_all(capsys.readouterr().out)))
    assert m["Deployment"]["metadata"]["namespace"] == "ml"
    assert m["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/ee:2"
    assert m["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 10  # the flag wins over the file
    assert m["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 2
    assert m["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["type"] == "Pods"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "m"], "--name is required"),
        (["--model", "m", "--name", "chat", "--min-replicas", "3", "--max-replicas", "2"], "--max-replicas"),
        (["--model", "m", "--name", "Chat"], "--name"),
        (["--model", "m", "--name", "chat", "--monitor-label", "release"], "--monitor-label"),
        ([], "nothing to do"),
    ],
)
def test_cli_usage_errors(argv, message, capsys):
    assert main(["deploy", *argv, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_deploy_without_cluster_exits_nonzero_with_clear_message(tmp_path):
    missing = tmp_path / "no-such-kubeconfig"
    result = run_cli("deploy", "--model", "m", "--name", "chat", env={"KUBECONFIG": str(missing)})
    assert result.returncode != 0
    assert "no Kubernetes cluster configured" in result.stderr
    assert str(missing) in result.stderr and "--dry-run" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_deploy_to_unreachable_cluster_exits_nonzero(tmp_path, monkeypatch, capsys):
    with socket.socket() as sock:  # a loopback port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}],
        })
    )  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["deploy", "--model", "m", "--name", "chat"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}" in err
