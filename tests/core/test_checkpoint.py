"""Checkpoint save/load: sharding, memory use, and clear errors that leave nothing half-written."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from deepseek_core import CheckpointError, ConfigError, ModelConfig, Transformer, load_model, save_model

from .hf_tiny import TINY_CONFIGS


def _tiny(kind: str = "deepseek_v3", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_dict(TINY_CONFIGS[kind])).eval()


@pytest.mark.parametrize("kind", ["llama_gqa", "deepseek_v3"])
def test_sharded_round_trip_is_exact(kind, tmp_path):
    model = _tiny(kind)
    save_model(model, tmp_path / "ckpt", max_shard_size="40KB")
    shards = sorted((tmp_path / "ckpt").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    loaded = load_model(tmp_path / "ckpt")
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert (tmp_path / "ckpt" / "generation_config.json").is_file()


def test_dtype_and_device_conversion(tmp_path):
    save_model(_tiny("llama_gqa"), tmp_path / "ckpt")
    model = load_model(tmp_path / "ckpt", dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_router_weights_stay_float32(tmp_path):
    save_model(_tiny("deepseek_v3"), tmp_path / "ckpt")
    model = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_save_replaces_atomically_and_keeps_other_files(tmp_path):
    target = tmp_path / "ckpt"
    save_model(_tiny("llama_gqa", seed=0), target, max_shard_size="40KB")
    (target / "notes.txt").write_text("keep me")
    save_model(_tiny("llama_gqa", seed=1), target)  # now a single file: old shards must go
    names = {p.name for p in target.iterdir()}
    assert "model.safetensors" in names and not any(n.startswith("model-0") for n in names)
    assert (target / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_model(_tiny("llama_gqa", seed=0), target)
    before = (target / "model.safetensors").read_bytes()
    import deepseek_core.checkpoint as ckpt

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(_tiny("llama_gqa", seed=1), target)
    assert (target / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_onto_a_file_is_refused(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("x")
    with pytest.raises(CheckpointError, match="a-file.*is a file"):
        save_model(_tiny("llama_gqa"), path)
    assert path.read_text() == "x"


# ---------------------------------------------------------------------------- bad input


@pytest.fixture
def saved(tmp_path) -> Path:
    save_model(_tiny("llama_gqa"), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(saved)


def test_unknown_model_type(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json.*'model_type'.*gpt2"):
        load_model(saved)


def test_field_of_wrong_type(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["hidden_size"] = "64"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json.*'hidden_size'.*int.*str"):
        load_model(saved)


def _rewrite(path: Path, drop: str | None = None, reshape: str | None = None) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = torch.zeros(3, 3)
    save_file(tensors, path)


def test_missing_tensor(saved):
    _rewrite(saved / "model.safetensors", drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(saved)


def test_tensor_of_wrong_shape(saved):
    _rewrite(saved / "model.safetensors", reshape="model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*k_proj\.weight.*shape \[3, 3\]"):
        load_model(saved)


def test_truncated_safetensors(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_model(saved)


def test_corrupt_safetensors_header(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + n] = b"{" * n
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupt"):
        load_model(saved)


def test_index_pointing_at_missing_shard(tmp_path):
    save_model(_tiny("llama_gqa"), tmp_path / "ckpt", max_shard_size="40KB")
    second = sorted((tmp_path / "ckpt").glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(CheckpointError, match=r"index\.json.*missing shard .*model-00002-of"):
        load_model(tmp_path / "ckpt")


def test_unknown_model_id_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    from deepseek_core import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match=r"local directory.*cache.*HF_HUB_OFFLINE"):
        load_model("deepseek-ai/definitely-not-here")


# ---------------------------------------------------------------------------- memory


def test_load_peak_memory_is_below_1_3x_checkpoint(tmp_path):
    """Loading a ~200 MB checkpoint raises peak RSS by less than 1.3x its size (measured after imports)."""
    config = ModelConfig.from_preset(
        "deepseek-tiny",
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=10,
        tie_word_embeddings=False,
    )
    model = Transformer(config)
    save_model(model, tmp_path / "ckpt")
    size = sum(p.stat().st_size for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert 150e6 < size < 260e6
    del model
    script = textwrap.dedent(
        f"""
        import resource, torch
        from deepseek_core import load_model
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = load_model({str(tmp_path / "ckpt")!r})
        logits = model(torch.tensor([[1, 2, 3]]))  # touch every weight
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(peak - base)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    increase = int(out.stdout.strip().splitlines()[-1])
    assert increase < 1.3 * size, (
        f"peak RSS grew by {increase / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"
    )


def test_saved_checkpoint_has_ordinary_permissions(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        save_model(_tiny("llama_gqa"), tmp_path / "ckpt")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "ckpt" / "config.json").stat().st_mode) == 0o644
