"""`deepseek-ee train --config ee.yaml`: a tiny job end to end in one process (text file, trained tokenizer,
embedded MLflow sqlite store), and clear errors for configs that cannot train."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import driver_env

EE_YAML = """\
model: {preset: deepseek-tiny}
data: {path: corpus.txt, tokenizer: tok}
training:
  output_dir: out
  max_steps: 3
  batch_size: 2
  seq_len: 32
  warmup_steps: 1
  save_every: 2
  log_every: 1
  eval_every: 0
  eval_fraction: 0.1
  progress_bar: false
distributed: {strategy: ddp, gpus: 0, num_nodes: 1}
tracking: {experiment: cli-test, registered_model: tiny-cli}
"""


def write_corpus(path: Path) -> None:
    lines = [
        f"Line {i}: the quick brown fox {i % 7} jumps over the lazy dog number {i * 3 % 11}."
        for i in range(400)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.integration
def test_train_command_writes_a_loadable_checkpoint_and_an_mlflow_run(tmp_path: Path) -> None:
    from deepseek_core import Tokenizer, load_model
    from deepseek_core.training import train_tokenizer
    from mlflow.tracking import MlflowClient

    write_corpus(tmp_path / "corpus.txt")
    train_tokenizer(tmp_path / "corpus.txt", vocab_size=320, output_dir=tmp_path / "tok")
    (tmp_path / "ee.yaml").write_text(EE_YAML, encoding="utf-8")
    env = driver_env(
        MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", DEEPSEEK_CACHE_DIR=str(tmp_path / "cache")
    )
    done = subprocess.run(
        [sys.executable, "-m", "deepseek_ee.cli", "train", "--config", "ee.yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    final = tmp_path / "out" / "final"
    assert f"model: {Path('out') / 'final'}" in done.stdout or f"model: {final}" in done.stdout
    assert "step 3/3" in done.stdout and "eval loss" in done.stdout  # held-out 10% evaluated at the end

    model = load_model(final, dtype=torch.float32, device="cpu")
    tokenizer = Tokenizer.from_pretrained(final)
    ids = torch.tensor([tokenizer.encode("the quick brown fox")])
    logits = model(ids)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    assert (tmp_path / "out" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "out" / "loss_curve.png").stat().st_size > 1000

    # No tracking URI configured: an sqlite store in the working directory.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("cli-test")
    assert experiment is not None and experiment.artifact_location.startswith(
        (tmp_path / "mlartifacts").as_uri()
    )
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "1"
    assert "ee.yaml" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "config")}
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 3
    (version,) = client.search_model_versions("name='tiny-cli'")
    assert version.run_id == run.info.run_id


def test_train_command_refuses_a_config_without_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepseek_ee.cli import main

    config = tmp_path / "ee.yaml"
    config.write_text("model: {preset: deepseek-tiny}\ntraining: {max_steps: 2}\n", encoding="utf-8")
    assert main(["train", "--config", str(config), "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and str(config) in err


def test_train_command_refuses_nccl_without_gpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deepseek_ee.cli import main

    config = tmp_path / "ee.yaml"
    config.write_text("data: {path: x.txt}\ndistributed: {backend: nccl, gpus: 0}\n", encoding="utf-8")
    assert main(["train", "--config", str(config)]) == 2
    assert "distributed.backend" in capsys.readouterr().err
