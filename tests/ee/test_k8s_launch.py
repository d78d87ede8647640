"""`deepseek-ee launch`: multi-node training jobs rendered for an EE config validate and wire up rendezvous."""

from __future__ import annotations

import copy
import posixpath

import jsonschema
import pytest
import yaml
from deepseek_ee.cli import build_parser, main
from deepseek_ee.config import load_ee_config, parse_ee_config
from deepseek_ee.k8s import render_training
from k8s_validation import by_kind, crd_validator, run_cli, validate_manifest

CONFIG = """\
model:
  preset: deepseek-tiny
data:
  path: /data/shards
training:
  optimizer: adafactor
  output_dir: /data/checkpoints
  max_steps: 200
  warmup_steps: 10
distributed:
  strategy: {strategy}
  backend: {backend}
  gpus: {gpus}
  num_nodes: {num_nodes}
compression:
  method: dynamic_quantization
  dtype: int8
tracking:
  experiment: launch-test
kubernetes:
  name: pretrain
  namespace: ml
  image: registry.local/deepseek-ee:0.1.0
  volume_claim: training-data
  mount_path: /data
  env:
    NCCL_DEBUG: INFO
"""

LAYOUTS = [
    dict(strategy="ddp", backend="nccl", gpus=4, num_nodes=2),
    dict(strategy="fsdp", backend="nccl", gpus=8, num_nodes=4),
    dict(strategy="ddp", backend="gloo", gpus=0, num_nodes=1),
]


@pytest.fixture(
    params=LAYOUTS, ids=lambda layout: f"{layout['strategy']}-{layout['gpus']}gpu-{layout['num_nodes']}node"
)
def config_file(request, tmp_path):
    path = tmp_path / "ee.yaml"
    path.write_text(CONFIG.format(**request.param))
    return path


def _containers(template):
    return template["spec"]["containers"]


def _env(container):
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("kind", ["pytorchjob", "indexed-job"])
def test_every_manifest_validates(config_file, kind):
    config = load_ee_config(config_file)
    manifests = render_training(config, config_file.read_text(), kind=kind)
    expected = ["ConfigMap", "PyTorchJob"] if kind == "pytorchjob" else ["ConfigMap", "Service", "Job"]
    assert [m["kind"] for m in manifests] == expected
    for manifest in manifests:
        validate_manifest(manifest)
        assert manifest["metadata"]["namespace"] == "ml"


def test_config_map_carries_the_same_config(config_file):
    config = load_ee_config(config_file)
    config_map = by_kind(render_training(config, config_file.read_text()))["ConfigMap"]
    (text,) = config_map["data"].values()
    assert text == config_file.read_text()
    again = parse_ee_config(text)
    assert (
        again.distributed == config.distributed
        and again.training.hyperparameters == config.training.hyperparameters
    )


def test_pytorchjob_master_workers_gpus_and_command(config_file):
    config = load_ee_config(config_file)
    dist = config.distributed
    job = by_kind(render_training(config, config_file.read_text(), kind="pytorchjob"))["PyTorchJob"]
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    if dist.num_nodes == 1:
        assert "Worker" not in specs
    else:
        assert specs["Worker"]["replicas"] == dist.num_nodes - 1
    assert sum(s["replicas"] for s in specs.values()) == dist.num_nodes
    for replica in specs.values():
        (container,) = _containers(replica["template"])
        assert container["name"] == "pytorch"  # the operator injects rendezvous env into this container
        assert {"name": "pytorchjob-port", "containerPort": dist.master_port, "protocol": "TCP"} in container[
            "ports"
        ]
        script = container["command"][-1]
        assert container["command"][:2] == ["/bin/sh", "-c"]
        assert script.endswith(f"exec deepseek-ee train --config {config.kubernetes.config_path}")
        assert 'NODE_RANK="${RANK' in script
        limits = container["resources"]["limits"]
        if dist.gpus:
            assert limits["nvidia.com/gpu"] == str(dist.gpus)
        else:
            assert "nvidia.com/gpu" not in limits
        assert container["image"] == "registry.local/deepseek-ee:0.1.0"
        assert _env(container)["NCCL_DEBUG"]["value"] == "INFO"
        _assert_volumes(replica["template"], config)


def _assert_volumes(template, config):
    (container,) = _containers(template)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert mounts["config"]["mountPath"] == posixpath.dirname(config.kubernetes.config_path)
    assert volumes["config"]["configMap"]["name"] == "pretrain-config"
    assert volumes["config"]["configMap"]["items"] == [{"key": "ee.yaml", "path": "ee.yaml"}]
    assert mounts["data"]["mountPath"] == "/data"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "training-data"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["dshm"]["mountPath"] == "/dev/shm"


