"""The EE YAML configuration (``ee.yaml``): schema as dataclasses and a loader with clear errors.

Every section is optional and has defaults; unknown keys, wrong types and impossible values are refused
with a ``ConfigError`` naming the file and the dotted field (``ee.yaml: distributed.gpus: ...``).

```yaml
model:        {preset: deepseek-tiny}          # or {path: /models/base}; optional dtype
data:         {path: /data/shards, eval_path: null, tokenizer: null}
training:     {optimizer: adafactor, output_dir: /data/ckpt, max_steps: 1000, ...}   # + TrainingConfig
distributed:  {strategy: ddp, backend: nccl, gpus: 4, num_nodes: 2}
compression:  {method: dynamic_quantization, dtype: int8, max_loss_increase: 0.02}
tracking:     {tracking_uri: null, experiment: deepseek-ee}
kubernetes:   {image: deepseek-ee:0.1.0, namespace: default, name: deepseek-ee-train, ...}
deploy:       {name: chat, model: /models/int8, replicas: 2, hpa_metric: waiting, ...}
```

The ``training`` section holds the EE keys below plus every field of the shared
``deepseek_core.training.config.TrainingConfig`` (max_steps, batch_size, seq_len, learning_rate, ...).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from deepseek_core.errors import ConfigError

__all__ = [
    "CompressionConfig",
    "DataConfig",
    "DeployConfig",
    "DistributedConfig",
    "EEConfig",
    "KubernetesConfig",
    "ModelSection",
    "TrackingConfig",
    "TrainingSection",
    "load_ee_config",
    "parse_ee_config",
]

STRATEGIES = ("ddp", "fsdp")
BACKENDS = ("nccl", "gloo")
COMPRESSION_METHODS = ("dynamic_quantization", "weight_only")
COMPRESSION_DTYPES = ("int8",)
OPTIMIZERS = ("adamw", "adafactor")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
HPA_METRICS = ("cpu", "waiting")
IMAGE_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
DEFAULT_IMAGE = "deepseek-ee:0.1.0"

# RFC 1123 DNS label: what Kubernetes accepts as a Deployment, Service or Job name.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Kubernetes resource quantities ("500m", "4", "16Gi", "1.5").
_QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$")


class _FieldError(ValueError):
    """A value error located at a dotted field path; the loader adds the file name."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


def _need(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise _FieldError(where, message)


def is_dns_label(value: str) -> bool:
    """True when `value` is a valid Kubernetes object name (RFC 1123 label, at most 63 characters)."""
    return len(value) <= 63 and bool(_DNS_LABEL.match(value))


def is_quantity(value: str) -> bool:
    """True when `value` parses as a Kubernetes resource quantity."""
    return bool(_QUANTITY.match(value))


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class DistributedConfig:
    """Multi-node layout: `gpus` per node (0 = CPU processes), `num_nodes` pods/machines."""

    strategy: str = "ddp"
    backend: str | None = None  # None: nccl when gpus > 0, else gloo
    gpus: int = 0
    num_nodes: int = 1
    processes_per_node: int | None = None  # CPU-only runs: processes per node (default 1)
    master_port: int = 29500
    collective_timeout_s: float = 1800.0  # a collective waiting longer than this fails the job
    peer_timeout_s: float = 60.0  # a rank without heartbeat for this long is reported lost

    def validate(self, where: str) -> None:
        """Refuse impossible values; resolve the backend default."""
        _need(
            self.strategy in STRATEGIES,
            f"{where}.strategy",
            f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}",
        )
        _need(self.gpus >= 0, f"{where}.gpus", f"must be >= 0 (GPUs per node), got {self.gpus}")
        _need(self.num_nodes >= 1, f"{where}.num_nodes", f"must be >= 1, got {self.num_nodes}")
        _need(
            1 <= self.master_port <= 65535,
            f"{where}.master_port",
            f"must be a TCP port, got {self.master_port}",
        )
        _need(
            self.collective_timeout_s > 0,
            f"{where}.collective_timeout_s",
            f"must be > 0, got {self.collective_timeout_s}",
        )
        _need(
            self.peer_timeout_s >= 2,
            f"{where}.peer_timeout_s",
            f"must be >= 2 seconds, got {self.peer_timeout_s}",
        )
        if self.processes_per_node is not None:
            _need(
                self.processes_per_node >= 1,
                f"{where}.processes_per_node",
                f"must be >= 1, got {self.processes_per_node}",
            )
            _need(
                self.gpus == 0,
                f"{where}.processes_per_node",
                "is for CPU runs (gpus: 0); with GPUs it is one process per GPU",
            )
        if self.backend is None:
            self.backend = "nccl" if self.gpus > 0 else "gloo"
        _need(
            self.backend in BACKENDS,
            f"{where}.backend",
            f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}",
        )
        _need(
            not (self.backend == "nccl" and self.gpus == 0),
            f"{where}.backend",
            "nccl needs GPUs (gpus > 0); use gloo for CPU",
        )

    @property
    def devices_per_node(self) -> int:
        """Training processes on each node: one per GPU, or `processes_per_node` on CPU."""
        return self.gpus if self.gpus > 0 else (self.processes_per_node or 1)

    @property
    def world_size(self) -> int:
        """Total training processes across all nodes."""
        return self.devices_per_node * self.num_nodes


