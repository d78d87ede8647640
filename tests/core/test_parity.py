"""Logits parity with Hugging Face transformers, in both directions (their checkpoint -> us, ours -> them)."""

from __future__ import annotations

import pytest
import torch
from deepseek_core import ModelConfig, Transformer, load_model, save_model

from .hf_tiny import TINY_CONFIGS, save_hf_model

transformers = pytest.importorskip("transformers")

KINDS = sorted(TINY_CONFIGS)


def _inputs(vocab: int, batch: int = 3, seq: int = 17) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", KINDS)
def test_hf_checkpoint_loads_with_same_logits(kind, tmp_path):
    hf = save_hf_model(kind, tmp_path / "hf")
    ours = load_model(tmp_path / "hf", dtype=torch.float32)
    ids = _inputs(ours.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape == (3, 17, ours.config.vocab_size)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_saved_checkpoint_loads_in_transformers(kind, tmp_path):
    torch.manual_seed(3)
    config = ModelConfig.from_dict(TINY_CONFIGS[kind])
    ours = Transformer(config).eval()
    with torch.no_grad():
        for name, buf in ours.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    save_model(ours, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = _inputs(config.vocab_size, batch=2, seq=23)
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff < 1e-4
    assert hf.config.tie_word_embeddings == config.tie_word_embeddings


def test_features_are_covered():
    """The parity configs exercise what the issue lists, so a silent config change cannot drop coverage."""
    configs = {k: ModelConfig.from_dict(v) for k, v in TINY_CONFIGS.items()}
    assert configs["llama_gqa"].kv_heads < configs["llama_gqa"].num_attention_heads
    assert configs["llama_tied_linear"].tie_word_embeddings
    assert configs["llama_tied_linear"].rope_type == "linear"
    assert configs["deepseek_v2"].q_lora_rank is None and configs["deepseek_v3"].q_lora_rank
    for kind in ("deepseek_v2", "deepseek_v3"):
        assert configs[kind].is_mla and configs[kind].rope_type == "yarn"
        assert configs[kind].n_group and configs[kind].n_group > 1
        assert configs[kind].first_k_dense_replace > 0
    assert configs["deepseek_v3"].routing == "sigmoid" and configs["deepseek_v2"].routing == "softmax"
