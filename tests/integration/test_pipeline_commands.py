"""Every step of the compiled Kubeflow pipeline runs a command line that the real CLIs accept.

The pipeline (deepseek-cne) calls deepseek-ee's and deepseek-cne's commands inside containers; nothing else
would notice a flag renamed in one package and not in the other until a cluster ran it. Here each step's
command and arguments, with its input placeholders replaced by values of the declared types, go through the
argparse parser of the CLI it names.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

_PLACEHOLDER = re.compile(r"\{\{\$\.(inputs|outputs)\.(parameters|artifacts)\['([^']+)'\][^}]*\}\}")
_SAMPLE = {"STRING": "s3://bucket/work/x", "NUMBER_DOUBLE": "0.02", "NUMBER_INTEGER": "2", "BOOLEAN": "true"}


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from deepseek_cne.cli import build_parser as cne_parser
    from deepseek_ee.cli import build_parser as ee_parser

    return {"deepseek-ee": ee_parser(), "deepseek-cne": cne_parser()}


def _concrete(arg: str, inputs: dict[str, Any]) -> str:
    def value(match: re.Match[str]) -> str:
        kind, _, name = match.groups()
        if kind == "outputs":
            return f"/tmp/outputs/{name}"
        return _SAMPLE[inputs[name]["parameterType"]]

    return _PLACEHOLDER.sub(value, arg)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Any]:
    from deepseek_cne.pipeline import compile_pipeline

    path = compile_pipeline(tmp_path_factory.mktemp("kfp") / "pipeline.yaml")
    return yaml.safe_load(Path(path).read_text())


def test_every_step_parses_with_the_cli_it_runs(compiled):
    parsers = _parsers()
    executors = compiled["deploymentSpec"]["executors"]
    assert len(executors) == 5
    for name, executor in executors.items():
        container = executor["container"]
        component = compiled["components"][name.replace("exec-", "comp-", 1)]
        inputs = component.get("inputDefinitions", {}).get("parameters", {})
        argv = [_concrete(str(a), inputs) for a in [*container["command"][1:], *container["args"]]]
        assert "{{" not in " ".join(argv), (name, argv)
        parser = parsers[container["command"][0]]
        try:
            parsed = parser.parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"{name}: `{container['command'][0]} {' '.join(argv)}` is refused") from exc
        assert callable(getattr(parsed, "func", None) or getattr(parsed, "handler", None)), name


def test_trained_model_flows_from_train_to_compress_and_gate(compiled):
    tasks = compiled["root"]["dag"]["tasks"]

    def constant(task: str, parameter: str) -> str:
        return tasks[task]["inputs"]["parameters"][parameter]["runtimeValue"]["constant"]

    trained = constant("train", "output_uri") + "/final"  # the trainer exports the HF-format model there
    assert constant("compress", "model_uri") == trained
    assert constant("evaluate", "baseline_uri") == trained
    assert constant("evaluate", "candidate_uri") == constant("compress", "output_uri")