@dataclass
class CompressionConfig:
    """INT8 compression and its accuracy gate (relative eval-loss increase allowed)."""

    method: str = "dynamic_quantization"
    dtype: str = "int8"
    max_loss_increase: float = 0.02
    eval_data: str | None = None
    output_dir: str | None = None

    def validate(self, where: str) -> None:
        """Refuse unknown methods/dtypes and a negative gate."""
        _need(
            self.method in COMPRESSION_METHODS,
            f"{where}.method",
            f"must be one of {', '.join(COMPRESSION_METHODS)}, got {self.method!r}",
        )
        _need(
            self.dtype in COMPRESSION_DTYPES,
            f"{where}.dtype",
            f"must be one of {', '.join(COMPRESSION_DTYPES)}, got {self.dtype!r}",
        )
        _need(
            0.0 <= self.max_loss_increase < 1.0,
            f"{where}.max_loss_increase",
            f"must be in [0, 1), got {self.max_loss_increase}",
        )


@dataclass
class TrainingSection:
    """EE training options; `hyperparameters` is the shared core TrainingConfig built from the other keys."""

    optimizer: str = "adamw"
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # extra AdaFactor keywords
    output_dir: str = "checkpoints"
    resume: bool = True
    hyperparameters: Any = None  # deepseek_core.training.config.TrainingConfig, filled by the loader

    def validate(self, where: str) -> None:
        """Refuse unknown optimizers and AdaFactor options AdaFactor itself refuses."""
        _need(
            self.optimizer in OPTIMIZERS,
            f"{where}.optimizer",
            f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
        )
        _need(bool(self.output_dir), f"{where}.output_dir", "must be a non-empty path")
        if self.optimizer_options:
            _need(
                self.optimizer == "adafactor",
                f"{where}.optimizer_options",
                "only applies to optimizer: adafactor",
            )
            _check_adafactor_options(self.optimizer_options, f"{where}.optimizer_options")


@dataclass
class DataConfig:
    """Training data (`path`: a file or a prepared shard directory) and `data prepare` inputs/outputs."""

    path: str | None = None
    eval_path: str | None = None
    tokenizer: str | None = None  # default: the model directory's tokenizer
    inputs: list[str] = field(default_factory=list)  # raw files or globs for `data prepare`
    output: str | None = None  # where `data prepare` writes packed shards
    scheduler: str | None = None  # Dask scheduler address; None starts a LocalCluster

    def validate(self, where: str) -> None:
        """Refuse empty strings where a path is expected."""
        for name in ("path", "eval_path", "tokenizer", "output", "scheduler"):
            value = getattr(self, name)
            _need(
                value is None or bool(value.strip()), f"{where}.{name}", "must be a non-empty string or null"
            )


