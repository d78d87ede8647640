"""MLflow tracking: a real `mlflow server` on loopback receives one run from a two-process job (rank 0 only),
with params, per-step metrics, artifacts and a registered model version, read back through MlflowClient."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import ddp_driver
import pytest
import torch
from test_distributed import (
    GLOBAL_BATCH,
    driver_env,
    free_port,
    load_weights,
    max_diff,
    start_driver,
    stop_group,
    wait_ok,
)

pytestmark = pytest.mark.integration

SERVER_START_TIMEOUT_S = 240
MAX_STEPS = 4


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` with a sqlite store and a proxied artifact folder, in its own process group."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed in the fixture's teardown
    env = driver_env(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited {proc.returncode}:\n{(root / 'server.log').read_text()[-3000:]}"
                )
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server not ready in {SERVER_START_TIMEOUT_S}s:\n{(root / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        # The server forks workers: end the whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


def test_two_process_job_logs_one_run_to_the_server(tmp_path: Path, mlflow_server: str) -> None:
    from deepseek_core import load_model
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    out = tmp_path / "job"
    out.mkdir()
    log = tmp_path / "driver.log"
    proc = start_driver(
        out, "--gpus-per-node", "2", "--batch-size", str(GLOBAL_BATCH // 2), "--max-steps", str(MAX_STEPS),
        "--tracking-uri", mlflow_server, log=log, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
    )  # fmt: skip
    try:
        wait_ok(proc, log)
    finally:
        stop_group(proc)

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    experiment = client.get_experiment_by_name("ddp-test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # rank 1 logged nothing
    run = runs[0]
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["world_size"] == "2" and params["num_nodes"] == "1" and params["devices_per_node"] == "2"
    assert params["strategy"] == "ddp" and params["backend"] == "gloo"
    assert params["global_batch_size"] == str(GLOBAL_BATCH)
    assert params["training.max_steps"] == str(MAX_STEPS) and params["training.learning_rate"] == "0.001"
    assert int(params["model.parameters"]) == sum(p.numel() for p in ddp_driver.tiny_model().parameters())
    assert params["model.hidden_size"] == "64" and params["model.num_hidden_layers"] == "2"

    history = {key: client.get_metric_history(run.info.run_id, key) for key in
               ("train_loss", "learning_rate", "tokens_per_s", "grad_norm")}  # fmt: skip
    for key, points in history.items():
        assert [p.step for p in sorted(points, key=lambda p: p.step)] == list(range(1, MAX_STEPS + 1)), key
    losses = [p.value for p in sorted(history["train_loss"], key=lambda p: p.step)]
    assert all(0 < v < 10 for v in losses)
    rates = [p.value for p in sorted(history["learning_rate"], key=lambda p: p.step)]
    assert rates[0] < rates[1]  # warmup_steps=2: step 1 ran at half the peak
    assert all(p.value > 0 for p in history["tokens_per_s"] + history["grad_norm"])

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "config", "loss_curve.png"} <= top
    model_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"config.json", "model.safetensors"} <= model_files
    assert "training_config.json" in {
        Path(a.path).name for a in client.list_artifacts(run.info.run_id, "config")
    }

    versions = client.search_model_versions("name='ddp-test'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id
    assert versions[0].source.rstrip("/").endswith("model")

    # The registered artifacts are the trained weights.
    local = download_artifacts(
        run_id=run.info.run_id,
        artifact_path="model",
        dst_path=str(tmp_path / "dl"),
        tracking_uri=mlflow_server,
    )
    loaded = load_model(local, dtype=torch.float32, device="cpu").state_dict()
    trained = load_weights(out / "weights-rank0.pt")
    assert max_diff({k: loaded[k] for k in trained}, trained) == 0.0
