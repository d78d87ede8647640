"""GPU-kind scheduling: the documented policy on real model shapes."""

from __future__ import annotations

import pytest
from deepseek_cne.gpu import (
    COUNTS,
    GIB,
    GPU_KINDS,
    HEADROOM,
    OVERHEAD_PER_GPU,
    GpuPlacementError,
    choose_gpu,
    gpu_kind,
)
from deepseek_core import ModelConfig


def llama_70b_shape() -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=102400,
    )


def _fits(choice, config, dtype) -> None:  # type: ignore[no-untyped-def]
    weights = config.memory_bytes(dtype)
    need = int(weights * HEADROOM) + choice.count * OVERHEAD_PER_GPU
    assert choice.memory_needed_bytes == need
    assert choice.memory_per_gpu_bytes * choice.count >= choice.memory_needed_bytes
    assert choice.memory_per_gpu_bytes >= -(-int(weights * HEADROOM) // choice.count) + OVERHEAD_PER_GPU


def test_7b_bf16_fits_one_a100_40gb() -> None:
    config = ModelConfig.from_preset("deepseek-llm-7b-base")
    choice = choose_gpu(config, "bfloat16")
    assert (choice.kind, choice.count) == ("A100-40GB", 1)
    assert 16 * GIB < choice.memory_needed_bytes < 20 * GIB  # 13.8 GB of weights x 1.2 + 2 GiB
    _fits(choice, config, "bfloat16")


def test_7b_fp16_may_use_a_v100_but_bf16_never_does() -> None:
    config = ModelConfig.from_preset("deepseek-llm-7b-base")
    assert (choose_gpu(config, "float16").kind, choose_gpu(config, "float16").count) == ("V100-32GB", 1)
    v100s = [k for k in GPU_KINDS if k.name.startswith("V100")]
    with pytest.raises(GpuPlacementError, match="bfloat16"):
        choose_gpu(config, "bfloat16", kinds=v100s)


def test_70b_bf16_takes_two_h200_or_four_a100_80gb() -> None:
    config = llama_70b_shape()
    assert 69e9 < config.param_count() < 71e9
    choice = choose_gpu(config, "bfloat16")
    assert (choice.kind, choice.count) == ("H200-141GB", 2)
    _fits(choice, config, "bfloat16")
    # 2x 80 GB does not hold 140 GB of weights plus headroom; without H200 the policy goes to 4 GPUs.
    without_h200 = [k for k in GPU_KINDS if k.name != "H200-141GB"]
    fallback = choose_gpu(config, "bfloat16", kinds=without_h200)
    assert (fallback.kind, fallback.count) == ("A100-80GB", 4)
    _fits(fallback, config, "bfloat16")
    only_h100 = choose_gpu(config, "bfloat16", kinds=[gpu_kind("h100-80gb")])
    assert (only_h100.kind, only_h100.count) == ("H100-80GB", 4)


def test_choice_is_the_fewest_gpus_then_the_cheapest_kind() -> None:
    shapes = [
        ModelConfig.from_preset(n) for n in ("deepseek-tiny", "deepseek-coder-1.3b-base", "deepseek-v2-lite")
    ]
    for config in [*shapes, ModelConfig.from_preset("deepseek-llm-7b-base"), llama_70b_shape()]:
        for dtype in ("bfloat16", "float16", "float32"):
            choice = choose_gpu(config, dtype)
            _fits(choice, config, dtype)
            sharded = int(config.memory_bytes(dtype) * HEADROOM)
            usable = [k for k in GPU_KINDS if k.bf16 or dtype != "bfloat16"]
            for count in COUNTS:
                if count >= choice.count:
                    break
                assert all(-(-sharded // count) + OVERHEAD_PER_GPU > k.memory_bytes for k in usable)
            cheaper = GPU_KINDS[: [k.name for k in GPU_KINDS].index(choice.kind)]
            for kind in cheaper:
                if kind in usable:
                    assert -(-sharded // choice.count) + OVERHEAD_PER_GPU > kind.memory_bytes


def test_too_big_for_eight_of_the_largest_is_refused_clearly() -> None:
    v3 = ModelConfig.from_preset("deepseek-v3")
    with pytest.raises(GpuPlacementError, match=r"more than 8 x H200-141GB.*int8"):
        choose_gpu(v3, "bfloat16")
    int8 = choose_gpu(v3, "int8")  # 671 GB of int8 weights spread over 8 H200s
    assert (int8.kind, int8.count) == ("H200-141GB", 8)


def test_tensor_parallel_count_divides_the_heads() -> None:
    odd_heads = ModelConfig(model_type="llama", hidden_size=8064, num_attention_heads=63, num_hidden_layers=80,
                            intermediate_size=28672, vocab_size=102400)  # fmt: skip
    with pytest.raises(GpuPlacementError):
        choose_gpu(odd_heads, "bfloat16")  # one GPU is too small and 2/4/8 do not divide 63 heads


def test_unknown_kind_is_named() -> None:
    with pytest.raises(ValueError, match="unknown 'T4'.*A100-40GB"):
        gpu_kind("T4")
