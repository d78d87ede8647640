"""`deepseek-cne deploy`: the rendered Knative Service against the CRD schema, core objects against
Kubernetes' own schemas (kubernetes-validate), GPU placement from the model's config.json."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deepseek_cne.cli import main
from deepseek_core import storage

SCHEMA = json.loads((Path(__file__).parent / "schemas" / "knative-service.json").read_text())
K8S_VERSION = "1.30.0"
# Fields of Knative's RevisionSpec that a core/v1 PodSpec does not have.
KNATIVE_ONLY = ("containerConcurrency", "timeoutSeconds", "idleTimeoutSeconds", "responseStartTimeoutSeconds")


def deploy(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    assert main(["deploy", *args, "--dry-run", "-o", "yaml"]) == 0
    return [doc for doc in yaml.safe_load_all(capsys.readouterr().out) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, [o["kind"] for o in objects]
    return found[0]


def as_pod(service: dict[str, Any]) -> dict[str, Any]:
    """The revision's pod as a core/v1 Pod, defaulted the way Knative does (probe port = container port)."""
    spec = copy.deepcopy(service["spec"]["template"]["spec"])
    for name in KNATIVE_ONLY:
        spec.pop(name, None)
    for container in spec["containers"]:
        probe = container.get("readinessProbe", {}).get("httpGet")
        if probe is not None:
            probe.setdefault("port", container["ports"][0]["containerPort"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "revision-pod"}, "spec": spec}


