"""ModelConfig: both rope spellings, size estimates, presets and validation."""

from __future__ import annotations

import json

import pytest
import torch
from deepseek_core import ConfigError, ModelConfig, Transformer
from deepseek_core.presets import preset_names

from .hf_tiny import TINY_CONFIGS, hf_config


def test_old_and_new_rope_spellings_agree():
    base = dict(TINY_CONFIGS["deepseek_v3"])
    scaling = base.pop("rope_scaling")
    legacy = {("type" if k == "rope_type" else k): v for k, v in scaling.items()}
    old = ModelConfig.from_dict({**base, "rope_theta": 5000.0, "rope_scaling": legacy})
    new = ModelConfig.from_dict({**base, "rope_parameters": {"rope_theta": 5000.0, **scaling}})
    assert old.rope_theta == new.rope_theta == 5000.0
    assert old.rope_type == new.rope_type == "yarn"
    assert old.rope_scaling == new.rope_scaling


def test_reads_what_transformers_writes(tmp_path):
    for kind in TINY_CONFIGS:
        hf_config(kind).save_pretrained(tmp_path / kind)
        config = ModelConfig.from_pretrained(tmp_path / kind)
        assert config.model_type == TINY_CONFIGS[kind]["model_type"]
        assert config.rope_type == TINY_CONFIGS[kind].get("rope_scaling", {}).get("rope_type", "default")


def test_json_round_trip(tmp_path):
    config = ModelConfig.from_preset("deepseek-v3")
    config.save_pretrained(tmp_path)
    again = ModelConfig.from_pretrained(tmp_path)
    assert again == config


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_param_count_matches_instantiated_model(kind):
    config = ModelConfig.from_dict(TINY_CONFIGS[kind])
    assert config.param_count() == Transformer(config).num_parameters()


def test_preset_sizes_are_computed_without_allocating():
    sizes = {name: ModelConfig.from_preset(name).param_count() for name in preset_names()}
    assert 6.5e9 < sizes["deepseek-llm-7b-base"] < 7.2e9
    assert 1.2e9 < sizes["deepseek-coder-1.3b-base"] < 1.5e9
    assert 15e9 < sizes["deepseek-v2-lite"] < 16.5e9
    assert 660e9 < sizes["deepseek-v3"] < 690e9
    assert sizes["deepseek-tiny"] < 10e6
    v3 = ModelConfig.from_preset("deepseek-v3")
    assert v3.memory_bytes("bfloat16") == 2 * v3.param_count()
    assert v3.memory_table()["int8"] == v3.param_count()
    # MLA caches the latent: (512 + 64) x 61 layers x 2 bytes per token.
    assert v3.kv_cache_bytes_per_token("bfloat16") == (512 + 64) * 61 * 2


def test_validation_names_the_field():
    good = dict(TINY_CONFIGS["llama_gqa"])
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig.from_dict({**good, "num_key_value_heads": 3})
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_dict({k: v for k, v in good.items() if k != "model_type"})
    with pytest.raises(ConfigError, match="rms_norm_eps"):
        ModelConfig.from_dict({**good, "rms_norm_eps": "small"})
    with pytest.raises(ConfigError, match="topk_group"):
        ModelConfig.from_dict({**TINY_CONFIGS["deepseek_v3"], "topk_group": 9})
    with pytest.raises(ConfigError, match="unknown name"):
        ModelConfig.from_preset("deepseek-nope")


def test_unknown_keys_survive_a_round_trip(tmp_path):
    data = {**TINY_CONFIGS["llama_gqa"], "custom_field": [1, 2]}
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = ModelConfig.from_pretrained(tmp_path)
    assert config.to_dict()["custom_field"] == [1, 2]


def test_moe_uses_grouped_dispatch_equal_to_a_per_expert_loop():
    config = ModelConfig.from_dict(TINY_CONFIGS["deepseek_v3"])
    torch.manual_seed(0)
    moe = Transformer(config).model.layers[1].mlp
    x = torch.randn(37, config.hidden_size)
    weights, ids = moe.gate(x)
    grouped = moe.experts(x, weights, ids)
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[t, k].item()
            gate, up = (moe.experts.gate_up_proj[e] @ x[t]).chunk(2)
            expected[t] += weights[t, k] * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    assert torch.allclose(grouped, expected, atol=1e-5)
