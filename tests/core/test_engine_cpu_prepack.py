"""Prepacked oneDNN linears on CPU: same tokens as plain linears, repacked when weights change."""

from __future__ import annotations

import pytest
import torch
from deepseek_core import ModelConfig, Transformer
from deepseek_core.engine import LLM, SamplingParams
from deepseek_core.engine.cpu_linear import prepack_available

from .hf_tiny import TINY_CONFIGS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama_gqa", "deepseek_v3"])
def test_prepacked_matches_plain(kind: str, dtype: torch.dtype) -> None:
    if not prepack_available(dtype):
        pytest.skip(f"no oneDNN {dtype} linear kernels on this CPU")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(TINY_CONFIGS[kind])).to(dtype).eval()
    plain = LLM(model, cpu_prepack=False, block_size=4)
    packed = LLM(model, block_size=4)  # auto: on for float32 and bfloat16 on CPU
    assert plain.engine.runner.packed is None
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert packed.engine.runner.packed is not None and packed.engine.runner.packed.num_packed == linears
    prompts = [[3, 4, 5], list(range(7, 40)), [9] * 12]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in packed.generate(prompts, params)] == [
        o.token_ids for o in plain.generate(prompts, params)
    ]
    # The model outside the engine is untouched, and an in-place weight change is seen (repacked).
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    assert [o.token_ids for o in packed.generate(prompts, params)] == [
        o.token_ids for o in plain.generate(prompts, params)
    ]


def test_prepack_refuses_other_dtypes() -> None:
    model = Transformer(ModelConfig.from_dict(TINY_CONFIGS["llama_gqa"])).to(torch.float16)
    with pytest.raises(ValueError, match="cpu_prepack: needs a float32 or bfloat16 model on CPU"):
        LLM(model, cpu_prepack=True)
    assert LLM(model).engine.runner.packed is None  # auto: off for float16


def test_routing_is_confined_to_the_engine_thread() -> None:
    """While the engine's packed linears are active on one thread, another thread trains the same model."""
    import threading

    if not prepack_available(torch.float32):
        pytest.skip("no oneDNN float32 linear kernels on this CPU")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(TINY_CONFIGS["llama_gqa"]))
    packed = LLM(model).engine.runner.packed
    assert packed is not None
    calls: list[int] = []
    original = packed.linear
    packed.linear = lambda module, x: calls.append(1) or original(module, x)  # type: ignore[method-assign]
    grads: list[torch.Tensor | None] = []

    def train_step() -> None:
        model.zero_grad()
        model(torch.tensor([[3, 4, 5]])).sum().backward()
        grads.append(model.lm_head.weight.grad)

    with packed:
        worker = threading.Thread(target=train_step)
        worker.start()
        worker.join()
        model(torch.tensor([[3, 4]]))  # this thread: routed
    assert grads and grads[0] is not None and bool(grads[0].abs().sum() > 0)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(calls) == linears  # only the engine thread's forward went through the packed weights
