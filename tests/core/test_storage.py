"""Object storage against a real S3-compatible server (moto's standalone server on loopback)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from deepseek_core import (
    CheckpointError,
    ModelConfig,
    ModelNotFoundError,
    Transformer,
    load_model,
    save_model,
    storage,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("deepseek-tiny"))
    # two shards, so the manifest covers an index file and several weight files
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny", max_shard_size="3MB")


def _logits(model: Transformer) -> torch.Tensor:
    ids = torch.arange(0, 96, 3).unsqueeze(0)
    with torch.no_grad():
        return model(ids)


def test_upload_fetch_and_load_model_from_s3_url(s3_bucket: str, tiny_checkpoint: Path) -> None:
    url = storage.upload_directory(tiny_checkpoint, f"{s3_bucket}/runs/a/step-00000010")
    assert storage.remote_exists(url)
    assert storage.remote_exists(f"{url}/{storage.MANIFEST_NAME}")
    manifest = storage.read_manifest(url)
    assert manifest is not None
    local_files = sorted(p.name for p in tiny_checkpoint.iterdir() if p.is_file())
    assert sorted(manifest["files"]) == local_files
    assert any(name.endswith(".safetensors") for name in local_files) and len(local_files) >= 4

    directory = storage.fetch_checkpoint(url)
    assert directory.is_relative_to(storage.cache_root())
    for name in local_files:
        assert (directory / name).read_bytes() == (tiny_checkpoint / name).read_bytes()

    expected = _logits(load_model(tiny_checkpoint))
    got = _logits(load_model(url))
    assert torch.equal(got, expected)
    assert ModelConfig.from_pretrained(url) == ModelConfig.from_json_file(tiny_checkpoint / "config.json")


def test_corrupt_cached_file_is_detected_and_fetched_again(
    s3_bucket: str, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = storage.upload_directory(tiny_checkpoint, f"{s3_bucket}/corrupt/step-1")
    directory = storage.fetch_checkpoint(url)
    shard = sorted(directory.glob("*.safetensors"))[0]
    original = shard.read_bytes()
    corrupted = bytearray(original)
    corrupted[len(corrupted) // 2] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(corrupted))

    with caplog.at_level(logging.WARNING, logger="deepseek_core.storage"):
        again = storage.fetch_checkpoint(url)
    assert again == directory
    assert shard.read_bytes() == original
    assert any(shard.name in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    assert torch.equal(_logits(load_model(url)), _logits(load_model(tiny_checkpoint)))


def test_corrupt_remote_object_is_refused(s3_bucket: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    url = storage.upload_directory(tiny_checkpoint, f"{s3_bucket}/tampered/step-1")
    with storage.open_url(f"{url}/config.json", "wb") as handle:
        handle.write(b'{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match=r"config\.json.*does not match"):
        storage.fetch_checkpoint(url, cache_dir=tmp_path / "other-cache")


def test_half_upload_without_manifest_is_not_complete(s3_bucket: str, tiny_checkpoint: Path) -> None:
    prefix = f"{s3_bucket}/resume"
    complete = storage.upload_directory(tiny_checkpoint, f"{prefix}/step-00000100")
    # A newer checkpoint whose upload died before the manifest: some files, no checksums.sha256.json.
    fs, path = storage._filesystem(prefix)
    for name in ("config.json", sorted(p.name for p in tiny_checkpoint.glob("*.safetensors"))[0]):
        fs.put_file(str(tiny_checkpoint / name), f"{path}/step-00000200/{name}")

    assert storage.list_prefixes(prefix) == [f"{prefix}/step-00000100", f"{prefix}/step-00000200"]
    assert storage.latest_complete_checkpoint(prefix) == complete
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        storage.fetch_checkpoint(f"{prefix}/step-00000200")
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_model(f"{prefix}/step-00000200")

    # Finishing the upload makes it the latest complete checkpoint.
    finished = storage.upload_directory(tiny_checkpoint, f"{prefix}/step-00000200")
    assert storage.latest_complete_checkpoint(prefix) == finished
    assert storage.latest_complete_checkpoint(f"{s3_bucket}/nothing-here") is None


def test_reupload_replaces_files_and_removes_stale_ones(
    s3_bucket: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    url = f"{s3_bucket}/replace/step-1"
    storage.upload_directory(tiny_checkpoint, url)
    first = storage.fetch_checkpoint(url)
    assert len(list(first.glob("*.safetensors"))) >= 2

    single = save_model(load_model(tiny_checkpoint), tmp_path / "single")  # one shard this time
    storage.upload_directory(single, url)
    fs, path = storage._filesystem(url)
    remote_names = sorted(Path(p).name for p in fs.find(path))
    assert remote_names == sorted([*(p.name for p in single.iterdir() if p.is_file()), storage.MANIFEST_NAME])
    second = storage.fetch_checkpoint(url)
    assert sorted(p.name for p in second.glob("*.safetensors")) == ["model.safetensors"]
    assert not (second / "model.safetensors.index.json").exists()
    assert torch.equal(_logits(load_model(url)), _logits(load_model(tiny_checkpoint)))


def test_fetch_only_config_and_errors(s3_bucket: str, tiny_checkpoint: Path) -> None:
    url = storage.upload_directory(tiny_checkpoint, f"{s3_bucket}/partial/step-1")
    directory = storage.fetch_checkpoint(url, patterns=["config.json"])
    fetched = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    assert fetched == sorted(["config.json", storage.MANIFEST_NAME])
    with pytest.raises(ModelNotFoundError, match="no checkpoint here"):
        storage.fetch_checkpoint(f"{s3_bucket}/missing/step-1")
    with pytest.raises(ModelNotFoundError):
        load_model(f"{s3_bucket}/missing/step-1")


def test_open_url_round_trip_and_manifest_validation(s3_bucket: str) -> None:
    with storage.open_url(f"{s3_bucket}/notes/a.json", "w") as handle:
        handle.write(json.dumps({"x": 1}))
    with storage.open_url(f"{s3_bucket}/notes/a.json", "r") as handle:
        assert json.load(handle) == {"x": 1}
    with storage.open_url(f"{s3_bucket}/bad/step-1/{storage.MANIFEST_NAME}", "wb") as handle:
        handle.write(
            json.dumps(
                {"algorithm": "sha256", "files": {"../escape": {"sha256": "0" * 64, "size": 1}}}
            ).encode()
        )
    with pytest.raises(CheckpointError, match="unsafe path"):
        storage.fetch_checkpoint(f"{s3_bucket}/bad/step-1")


def test_local_paths_use_the_same_api(tmp_path: Path, tiny_checkpoint: Path) -> None:
    prefix = tmp_path / "out"
    storage.upload_directory(tiny_checkpoint, prefix / "step-3")
    (prefix / "step-9").mkdir(parents=True)
    (prefix / "step-9" / "config.json").write_text("{}")  # no manifest: incomplete
    assert storage.latest_complete_checkpoint(prefix) == str(prefix / "step-3")
    assert storage.fetch_checkpoint(prefix / "step-3") == prefix / "step-3"
    assert (
        not storage.is_remote(str(prefix)) and storage.is_remote("gs://b/x") and storage.is_remote("s3://b")
    )
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        storage.remote_exists("ftp://host/x")
