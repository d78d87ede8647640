"""The Kubeflow pipeline (compiled with the kfp v2 SDK) and its accuracy-gate step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from deepseek_cne.cli import main
from deepseek_core import ModelConfig, Tokenizer, Transformer, load_model, save_model
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

STEPS = ["prepare-data", "train", "compress", "evaluate", "deploy"]
TEXT = " ".join(
    f"the {a} model reads {b} tokens and writes {c} answers." for a in ("small", "large", "quick", "slow")
    for b in ("many", "few", "long", "short") for c in ("good", "bad", "new")
)  # fmt: skip


def compiled(tmp_path: Path) -> dict:  # type: ignore[type-arg]
    out = tmp_path / "pipeline.yaml"
    assert main(["pipeline", "compile", "--output", str(out)]) == 0
    return yaml.safe_load(out.read_text())


def test_pipeline_has_the_five_steps_in_order(tmp_path: Path) -> None:
    spec = compiled(tmp_path)
    root = spec["root"]["dag"]["tasks"]
    deps = {name: task.get("dependentTasks", []) for name, task in root.items()}
    assert deps["prepare-data"] == []
    assert deps["train"] == ["prepare-data"]
    assert deps["compress"] == ["train"]
    assert deps["evaluate"] == ["compress"]
    # deploy sits inside the gate's sub-DAG, which waits on evaluate and fires on its `passed` output
    (gate_name,) = [n for n in root if n.startswith("condition")]
    gate = root[gate_name]
    assert gate["dependentTasks"] == ["evaluate"]
    assert gate["taskInfo"]["name"] == "accuracy-gate"
    condition = gate["triggerPolicy"]["condition"]
    (channel,) = [k for k, v in gate["inputs"]["parameters"].items() if "taskOutputParameter" in v]
    assert gate["inputs"]["parameters"][channel]["taskOutputParameter"] == {
        "outputParameterKey": "passed",
        "producerTask": "evaluate",
    }
    assert channel in condition and "'true'" in condition
    inner = spec["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    assert list(inner) == ["deploy"]

    # topological order of the whole graph is exactly the five steps
    order, placed = [], set()
    graph = {**{n: set(d) for n, d in deps.items() if n != gate_name}, "deploy": {"evaluate"}}
    while graph:
        ready = sorted(n for n, d in graph.items() if d <= placed)
        assert len(ready) == 1, ready
        order.append(ready[0])
        placed.add(ready[0])
        del graph[ready[0]]
    assert order == STEPS


def test_steps_run_the_clis_in_the_image_parameter(tmp_path: Path) -> None:
    spec = compiled(tmp_path)
    executors = spec["deploymentSpec"]["executors"]
    commands = {name: ex["container"]["command"] for name, ex in executors.items()}
    assert commands["exec-prepare-data"] == ["deepseek-ee", "data", "prepare"]
    assert commands["exec-train"] == ["deepseek-ee", "train"]
    assert commands["exec-compress"] == ["deepseek-ee", "compress"]
    assert commands["exec-evaluate"] == ["deepseek-cne", "pipeline", "evaluate"]
    assert commands["exec-deploy"] == ["deepseek-cne", "deploy"]
    for ex in executors.values():
        assert ex["container"]["image"] == "{{$.inputs.parameters['pipelinechannel--image']}}"
    assert (
        executors["exec-train"]["container"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    )
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"image", "work_uri", "raw_data_uri", "eval_data_uri", "max_loss_increase"} <= set(params)
    assert "--dry-run" not in executors["exec-deploy"]["container"]["args"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer, a model briefly trained on TEXT, its bf16 copy, and an untrained model."""
    root = tmp_path_factory.mktemp("gate")
    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(
        [TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"])
    )
    tok = Tokenizer(hf, {"bos_token": "<s>", "eos_token": "</s>"})
    (root / "eval.txt").write_text(TEXT)

    torch.manual_seed(0)
    config = ModelConfig.from_preset("deepseek-tiny")
    untrained = Transformer(config)
    save_model(untrained, root / "untrained", tokenizer=tok)
    model = Transformer(config)
    model.load_state_dict(untrained.state_dict())
    ids = torch.tensor(tok.encode(TEXT))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(6):  # a few steps on the held-out text itself: clearly better than untrained
        start = (step * 64) % (len(ids) - 65)
        batch = ids[start : start + 65].unsqueeze(0)
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1])[0], batch[0, 1:])
        optim.zero_grad()
        loss.backward()
        optim.step()
    save_model(model, root / "trained", tokenizer=tok)
    save_model(load_model(root / "trained"), root / "trained-bf16", dtype=torch.bfloat16, tokenizer=tok)
    return {
        "root": root,
        "trained": root / "trained",
        "bf16": root / "trained-bf16",
        "untrained": root / "untrained",
    }


def gate(checkpoints: dict[str, Path], candidate: str, *extra: str) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    root = checkpoints["root"]
    report, passed = root / f"{candidate}.json", root / f"{candidate}.passed"
    code = main([
        "pipeline", "evaluate", "--baseline", str(checkpoints["trained"]), "--candidate", str(checkpoints[candidate]),
        "--data", str(root / "eval.txt"), "--seq-len", "64", "--report", str(report), "--passed", str(passed), *extra,
    ])  # fmt: skip
    return code, json.loads(report.read_text()), passed.read_text()


def test_gate_passes_a_bf16_copy_and_stops_a_worse_model(checkpoints: dict[str, Path]) -> None:
    code, report, passed = gate(checkpoints, "bf16")
    assert code == 0 and passed == "true" and report["passed"] is True
    assert abs(report["relative_increase"]) < 0.02 and report["tokens"] >= 64

    code, report, passed = gate(checkpoints, "untrained")
    assert code == 0 and passed == "false" and report["passed"] is False
    assert report["candidate_loss"] > report["baseline_loss"] * 1.02
    code, _, _ = gate(checkpoints, "untrained", "--fail-on-regression")
    assert code == 3


def test_gate_errors_name_the_input(checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["pipeline", "evaluate", "--baseline", str(checkpoints["trained"]),
                 "--candidate", str(checkpoints["bf16"]), "--data", "/nonexistent.txt"])  # fmt: skip
    assert code == 1 and "--data" in capsys.readouterr().err
