"""Multi-node training on Kubernetes: a Kubeflow PyTorchJob, or an Indexed Job with a headless Service.

Each pod is one node and runs ``deepseek-ee train --config <file>``; the config file travels in a
ConfigMap. Rendezvous follows Lightning's own launcher: every pod gets MASTER_ADDR, MASTER_PORT and its
NODE_RANK, and Lightning starts one process per GPU on each node.

- ``pytorchjob``: the Kubeflow training operator sets MASTER_ADDR/MASTER_PORT/RANK (RANK is the pod's
  index, Master = 0), so the container copies RANK into NODE_RANK through a short shell wrapper (operator
  variables are appended after ours, so ``$(RANK)`` expansion cannot be used).
- ``indexed-job``: plain batch/v1 with ``completionMode: Indexed``; pod ``<name>-0`` is reachable through
  the headless Service as ``<name>-0.<name>.<namespace>.svc`` and NODE_RANK comes from the
  completion-index annotation via the downward API.
"""

from __future__ import annotations

import posixpath
import shlex
from typing import Any

from kubernetes import client

from ..config import EEConfig
from .common import selector_labels, standard_labels, to_manifest

__all__ = ["JOB_KINDS", "render_training"]

JOB_KINDS = ("pytorchjob", "indexed-job")
CONFIG_KEY = "ee.yaml"
PYTORCHJOB_CONTAINER = "pytorch"  # the training operator looks for a container of this name
PYTORCHJOB_PORT_NAME = "pytorchjob-port"  # ... and takes MASTER_PORT from the port of this name
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def render_training(config: EEConfig, config_text: str, kind: str = "pytorchjob") -> list[dict[str, Any]]:
    """Manifests that run `config` on `distributed.num_nodes` pods: ConfigMap + PyTorchJob or Service + Job.

    `config_text` is the YAML the pods read (normally the file `config` was loaded from).
    """
    if kind not in JOB_KINDS:
        raise ValueError(f"kind must be one of {', '.join(JOB_KINDS)}, got {kind!r}")
    k8s = config.kubernetes
    config_map = client.V1ConfigMap(
        api_version="v1",
        kind="ConfigMap",
        metadata=client.V1ObjectMeta(
            name=_config_map_name(config),
            namespace=k8s.namespace,
            labels=standard_labels(k8s.name, "trainer"),
        ),
        data={CONFIG_KEY: config_text},
    )
    if kind == "pytorchjob":
        workload = [_pytorchjob(config)]
    else:
        workload = [_headless_service(config), _indexed_job(config)]
    return [to_manifest(config_map), *(to_manifest(obj) for obj in workload)]


def _config_map_name(config: EEConfig) -> str:
    return f"{config.kubernetes.name}-config"


def _train_argv(config: EEConfig) -> list[str]:
    return ["deepseek-ee", "train", "--config", config.kubernetes.config_path]


def _pod_template(
    config: EEConfig,
    *,
    container_name: str,
    command: list[str],
    env: list[client.V1EnvVar],
    port_name: str,
    restart_policy: str,
    subdomain: str | None = None,
) -> client.V1PodTemplateSpec:
    k8s = config.kubernetes
    dist = config.distributed
    limits: dict[str, str] = {"memory": k8s.memory}
    if dist.gpus > 0:
        limits["nvidia.com/gpu"] = str(dist.gpus)
    config_dir = posixpath.dirname(k8s.config_path)
    mounts = [
        client.V1VolumeMount(name="config", mount_path=config_dir, read_only=True),
        client.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
    ]
    volumes = [
        client.V1Volume(
            name="config",
            config_map=client.V1ConfigMapVolumeSource(
                name=_config_map_name(config),
                items=[client.V1KeyToPath(key=CONFIG_KEY, path=posixpath.basename(k8s.config_path))],
            ),
        ),
        # NCCL and DataLoader workers use shared memory; the container default (64 MiB) is too small.
        client.V1Volume(
            name="dshm", empty_dir=client.V1EmptyDirVolumeSource(medium="Memory", size_limit=k8s.shm_size)
        ),
    ]
    if k8s.volume_claim:
        mounts.append(client.V1VolumeMount(name="data", mount_path=k8s.mount_path))
        volumes.append(
            client.V1Volume(
                name="data",
                persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                    claim_name=k8s.volume_claim
                ),
            )
        )
    user_env = [client.V1EnvVar(name=key, value=value) for key, value in sorted(k8s.env.items())]
    container = client.V1Container(
        name=container_name,
        image=k8s.image,
        image_pull_policy=k8s.image_pull_policy,
        command=command,
        env=[client.V1EnvVar(name="PYTHONUNBUFFERED", value="1"), *env, *user_env],
        ports=[client.V1ContainerPort(name=port_name, container_port=dist.master_port, protocol="TCP")],
        resources=client.V1ResourceRequirements(
            requests={"cpu": k8s.cpu, "memory": k8s.memory}, limits=limits
        ),
        volume_mounts=mounts,
    )
    tolerations = None
    if dist.gpus > 0:
        # GPU node pools are commonly tainted so that only GPU workloads land there.
        tolerations = [client.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    return client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels=standard_labels(k8s.name, "trainer")),
        spec=client.V1PodSpec(
            containers=[container],
            volumes=volumes,
            restart_policy=restart_policy,
            service_account_name=k8s.service_account,
            node_selector=dict(k8s.node_selector) or None,
            tolerations=tolerations,
            subdomain=subdomain,
        ),
    )


