"""The Kubeflow pipeline (kfp v2): prepare data -> train -> compress -> evaluate (accuracy gate) -> deploy.

Every step is a container component running one CLI in the serving image (the `image` parameter), and the
steps hand data over through object storage under `work_uri`:

  prepare-data  deepseek-ee data prepare --input RAW --output WORK/data --tokenizer BASE
  train         deepseek-ee train --config CONFIG --model BASE --data WORK/data --output-dir WORK/model
                -> the trained Hugging Face-format model in WORK/model/final
  compress      deepseek-ee compress --model WORK/model/final --output WORK/int8 --method dynamic_quantization
                --eval-data EVAL --max-loss MAX_LOSS   (the compressor's own gate: fails the step beyond it)
  evaluate      deepseek-cne pipeline evaluate --baseline WORK/model/final --candidate WORK/int8 --data EVAL ...
                -> outputs `passed` ("true"/"false") and the JSON accuracy report
  deploy        deepseek-cne deploy --model WORK/int8 --name SERVICE ...   (only when passed == "true")

Steps are never cached: each reads and writes external storage. The deploy step applies the Knative Service
with the pod's service account, which needs RBAC to patch services.serving.knative.dev in `namespace`.
"""

# No `from __future__ import annotations`: kfp reads the component signatures as real types.
import os
import tempfile
from pathlib import Path

from kfp import compiler, dsl

from . import __version__

PIPELINE_NAME = "deepseek-train-compress-deploy"
DEFAULT_IMAGE = f"ghcr.io/deepseek-framework/deepseek-cne:{__version__}"
STEPS = ("prepare-data", "train", "compress", "evaluate", "deploy")


@dsl.container_component
def prepare_data(raw_data_uri: str, output_uri: str, tokenizer: str) -> dsl.ContainerSpec:
    """Tokenize and pack the raw corpus into shards (EE's Dask pipeline)."""
    return dsl.ContainerSpec(
        image=DEFAULT_IMAGE,
        command=["deepseek-ee", "data", "prepare"],
        args=["--input", raw_data_uri, "--output", output_uri, "--tokenizer", tokenizer],
    )


@dsl.container_component
def train(config_uri: str, base_model: str, data_uri: str, output_uri: str) -> dsl.ContainerSpec:
    """Train from the base model on the prepared shards (checkpoints resume from object storage)."""
    return dsl.ContainerSpec(
        image=DEFAULT_IMAGE,
        command=["deepseek-ee", "train"],
        args=["--config", config_uri, "--model", base_model, "--data", data_uri, "--output-dir", output_uri],
    )


@dsl.container_component
def compress(
    model_uri: str, output_uri: str, eval_data_uri: str, max_loss_increase: float
) -> dsl.ContainerSpec:
    """INT8 dynamic quantization of the trained model, behind the compressor's own perplexity gate."""
    return dsl.ContainerSpec(
        image=DEFAULT_IMAGE,
        command=["deepseek-ee", "compress"],
        args=[
            "--model",
            model_uri,
            "--output",
            output_uri,
            "--method",
            "dynamic_quantization",
            "--eval-data",
            eval_data_uri,
            "--max-loss",
            max_loss_increase,
        ],  # fmt: skip
    )


@dsl.container_component
def evaluate(
    baseline_uri: str,
    candidate_uri: str,
    eval_data_uri: str,
    max_loss_increase: float,
    passed: dsl.OutputPath(str),  # type: ignore[valid-type]
    report: dsl.Output[dsl.Artifact],
) -> dsl.ContainerSpec:
    """The accuracy gate: candidate loss within `max_loss_increase` of the baseline's."""
    return dsl.ContainerSpec(
        image=DEFAULT_IMAGE,
        command=["deepseek-cne", "pipeline", "evaluate"],
        args=[
            "--baseline",
            baseline_uri,
            "--candidate",
            candidate_uri,
            "--data",
            eval_data_uri,
            "--max-loss-increase",
            max_loss_increase,
            "--report",
            report.path,
            "--passed",
            passed,
        ],  # fmt: skip
    )


@dsl.container_component
def deploy(
    model_uri: str, service_name: str, namespace: str, image: str, min_scale: int, max_scale: int
) -> dsl.ContainerSpec:
    """Apply the Knative Service serving the compressed model."""
    return dsl.ContainerSpec(
        image=DEFAULT_IMAGE,
        command=["deepseek-cne", "deploy"],
        args=[
            "--model",
            model_uri,
            "--name",
            service_name,
            "--namespace",
            namespace,
            "--image",
            image,
            "--min-scale",
            min_scale,
            "--max-scale",
            max_scale,
        ],  # fmt: skip
    )


@dsl.pipeline(
    name=PIPELINE_NAME, description="prepare data -> train -> compress -> evaluate (gate) -> deploy"
)
def train_compress_deploy(
    raw_data_uri: str,
    eval_data_uri: str,
    work_uri: str,
    train_config_uri: str,
    base_model: str = "deepseek-tiny",
    image: str = DEFAULT_IMAGE,
    train_gpus: int = 1,
    max_loss_increase: float = 0.02,
    service_name: str = "deepseek",
    namespace: str = "default",
    min_scale: int = 0,
    max_scale: int = 4,
) -> None:
    """The whole loop; every URI may be s3://, gs:// or a path on a shared volume."""
    data_uri = f"{work_uri}/data"
    model_uri = f"{work_uri}/model"
    trained_uri = f"{model_uri}/final"  # where the trainer exports the Hugging Face-format model
    int8_uri = f"{work_uri}/int8"
    prep = prepare_data(raw_data_uri=raw_data_uri, output_uri=data_uri, tokenizer=base_model)
    fit = train(config_uri=train_config_uri, base_model=base_model, data_uri=data_uri, output_uri=model_uri)
    fit.after(prep)
    fit.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(train_gpus)
    quant = compress(
        model_uri=trained_uri,
        output_uri=int8_uri,
        eval_data_uri=eval_data_uri,
        max_loss_increase=max_loss_increase,
    ).after(fit)
    gate = evaluate(
        baseline_uri=trained_uri,
        candidate_uri=int8_uri,
        eval_data_uri=eval_data_uri,
        max_loss_increase=max_loss_increase,
    ).after(quant)
    with dsl.If(gate.outputs["passed"] == "true", name="accuracy-gate"):
        serve = deploy(
            model_uri=int8_uri,
            service_name=service_name,
            namespace=namespace,
            image=image,
            min_scale=min_scale,
            max_scale=max_scale,
        )
    for task in (prep, fit, quant, gate, serve):
        task.set_container_image(image)
        task.set_caching_options(False)


def compile_pipeline(output: str | os.PathLike[str]) -> Path:
    """Compile the pipeline to `output` (.yaml or .json), atomically."""
    target = Path(output)
    if target.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"--output: {target} must end in .yaml, .yml or .json")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        compiler.Compiler().compile(pipeline_func=train_compress_deploy, package_path=tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