@dataclass
class ModelSection:
    """The model to start from: a named `preset` or a checkpoint `path` (directory or hub id)."""

    preset: str | None = None
    path: str | None = None
    dtype: str | None = None

    def validate(self, where: str) -> None:
        """Exactly one of preset/path; a known preset; a known dtype."""
        _need(not (self.preset and self.path), where, "give either preset or path, not both")
        if self.preset is not None:
            from deepseek_core.presets import preset_names

            names = preset_names()
            _need(
                self.preset in names,
                f"{where}.preset",
                f"unknown preset {self.preset!r}; known: {', '.join(names)}",
            )
        _need(
            self.path is None or bool(self.path.strip()),
            f"{where}.path",
            "must be a non-empty string or null",
        )
        _need(
            self.dtype is None or self.dtype in MODEL_DTYPES,
            f"{where}.dtype",
            f"must be one of {', '.join(MODEL_DTYPES)} or null, got {self.dtype!r}",
        )

    @property
    def source(self) -> str | None:
        """The preset name or the path, whichever is set."""
        return self.preset or self.path


@dataclass
class TrackingConfig:
    """MLflow tracking: `tracking_uri` None means a sqlite store in the working directory."""

    tracking_uri: str | None = None
    experiment: str = "deepseek-ee"
    run_name: str | None = None
    registered_model: str | None = None  # registered model name; None: the experiment name
    enabled: bool = True  # false: no MLflow at all
    log_model: bool = True  # upload the final checkpoint as artifacts and register a model version
    artifact_location: str | None = (
        None  # for a new experiment; None: next to a sqlite store, else the server's
    )

    def validate(self, where: str) -> None:
        """Refuse an empty experiment name."""
        _need(bool(self.experiment.strip()), f"{where}.experiment", "must be a non-empty string")
        if self.registered_model is not None:
            _need(
                bool(self.registered_model.strip()),
                f"{where}.registered_model",
                "must be a non-empty string or null",
            )


@dataclass
class KubernetesConfig:
    """Where and how `deepseek-ee launch` runs the training job on Kubernetes."""

    name: str = "deepseek-ee-train"
    namespace: str = "default"
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    cpu: str = "4"  # requested per pod
    memory: str = "16Gi"  # requested per pod
    shm_size: str = "8Gi"  # /dev/shm for data loaders and NCCL
    volume_claim: str | None = None  # a PersistentVolumeClaim holding data and checkpoints
    mount_path: str = "/data"
    service_account: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    backoff_limit: int = 3
    config_path: str = "/etc/deepseek-ee/ee.yaml"  # where the pods see this file

    def validate(self, where: str) -> None:
        """Names Kubernetes accepts, quantities it parses, absolute mount paths."""
        _need(
            is_dns_label(self.name),
            f"{where}.name",
            f"must be a DNS label (lowercase a-z, 0-9, '-'; <= 63 chars), got {self.name!r}",
        )
        # Pod hostnames are "<name>-<index>" and must stay a DNS label.
        _need(
            len(self.name) <= 50,
            f"{where}.name",
            f"must be at most 50 characters (pods append an index), got {len(self.name)}",
        )
        _need(
            is_dns_label(self.namespace), f"{where}.namespace", f"must be a DNS label, got {self.namespace!r}"
        )
        _need(bool(self.image.strip()), f"{where}.image", "must be a non-empty image reference")
        _need(
            self.image_pull_policy in IMAGE_PULL_POLICIES,
            f"{where}.image_pull_policy",
            f"must be one of {', '.join(IMAGE_PULL_POLICIES)}, got {self.image_pull_policy!r}",
        )
        for name in ("cpu", "memory", "shm_size"):
            _need(
                is_quantity(getattr(self, name)),
                f"{where}.{name}",
                f"not a Kubernetes quantity: {getattr(self, name)!r}",
            )
        if self.volume_claim is not None:
            _need(
                is_dns_label(self.volume_claim),
                f"{where}.volume_claim",
                f"must be a DNS label, got {self.volume_claim!r}",
            )
        for name in ("mount_path", "config_path"):
            _need(
                getattr(self, name).startswith("/"),
                f"{where}.{name}",
                f"must be an absolute path, got {getattr(self, name)!r}",
            )
        _need(self.backoff_limit >= 0, f"{where}.backoff_limit", f"must be >= 0, got {self.backoff_limit}")
        for key in self.env:
            _need(
                bool(re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key)),
                f"{where}.env",
                f"invalid variable name {key!r}",
            )