def test_service_validates_and_carries_autoscaling_and_sandbox(
    capsys: pytest.CaptureFixture[str], tiny_dir: Path
) -> None:
    objects = deploy(
        capsys, "--model", str(tiny_dir), "--name", "tiny-chat", "--namespace", "tenant-a",
        "--max-scale", "7", "--target", "10", "--container-concurrency", "16", "--scale-down-delay", "90s",
        "--secret", "s3-creds", "--env", "LOG_LEVEL=debug", "--knative-features",
    )  # fmt: skip
    assert [o["kind"] for o in objects] == ["ConfigMap", "RuntimeClass", "Service"]
    service = by_kind(objects, "Service")
    jsonschema.validate(service, SCHEMA)
    assert service["apiVersion"] == "serving.knative.dev/v1"
    assert service["metadata"] == {**service["metadata"], "name": "tiny-chat", "namespace": "tenant-a"}
    template = service["spec"]["template"]
    assert template["metadata"]["annotations"] == {
        "autoscaling.knative.dev/class": "kpa.autoscaling.knative.dev",
        "autoscaling.knative.dev/metric": "concurrency",
        "autoscaling.knative.dev/target": "10",
        "autoscaling.knative.dev/min-scale": "0",
        "autoscaling.knative.dev/max-scale": "7",
        "autoscaling.knative.dev/scale-down-delay": "90s",
        "deepseek.ai/gpu": "1xA100-40GB",
    }
    pod = template["spec"]
    assert pod["containerConcurrency"] == 16
    assert pod["runtimeClassName"] == "gvisor"
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["args"][:2] == ["--model", str(tiny_dir)]
    assert container["args"][container["args"].index("--max-num-seqs") + 1] == "16"
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert {"name": "LOG_LEVEL", "value": "debug"} in container["env"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms[0]["matchExpressions"][0]["key"] == "nvidia.com/gpu.product"
    assert "NVIDIA-A100-SXM4-40GB" in terms[0]["matchExpressions"][0]["values"]

    runtime_class = by_kind(objects, "RuntimeClass")
    assert (
        runtime_class["handler"] == "runsc" and runtime_class["metadata"]["name"] == pod["runtimeClassName"]
    )
    configmap = by_kind(objects, "ConfigMap")
    assert configmap["data"]["kubernetes.podspec-runtimeclassname"] == "enabled"
    assert configmap["data"]["kubernetes.podspec-affinity"] == "enabled"
    for core_object in (runtime_class, configmap, as_pod(service)):
        kubernetes_validate.validate(core_object, K8S_VERSION, strict=True)


def test_schema_and_kubernetes_validate_reject_broken_objects(
    capsys: pytest.CaptureFixture[str], tiny_dir: Path
) -> None:
    service = by_kind(deploy(capsys, "--model", str(tiny_dir), "--name", "m"), "Service")
    broken = copy.deepcopy(service)
    broken["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)
    broken = copy.deepcopy(service)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)
    broken = copy.deepcopy(service)
    broken["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "12 GB"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)
    pod = as_pod(service)
    pod["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_no_sandbox_cpu_only_and_gke_labels(capsys: pytest.CaptureFixture[str], tiny_dir: Path) -> None:
    objects = deploy(capsys, "--model", str(tiny_dir), "--name", "cpu", "--no-sandbox", "--gpu-kind", "none")
    assert [o["kind"] for o in objects] == ["Service"]
    pod = objects[0]["spec"]["template"]["spec"]
    assert "runtimeClassName" not in pod and "affinity" not in pod
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    jsonschema.validate(objects[0], SCHEMA)
    kubernetes_validate.validate(as_pod(objects[0]), K8S_VERSION, strict=True)

    service = by_kind(deploy(capsys, "--model", "unused", "--preset", "deepseek-llm-7b-base", "--name", "gke",
                             "--gpu-label", "gke", "--dtype", "float16"), "Service")  # fmt: skip
    expr = service["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"][0]["matchExpressions"][0]
    # GKE offers no V100-32GB, so fp16 7B goes to the next kind that GKE can select.
    assert expr == {
        "key": "cloud.google.com/gke-accelerator",
        "operator": "In",
        "values": ["nvidia-tesla-a100"],
    }


def test_70b_preset_free_config_gets_two_h200(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 102400}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    service = by_kind(deploy(capsys, "--model", str(tmp_path), "--name", "big"), "Service")
    resources = service["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "2"
    assert service["spec"]["template"]["metadata"]["annotations"]["deepseek.ai/gpu"] == "2xH200-141GB"
    kubernetes_validate.validate(as_pod(service), K8S_VERSION, strict=True)


@pytest.mark.integration
def test_s3_model_reads_only_config_json(
    capsys: pytest.CaptureFixture[str], s3_bucket: str, tiny_dir: Path
) -> None:
    url = storage.upload_directory(tiny_dir, f"{s3_bucket}/tiny/step-1")
    service = by_kind(deploy(capsys, "--model", url, "--name", "from-s3", "--gpu-kind", "V100-16GB",
                             "--dtype", "float16"), "Service")  # fmt: skip
    assert service["spec"]["template"]["spec"]["containers"][0]["args"][1] == url
    cached = storage.cache_path(url)
    assert sorted(p.name for p in cached.iterdir() if not p.name.startswith(".")) == sorted(
        ["config.json", storage.MANIFEST_NAME]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "Bad_Name"], "--name"),
        (["--name", "ok", "--min-scale", "3", "--max-scale", "2"], "--max-scale"),
        (["--name", "ok", "--target", "100", "--container-concurrency", "10"], "--target"),
        (["--name", "ok", "--scale-down-delay", "5 minutes"], "--scale-down-delay"),
        (["--name", "ok", "--scale-down-delay", "2h"], "at most 1h"),
        (["--name", "ok", "--container-concurrency", "5000"], "--container-concurrency"),
        (["--name", "ok", "--gpu-kind", "T4"], "GPU kind"),
        (["--name", "ok", "--preset", "deepseek-v3"], "more than 8"),
    ],
)
def test_bad_options_name_the_option(
    capsys: pytest.CaptureFixture[str], tiny_dir: Path, args: list[str], message: str
) -> None:
    assert main(["deploy", "--model", str(tiny_dir), *args, "--dry-run"]) == 1
    assert message in capsys.readouterr().err


def test_missing_config_suggests_preset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["deploy", "--model", str(tmp_path / "nowhere"), "--name", "x", "--dry-run"]) == 1
    assert "--preset" in capsys.readouterr().err


def test_console_output_is_pure_yaml_and_json(tiny_dir: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "deepseek_cne.cli",
        "deploy",
        "--model",
        str(tiny_dir),
        "--name",
        "m",
        "--dry-run",
    ]
    out = subprocess.run([*cmd, "-o", "json"], capture_output=True, text=True, timeout=120, check=True)
    listing = json.loads(out.stdout)
    assert listing["kind"] == "List" and [o["kind"] for o in listing["items"]] == ["RuntimeClass", "Service"]
    assert "placement: 1x A100-40GB" in out.stderr
