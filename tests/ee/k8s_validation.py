"""Validation of rendered manifests for the tests/ee k8s tests (a helper module, not a test file).

Built-in kinds: the Kubernetes OpenAPI schemas shipped with kubernetes-validate, strict (unknown fields
refused). CRDs (PyTorchJob, ServiceMonitor): the structural schemas in tests/ee/schemas, with jsonschema;
a PyTorchJob's pod templates are also validated as core/v1 PodTemplates.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate

K8S_VERSION = "1.30.0"
SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {
    ("kubeflow.org/v1", "PyTorchJob"): "pytorchjob.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
}


def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    """A Draft 2020-12 validator for one of the CRD schemas kept in tests/ee/schemas."""
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Raise if `manifest` does not validate against its Kubernetes or CRD schema."""
    key = (manifest["apiVersion"], manifest["kind"])
    if key in CRD_SCHEMAS:
        crd_validator(*key).validate(manifest)
        if manifest["kind"] == "PyTorchJob":
            for replica_type, replica in manifest["spec"]["pytorchReplicaSpecs"].items():
                pod_template = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": f"{manifest['metadata']['name']}-{replica_type.lower()}"},
                    "template": replica["template"],
                }
                kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
        return
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def by_kind(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Manifests keyed by kind (each kind appears once in what we render)."""
    kinds = [m["kind"] for m in manifests]
    assert len(kinds) == len(set(kinds)), kinds
    return {m["kind"]: m for m in manifests}


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run the installed `deepseek-ee` console script (next to this interpreter) in a subprocess."""
    script = Path(sys.executable).parent / "deepseek-ee"
    command = [str(script)] if script.exists() else [shutil.which("deepseek-ee") or "deepseek-ee"]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("KUBERNETES_SERVICE_HOST", None)  # never take the in-cluster path in tests
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
