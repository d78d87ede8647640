"""The EE YAML config loader: the design's shape loads; bad input names the file and the field."""

from __future__ import annotations

import pytest
from deepseek_core.errors import ConfigError
from deepseek_ee.config import EEConfig, load_ee_config, parse_ee_config

DESIGN_EXAMPLE = """\
distributed:
  strategy: ddp        # ddp | fsdp
  backend: nccl        # nccl | gloo
  gpus: 4              # per node
  num_nodes: 1
compression:
  method: dynamic_quantization
  dtype: int8
"""


def test_design_example_loads(tmp_path):
    path = tmp_path / "ee.yaml"
    path.write_text(DESIGN_EXAMPLE)
    config = load_ee_config(path)
    assert isinstance(config, EEConfig) and config.source == path
    dist = config.distributed
    assert (dist.strategy, dist.backend, dist.gpus, dist.num_nodes) == ("ddp", "nccl", 4, 1)
    assert dist.world_size == 4
    assert (config.compression.method, config.compression.dtype) == ("dynamic_quantization", "int8")
    # Sections left out get their defaults.
    assert config.tracking.experiment == "deepseek-ee" and config.tracking.tracking_uri is None
    assert config.training.optimizer == "adamw" and config.training.hyperparameters is not None


def test_all_sections(tmp_path):
    text = """
model: {path: /models/base, dtype: bfloat16}
data: {path: /data/shards, eval_path: /data/eval.jsonl, inputs: ["/raw/*.jsonl", /raw/extra.txt], scheduler: "tcp://10.0.0.1:8786"}
training:
  optimizer: adafactor
  optimizer_options: {scale_parameter: false, relative_step: true, warmup_init: true}
  output_dir: /ckpt
  resume: false
  max_steps: 50
  warmup_steps: 5
  learning_rate: 1
  batch_size: 4
distributed: {strategy: fsdp, gpus: 8, num_nodes: 2}
compression: {method: weight_only, max_loss_increase: 0.01}
tracking: {tracking_uri: "http://127.0.0.1:5000", experiment: exp, run_name: r1, registered_model: chat}
kubernetes: {name: run, namespace: ml, cpu: 16, memory: 64Gi, node_selector: {gpu: h100}, env: {NCCL_DEBUG: WARN}}
deploy: {name: chat, model: /models/int8, replicas: 2, hpa_metric: waiting}
"""
    path = tmp_path / "ee.yaml"
    path.write_text(text)
    config = load_ee_config(path)
    assert config.model.source == "/models/base" and config.model.dtype == "bfloat16"
    assert config.data.inputs == ["/raw/*.jsonl", "/raw/extra.txt"]
    assert config.training.optimizer_options == {
        "scale_parameter": False,
        "relative_step": True,
        "warmup_init": True,
    }
    assert config.training.resume is False and config.training.output_dir == "/ckpt"
    hp = config.training.hyperparameters
    assert (hp.max_steps, hp.warmup_steps, hp.batch_size) == (50, 5, 4)
    assert hp.learning_rate == 1.0 and isinstance(hp.learning_rate, float)  # YAML int accepted for a float
    assert config.distributed.backend == "nccl"  # default follows gpus
    assert config.distributed.world_size == 16
    assert config.kubernetes.cpu == "16"  # quantities are strings to Kubernetes
    assert config.kubernetes.node_selector == {"gpu": "h100"}
    assert config.deploy.hpa_metric == "waiting"


def test_cpu_defaults_to_gloo():
    config = parse_ee_config("distributed: {gpus: 0, num_nodes: 2, processes_per_node: 3}")
    assert config.distributed.backend == "gloo" and config.distributed.world_size == 6


def test_empty_file_is_all_defaults(tmp_path):
    path = tmp_path / "ee.yaml"
    path.write_text("# nothing yet\n")
    config = load_ee_config(path)
    assert config.distributed.num_nodes == 1 and config.model.source is None


@pytest.mark.parametrize(
    "text,field,why",
    [
        ("distributed: {gpus: four}", "distributed.gpus", "expected an integer"),
        ("distributed: {gpus: 1.5}", "distributed.gpus", "expected an integer"),
        ("distributed: {num_nodes: 0}", "distributed.num_nodes", "must be >= 1"),
        ("distributed: {strategy: deepspeed}", "distributed.strategy", "must be one of ddp, fsdp"),
        ("distributed: {backend: mpi, gpus: 1}", "distributed.backend", "must be one of nccl, gloo"),
        ("distributed: {backend: nccl, gpus: 0}", "distributed.backend", "nccl needs GPUs"),
        ("distributed: {gpu: 4}", "distributed.gpu", "unknown field"),
        ("distributed: [ddp]", "distributed", "expected a mapping"),
        ("distributed: {processes_per_node: 2, gpus: 2}", "distributed.processes_per_node", "CPU runs"),
        ("compression: {dtype: int4}", "compression.dtype", "must be one of int8"),
        ("compression: {method: pruning}", "compression.method", "must be one of"),
        ("training: {optimizer: sgd}", "training.optimizer", "must be one of adamw, adafactor"),
        ("training: {max_steps: 0}", "training.max_steps", "must be >= 1"),
        ("training: {learning_rate: fast}", "training.learning_rate", "expected float"),
        ("training: {max_stepz: 10}", "training.max_stepz", "unknown field"),
        (
            "training: {optimizer_options: {beta1: 0.9}}",
            "training.optimizer_options",
            "only applies to optimizer: adafactor",
        ),
        (
            "training: {optimizer: adafactor, optimizer_options: {lr: 0.01}}",
            "training.optimizer_options",
            "relative_step",
        ),
        (
            "training: {optimizer: adafactor, optimizer_options: {betas: 1}}",
            "training.optimizer_options.betas",
            "not an AdaFactor option",
        ),
        ("model: {preset: deepseek-huge}", "model.preset", "unknown preset"),
        ("model: {preset: deepseek-tiny, path: /m}", "model", "either preset or path"),
        ("model: {dtype: float8}", "model.dtype", "must be one of"),
        ("data: {inputs: /raw/a.txt}", "data.inputs", "expected a list"),
        ("tracking: {experiment: ''}", "tracking.experiment", "non-empty"),
        ("kubernetes: {name: My_Job}", "kubernetes.name", "DNS label"),
        ("kubernetes: {memory: lots}", "kubernetes.memory", "quantity"),
        ("kubernetes: {env: {DEBUG: true}}", "kubernetes.env.DEBUG", "expected a string"),
        ("kubernetes: {config_path: ee.yaml}", "kubernetes.config_path", "absolute path"),
        ("deploy: {hpa_metric: memory}", "deploy.hpa_metric", "must be one of cpu, waiting"),
        ("deploy: {min_replicas: 4, max_replicas: 2}", "deploy.max_replicas", "min_replicas"),
        ("trainig: {max_steps: 1}", "trainig", "unknown section"),
    ],
)
def test_errors_name_file_and_field(tmp_path, text, field, why):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as exc:
        load_ee_config(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: {field}: "), message
    assert why in message


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("distributed:\n  gpus: 4\n  num_nodes: [1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: invalid YAML \(line \d+, column \d+\)"):
        load_ee_config(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_ee_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_ee_config(tmp_path / "nope.yaml")