def test_indexed_job_rendezvous_through_headless_service(config_file):
    config = load_ee_config(config_file)
    dist = config.distributed
    m = by_kind(render_training(config, config_file.read_text(), kind="indexed-job"))
    service, job = m["Service"], m["Job"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == dist.num_nodes
    template = spec["template"]
    assert template["spec"]["subdomain"] == service["metadata"]["name"]
    pod_labels = template["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    (container,) = _containers(template)
    assert container["command"] == ["deepseek-ee", "train", "--config", config.kubernetes.config_path]
    env = _env(container)
    # Pod 0 of an Indexed Job is "<job>-0", resolvable under the headless Service's subdomain.
    assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}.ml.svc"
    assert env["MASTER_PORT"]["value"] == str(dist.master_port)
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert service["spec"]["ports"][0]["port"] == dist.master_port
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    limits = container["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == (str(dist.gpus) if dist.gpus else None)
    _assert_volumes(template, config)


def test_pytorchjob_schema_rejects_broken_jobs(tmp_path):
    path = tmp_path / "ee.yaml"
    path.write_text(CONFIG.format(**LAYOUTS[0]))
    job = by_kind(render_training(load_ee_config(path), path.read_text()))["PyTorchJob"]
    validator = crd_validator("kubeflow.org/v1", "PyTorchJob")
    for mutate in (
        lambda j: j["spec"]["pytorchReplicaSpecs"].__setitem__(
            "Chief", j["spec"]["pytorchReplicaSpecs"]["Worker"]
        ),
        lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].__setitem__("replicas", 2),
        lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].__setitem__("restartPolicy", "Sometimes"),
        lambda j: j["spec"]["runPolicy"].__setitem__("cleanPodPolicy", "Everything"),
        lambda j: j["spec"].pop("pytorchReplicaSpecs"),
        lambda j: j["spec"].__setitem__("replicaSpecs", {}),
    ):
        broken = copy.deepcopy(job)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(broken)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("kind", ["pytorchjob", "indexed-job"])
def test_cli_dry_run_renders_the_same_manifests(config_file, kind, capsys):
    assert main(["launch", "--config", str(config_file), "--kind", kind, "--dry-run", "-o", "yaml"]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert documents == render_training(load_ee_config(config_file), config_file.read_text(), kind=kind)


def test_cli_overrides_name_namespace_and_image(tmp_path, capsys):
    path = tmp_path / "ee.yaml"
    path.write_text(CONFIG.format(**LAYOUTS[0]))
    argv = [
        "launch",
        "--config",
        str(path),
        "--name",
        "run-7",
        "--namespace",
        "team-a",
        "--image",
        "img:7",
        "--dry-run",
    ]
    assert main(argv) == 0
    m = by_kind(list(yaml.safe_load_all(capsys.readouterr().out)))
    assert m["PyTorchJob"]["metadata"]["name"] == "run-7"
    assert {x["metadata"]["namespace"] for x in m.values()} == {"team-a"}
    master = m["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert master["spec"]["containers"][0]["image"] == "img:7"
    assert (
        master["spec"]["volumes"][0]["configMap"]["name"]
        == m["ConfigMap"]["metadata"]["name"]
        == "run-7-config"
    )


def test_cli_refuses_a_bad_config_naming_file_and_field(tmp_path, capsys):
    path = tmp_path / "ee.yaml"
    path.write_text(CONFIG.format(**LAYOUTS[0]).replace("gpus: 4", "gpus: four"))
    assert main(["launch", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "distributed.gpus" in err and "integer" in err


def test_cli_refuses_a_bad_override(tmp_path, capsys):
    path = tmp_path / "ee.yaml"
    path.write_text(CONFIG.format(**LAYOUTS[0]))
    assert main(["launch", "--config", str(path), "--name", "Run_7", "--dry-run"]) == 2
    assert "--name" in capsys.readouterr().err


def test_launch_without_cluster_exits_nonzero_with_clear_message(tmp_path):
    path = tmp_path / "ee.yaml"
    path.write_text(CONFIG.format(**LAYOUTS[0]))
    result = run_cli("launch", "--config", str(path), env={"KUBECONFIG": str(tmp_path / "missing")})
    assert result.returncode != 0
    assert "no Kubernetes cluster configured" in result.stderr and "Traceback" not in result.stderr


def test_cli_registers_launch_and_deploy():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert {"launch", "deploy"} <= set(choices)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["launch", "--kind", "mpijob", "--config", "x.yaml"])
    assert exc.value.code == 2