@dataclass
class DeployConfig:
    """Serving on Kubernetes (`deepseek-ee deploy`); command-line flags override these."""

    name: str | None = None
    model: str | None = None
    namespace: str | None = None  # default: kubernetes.namespace
    image: str | None = None  # default: kubernetes.image
    replicas: int = 1
    min_replicas: int | None = None  # default: replicas
    max_replicas: int | None = None  # default: max(replicas, 4)
    gpus: int = 0
    hpa_metric: str = "cpu"
    target_cpu_utilization: int = 70
    target_waiting: float = 4.0  # average waiting requests per pod before scaling out

    def validate(self, where: str) -> None:
        """Names, replica bounds and autoscaling targets Kubernetes accepts."""
        if self.name is not None:
            _need(is_dns_label(self.name), f"{where}.name", f"must be a DNS label, got {self.name!r}")
        if self.namespace is not None:
            _need(
                is_dns_label(self.namespace),
                f"{where}.namespace",
                f"must be a DNS label, got {self.namespace!r}",
            )
        _need(self.replicas >= 1, f"{where}.replicas", f"must be >= 1, got {self.replicas}")
        _need(self.gpus >= 0, f"{where}.gpus", f"must be >= 0, got {self.gpus}")
        _need(
            self.hpa_metric in HPA_METRICS,
            f"{where}.hpa_metric",
            f"must be one of {', '.join(HPA_METRICS)}, got {self.hpa_metric!r}",
        )
        _need(
            1 <= self.target_cpu_utilization <= 100,
            f"{where}.target_cpu_utilization",
            f"must be in 1..100, got {self.target_cpu_utilization}",
        )
        _need(self.target_waiting > 0, f"{where}.target_waiting", f"must be > 0, got {self.target_waiting}")
        if self.min_replicas is not None:
            _need(self.min_replicas >= 1, f"{where}.min_replicas", f"must be >= 1, got {self.min_replicas}")
        if self.max_replicas is not None:
            low = self.min_replicas if self.min_replicas is not None else 1
            _need(
                self.max_replicas >= low,
                f"{where}.max_replicas",
                f"must be >= min_replicas ({low}), got {self.max_replicas}",
            )


@dataclass
class EEConfig:
    """The whole ``ee.yaml``; `source` is the file it was read from (None when built in code)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingSection = field(default_factory=TrainingSection)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    source: Path | str | None = None  # the file or URL it was read from


_SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(EEConfig)[f.name]
    for f in dataclasses.fields(EEConfig)
    if f.name != "source"
}
# Keys of the `training` section that belong to EE rather than to the core TrainingConfig.
_TRAINING_EE_KEYS = {f.name for f in dataclasses.fields(TrainingSection)} - {"hyperparameters"}
_ADAFACTOR_KEYS = (
    "lr",
    "eps",
    "clip_threshold",
    "decay_rate",
    "beta1",
    "weight_decay",
    "scale_parameter",
    "relative_step",
    "warmup_init",
)


# ---------------------------------------------------------------------------------------------- loading
def load_ee_config(path: str | os.PathLike[str]) -> EEConfig:
    """Read and validate an EE YAML file (a path, or an s3:// / gs:// URL read through fsspec); raise
    ConfigError naming the file and field at fault."""
    from deepseek_core import storage

    where: str | Path = os.fspath(path) if storage.is_remote(os.fspath(path)) else Path(path)
    try:
        with storage.open_url(where, "rb") as handle:
            text = handle.read().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: config file not found") from None
    except (OSError, UnicodeDecodeError, ImportError) as exc:
        raise ConfigError(f"{where}: cannot read config file: {exc}") from None
    config = parse_ee_config(text, source=str(where))
    config.source = where
    return config


def parse_ee_config(text: str, source: str = "<string>") -> EEConfig:
    """Validate YAML text as an EE config; `source` names it in errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: invalid YAML{at}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}"
        )
    try:
        return _build(data)
    except _FieldError as exc:
        raise ConfigError(f"{source}: {exc.where}: {exc.message}") from None