def _pytorchjob(config: EEConfig) -> dict[str, Any]:
    k8s = config.kubernetes
    dist = config.distributed
    script = 'export NODE_RANK="${RANK:-0}"; exec ' + shlex.join(_train_argv(config))
    env = [client.V1EnvVar(name="NUM_NODES", value=str(dist.num_nodes))]

    def replica(replicas: int) -> dict[str, Any]:
        template = _pod_template(
            config,
            container_name=PYTORCHJOB_CONTAINER,
            command=["/bin/sh", "-c", script],
            env=env,
            port_name=PYTORCHJOB_PORT_NAME,
            restart_policy="OnFailure",
        )
        return {"replicas": replicas, "restartPolicy": "OnFailure", "template": template}

    specs = {"Master": replica(1)}
    if dist.num_nodes > 1:
        specs["Worker"] = replica(dist.num_nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {
            "name": k8s.name,
            "namespace": k8s.namespace,
            "labels": standard_labels(k8s.name, "trainer"),
        },
        "spec": {
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": k8s.backoff_limit},
            "pytorchReplicaSpecs": specs,
        },
    }


def _headless_service(config: EEConfig) -> client.V1Service:
    k8s = config.kubernetes
    return client.V1Service(
        api_version="v1",
        kind="Service",
        metadata=client.V1ObjectMeta(
            name=k8s.name, namespace=k8s.namespace, labels=standard_labels(k8s.name, "trainer")
        ),
        spec=client.V1ServiceSpec(
            cluster_ip="None",
            # Peers must resolve each other before any is "ready": rendezvous happens at start-up.
            publish_not_ready_addresses=True,
            selector=selector_labels(k8s.name, "trainer"),
            ports=[
                client.V1ServicePort(
                    name="rendezvous", port=config.distributed.master_port, target_port="rendezvous"
                )
            ],
        ),
    )


def _indexed_job(config: EEConfig) -> client.V1Job:
    k8s = config.kubernetes
    dist = config.distributed
    env = [
        client.V1EnvVar(name="MASTER_ADDR", value=f"{k8s.name}-0.{k8s.name}.{k8s.namespace}.svc"),
        client.V1EnvVar(name="MASTER_PORT", value=str(dist.master_port)),
        client.V1EnvVar(name="NUM_NODES", value=str(dist.num_nodes)),
        client.V1EnvVar(
            name="NODE_RANK",
            value_from=client.V1EnvVarSource(
                field_ref=client.V1ObjectFieldSelector(
                    field_path=f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
                )
            ),
        ),
    ]
    template = _pod_template(
        config,
        container_name="trainer",
        command=_train_argv(config),
        env=env,
        port_name="rendezvous",
        # A failed node fails the step for all; the Job retries the pod and training resumes from a checkpoint.
        restart_policy="Never",
        subdomain=k8s.name,
    )
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(
            name=k8s.name, namespace=k8s.namespace, labels=standard_labels(k8s.name, "trainer")
        ),
        spec=client.V1JobSpec(
            completion_mode="Indexed",
            completions=dist.num_nodes,
            parallelism=dist.num_nodes,
            backoff_limit=k8s.backoff_limit,
            template=template,
        ),
    )
