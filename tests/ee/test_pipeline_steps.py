"""The Kubeflow pipeline's EE steps as its containers run them, on object storage (moto on loopback):
`deepseek-ee train` with its config, model and data given on the command line and its output on s3://,
then `deepseek-ee compress` reading the trained model and the held-out text from s3:// and publishing the
INT8 checkpoint there (hash manifest last), which core then loads from the bucket."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import driver_env
from test_train_cli import EE_YAML, write_corpus

pytestmark = pytest.mark.integration


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = driver_env(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    return subprocess.run(
        [sys.executable, "-m", "deepseek_ee.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def test_train_then_compress_through_object_storage(s3_bucket: str, tmp_path: Path) -> None:
    from deepseek_core import load_model, storage
    from deepseek_core.quant import Int8Linear
    from deepseek_core.training import train_tokenizer

    write_corpus(tmp_path / "corpus.txt")
    train_tokenizer(tmp_path / "corpus.txt", vocab_size=320, output_dir=tmp_path / "tok")
    # The config names another model and data; --model / --data on the command line win (as the pipeline
    # passes them), and the config itself is read from the bucket.
    config = EE_YAML.replace("preset: deepseek-tiny", "path: /nonexistent/model").replace(
        "path: corpus.txt", "path: /nonexistent/data.txt"
    )
    with storage.open_url(f"{s3_bucket}/config/ee.yaml", "wb") as handle:
        handle.write(config.encode())
    with storage.open_url(f"{s3_bucket}/eval.txt", "wb") as handle:
        handle.write((tmp_path / "corpus.txt").read_bytes()[:20000])
    work = f"{s3_bucket}/work"

    trained = _run(
        "train", "--config", f"{s3_bucket}/config/ee.yaml", "--model", "deepseek-tiny", "--data", "corpus.txt",
        "--output-dir", f"{work}/model", "--no-tracking", cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "step 3/3" in trained.stdout
    assert storage.read_manifest(f"{work}/model/final")  # published complete

    compressed = _run(
        "compress", "--model", f"{work}/model/final", "--output", f"{work}/int8", "--eval-data",
        f"{s3_bucket}/eval.txt", "--eval-tokens", "2048", "--max-loss", "0.5", cwd=tmp_path,
    )  # fmt: skip
    assert compressed.returncode == 0, compressed.stdout[-3000:] + compressed.stderr[-3000:]
    assert f"published: {work}/int8" in compressed.stdout
    files = set(storage.read_manifest(f"{work}/int8")["files"])
    assert {"config.json", "compression_report.json", "tokenizer.json"} <= files

    # A damaged quantization fails the gate: nothing is published, the report lands beside the URL.
    failed = _run(
        "compress", "--model", f"{work}/model/final", "--output", f"{work}/int8-bad", "--eval-data",
        f"{s3_bucket}/eval.txt", "--eval-tokens", "2048", "--granularity", "per-tensor", "--clip-ratio", "0.02",
        cwd=tmp_path,
    )  # fmt: skip
    assert failed.returncode == 1 and "accuracy gate failed" in failed.stderr, failed.stdout + failed.stderr
    assert storage.read_manifest(f"{work}/int8-bad") is None
    with storage.open_url(f"{work}/int8-bad.compression_report.json") as handle:
        assert json.loads(handle.read())["passed"] is False

    model = load_model(storage.fetch_checkpoint(f"{work}/int8"), device="cpu")
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids)).all()


def test_compress_names_an_unreadable_remote_model(s3_bucket: str, tmp_path: Path) -> None:
    done = _run(
        "compress", "--model", f"{s3_bucket}/missing", "--output", str(tmp_path / "int8"), "--force",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and f"--model: cannot read {s3_bucket}/missing" in done.stderr, done.stderr
    assert not (tmp_path / "int8").exists()
