"""cne.yaml validation (errors name the file and field), key hashing, and the `hash-key` command."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from deepseek_cne.gateway.config import config_from_dict, hash_key, load_config, parse_size
from deepseek_core.errors import ConfigError


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    return directory


def _config(model_dir: Path, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "models": [
            {"name": "shared", "uri": str(model_dir)},
            {"name": "mine", "uri": str(model_dir), "shared": False},
        ],
        "tenants": [
            {"name": "a", "api_keys": [_sha("key-a")], "models": ["mine"]},
            {
                "name": "b",
                "api_keys": [_sha("key-b")],
                "shared_models": ["shared"],
                "requests_per_minute": 10,
            },
        ],
    }
    data.update(changes)
    return data


def test_valid_config_and_visibility(model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "cne.yaml"
    path.write_text(
        "warm_pool: 2\nport: 9000\nmodels:\n"
        "  - {name: shared, uri: m, kv_cache_bytes: 16MiB, idle_timeout_s: 2}\n"
        "  - {name: mine, uri: m, shared: false}\n"
        f"tenants:\n  - {{name: a, api_keys: [{_sha('k')}], models: [mine], tokens_per_minute: 100}}\n"
        f"  - {{name: b, api_keys: [{_sha('k2')}], shared_models: []}}\n"
    )
    config = load_config(path)
    assert config.warm_pool == 2 and config.port == 9000
    assert config.models["shared"].uri == str(model_dir)  # relative to the config file
    assert config.models["shared"].kv_cache_bytes == 16 * 1024**2
    assert config.models["shared"].idle_timeout_s == 2.0
    assert config.visible_models(config.tenants["a"]) == ["mine", "shared"]
    assert config.visible_models(config.tenants["b"]) == []
    assert config.engine_priority == "idle"  # the default: request handling goes before model steps
    assert config_from_dict(_config(model_dir, engine_priority="normal")).engine_priority == "normal"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"tenants": [{"name": "a", "api_keys": ["key-a"], "models": ["mine"]}]},
            "tenants[0].api_keys[0]: must be the sha256",
        ),
        ({"bogus": 1}, "unknown field(s) bogus"),
        ({"warm_pool": -1}, "warm_pool: must be an integer >= 0"),
        ({"port": 70000}, "port: must be <= 65535"),
        ({"engine_priority": "high"}, "engine_priority: must be one of 'normal', 'idle', got 'high'"),
    ],
)
def test_errors_name_the_field(model_dir: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="cne.yaml") as info:
        config_from_dict(_config(model_dir, **change))
    assert message in str(info.value)


def test_private_models_need_exactly_one_owner(model_dir: Path) -> None:
    data = _config(model_dir)
    data["tenants"][0]["models"] = []
    with pytest.raises(ConfigError, match="'mine' is private .* no tenant lists it"):
        config_from_dict(data)
    data = _config(model_dir)
    data["tenants"][1]["models"] = ["mine"]
    with pytest.raises(
        ConfigError, match=r"tenants\[1\].models\[0\]: 'mine' is already private to tenant 'a'"
    ):
        config_from_dict(data)
    data = _config(model_dir)
    data["tenants"][1]["models"] = ["shared"]
    with pytest.raises(ConfigError, match="'shared' is shared; list shared models under shared_models"):
        config_from_dict(data)
    data = _config(model_dir)
    data["tenants"][1]["shared_models"] = ["mine"]
    with pytest.raises(ConfigError, match=r"shared_models\[0\]: 'mine' is private"):
        config_from_dict(data)


def test_model_fields_are_checked(model_dir: Path, tmp_path: Path) -> None:
    data = _config(model_dir)
    data["models"][0]["uri"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"models\[0\].uri: .* is not a checkpoint directory"):
        config_from_dict(data)
    data = _config(model_dir)
    data["models"][0]["dtype"] = "int3"
    with pytest.raises(ConfigError, match=r"models\[0\].dtype: must be one of"):
        config_from_dict(data)
    data = _config(model_dir)
    data["models"][0]["kv_cache_bytes"] = "12 parsecs"
    with pytest.raises(ConfigError, match=r"models\[0\].kv_cache_bytes: expected a size"):
        config_from_dict(data)
    data = _config(model_dir)
    data["models"].append({"name": "shared", "uri": str(model_dir)})
    with pytest.raises(ConfigError, match=r"models\[2\].name: 'shared' is defined twice"):
        config_from_dict(data)
    data = _config(model_dir)
    data["tenants"][1]["api_keys"] = [_sha("key-a")]
    with pytest.raises(ConfigError, match="the same key is already given to 'a'"):
        config_from_dict(data)
    data = _config(model_dir)
    data["models"].append({"name": "remote", "uri": "s3://bucket/prefix"})  # not checked until it is loaded
    assert config_from_dict(data).models["remote"].uri == "s3://bucket/prefix"


def test_parse_size() -> None:
    assert parse_size(1024, "x") == 1024
    assert parse_size("64MiB", "x") == 64 * 1024**2
    assert parse_size("1.5GB", "x") == 1_500_000_000
    assert parse_size("512k", "x") == 512_000
    assert parse_size("2 GiB", "x") == 2 * 1024**3
    with pytest.raises(ConfigError, match="x: must be > 0"):
        parse_size(0, "x")


def test_hash_key_and_the_command() -> None:
    assert hash_key("secret") == _sha("secret")
    with pytest.raises(ValueError, match="key"):
        hash_key("")
    out = subprocess.run(
        [sys.executable, "-m", "deepseek_cne.cli", "hash-key"],
        input="secret\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == _sha("secret")


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "cne.yaml"
    path.write_text("models: []\ntenants: []\n")
    out = subprocess.run(
        [sys.executable, "-m", "deepseek_cne.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert "models: must be a non-empty list" in out.stderr and str(path) in out.stderr
