"""Tiny random-weight Hugging Face models of each supported type, saved by transformers itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

_MLA: dict[str, Any] = {
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # GQA: 2 KV heads for 4 query heads.
    "llama_gqa": {
        "model_type": "llama",
        "vocab_size": 160,
        "hidden_size": 64,
        "intermediate_size": 112,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    },
    "llama_tied_linear": {
        "model_type": "llama",
        "vocab_size": 160,
        "hidden_size": 64,
        "intermediate_size": 112,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    },
    # MLA without q_lora_rank, softmax routing with group-limited greedy, a dense first layer, YaRN.
    "deepseek_v2": {
        "model_type": "deepseek_v2",
        "vocab_size": 160,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 24,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        **_MLA,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 3,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "group_limited_greedy",
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 1.5,
        "max_position_embeddings": 256,
        "rope_scaling": YARN,
    },
    # MLA with q_lora_rank, sigmoid routing with correction bias and grouped top-k, YaRN, tied embeddings off.
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        "vocab_size": 160,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 24,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 24,
        **_MLA,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 256,
        "rope_scaling": YARN,
    },
}


def hf_config(kind: str) -> Any:
    """A transformers config object for one of TINY_CONFIGS."""
    import transformers

    spec = dict(TINY_CONFIGS[kind])
    model_type = spec.pop("model_type")
    rope_scaling = spec.pop("rope_scaling", None)
    cls = {
        "llama": transformers.LlamaConfig,
        "deepseek_v2": transformers.DeepseekV2Config,
        "deepseek_v3": transformers.DeepseekV3Config,
    }[model_type]
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = {"rope_theta": 10000.0, **rope_scaling}
    return cls(**spec, rope_parameters=rope, bos_token_id=0, eos_token_id=1)


def hf_model(kind: str, seed: int = 0) -> Any:
    """A random-weight transformers model; the MoE correction bias is made non-zero so it matters."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind), dtype=torch.float32)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
        # Random init leaves norms at one; perturb them so a wrong norm placement cannot hide.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_hf_model(kind: str, directory: Path, seed: int = 0) -> Any:
    """Save a tiny random model with transformers' save_pretrained; returns the model."""
    model = hf_model(kind, seed)
    model.save_pretrained(directory)
    return model