def _build(data: dict[str, Any]) -> EEConfig:
    unknown = sorted(str(k) for k in data if k not in _SECTIONS)
    _need(
        not unknown, unknown[0] if unknown else "", f"unknown section; known sections: {', '.join(_SECTIONS)}"
    )
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        raw = data.get(name)
        if raw is None:
            raw = {}
        _need(isinstance(raw, dict), name, f"expected a mapping, got {type(raw).__name__}")
        if name == "training":
            sections[name] = _build_training(raw)
        else:
            sections[name] = _build_section(cls, raw, name)
        sections[name].validate(name)
    return EEConfig(**sections)


def _build_section(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in raw if k not in names)
    _need(
        not unknown,
        f"{where}.{unknown[0]}" if unknown else where,
        f"unknown field; known fields: {', '.join(names)}",
    )
    values = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in raw.items()}
    return cls(**values)


def _build_training(raw: dict[str, Any]) -> TrainingSection:
    from deepseek_core.training.config import TrainingConfig

    ee_raw = {k: v for k, v in raw.items() if k in _TRAINING_EE_KEYS}
    core_raw = {k: v for k, v in raw.items() if k not in _TRAINING_EE_KEYS}
    core_names = [f.name for f in dataclasses.fields(TrainingConfig)]
    unknown = sorted(str(k) for k in core_raw if k not in core_names)
    known = sorted(_TRAINING_EE_KEYS) + core_names
    _need(
        not unknown,
        f"training.{unknown[0]}" if unknown else "training",
        f"unknown field; known fields: {', '.join(known)}",
    )
    section = _build_section(TrainingSection, ee_raw, "training")
    try:
        section.hyperparameters = TrainingConfig.from_dict(core_raw)
    except ValueError as exc:
        # TrainingConfig says "TrainingConfig.<field>: why"; re-locate it in this file's terms.
        message = str(exc)
        match = re.match(r"TrainingConfig\.(\w+): (.*)", message, re.S)
        if match:
            raise _FieldError(f"training.{match.group(1)}", match.group(2)) from None
        raise _FieldError("training", message) from None
    return section


def _check_adafactor_options(options: dict[str, Any], where: str) -> None:
    unknown = sorted(str(k) for k in options if k not in _ADAFACTOR_KEYS)
    _need(
        not unknown,
        f"{where}.{unknown[0]}" if unknown else where,
        f"not an AdaFactor option; known: {', '.join(_ADAFACTOR_KEYS)}",
    )
    import torch

    from deepseek_ee.optimizers import AdaFactor

    kwargs = dict(options)
    if isinstance(kwargs.get("eps"), list):
        kwargs["eps"] = tuple(kwargs["eps"])
    try:
        AdaFactor([torch.zeros(1, requires_grad=True)], **kwargs)
    except ValueError as exc:
        raise _FieldError(where, str(exc)) from None


# ---------------------------------------------------------------------------------------------- typing
def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a type hint, converting ints to floats where a float is expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, where)
            except _FieldError as exc:
                errors.append(exc.message)
        raise _FieldError(
            where, errors[0] if len(errors) == 1 else f"expected {_type_name(hint)}, got {value!r}"
        )
    if hint is Any:
        return value
    if origin is list:
        _need(isinstance(value, list), where, f"expected a list, got {value!r}")
        return [_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        _need(isinstance(value, dict), where, f"expected a mapping, got {value!r}")
        key_type, value_type = args
        out = {}
        for key, item in value.items():
            _need(isinstance(key, str), where, f"keys must be strings, got {key!r}")
            out[key] = _coerce(item, value_type, f"{where}.{key}")
        return out
    if hint is bool:
        _need(isinstance(value, bool), where, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        _need(
            isinstance(value, int) and not isinstance(value, bool),
            where,
            f"expected an integer, got {value!r}",
        )
        return value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _need(ok, where, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        # Quantities such as `cpu: 4` arrive as ints from YAML; they are strings to Kubernetes.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        _need(isinstance(value, str), where, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported schema type {hint!r}")  # a bug in this module, not in the file


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args]
    return " or ".join(names) + " or null"
