"""The fixed-shape decode path that CUDA graphs replay, run eagerly on CPU: same tokens as the dynamic path."""

from __future__ import annotations

import pytest
import torch
from deepseek_core import ModelConfig, Transformer
from deepseek_core.engine import LLM, SamplingParams

from .hf_tiny import TINY_CONFIGS


def _model(kind: str) -> Transformer:
    if kind == "mla_dense":
        spec = {**TINY_CONFIGS["deepseek_v3"], "n_routed_experts": None, "first_k_dense_replace": 0}
    else:
        spec = TINY_CONFIGS[kind]
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(spec)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)  # livelier greedy paths
    return model


@pytest.mark.parametrize("kind", ["llama_gqa", "mla_dense"])
def test_static_decode_equals_dynamic(kind):
    model = _model(kind)
    dynamic = LLM(model, max_num_seqs=5, block_size=4)
    static = LLM(model, max_num_seqs=5, block_size=4)
    static.engine.enable_static_decode(capture=False)
    assert static.engine.cache.num_free_blocks == static.engine.cache.num_blocks - 1  # the scratch block
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 160, (n,), generator=g).tolist() for n in (1, 5, 17, 40, 9, 3, 60)]
    params = [
        SamplingParams(max_tokens=20 + 15 * (i % 3), temperature=0.0, ignore_eos=True) for i in range(7)
    ]
    params[3] = SamplingParams(max_tokens=30, temperature=0.8, seed=11, ignore_eos=True)
    want = dynamic.generate(prompts, params)
    got = static.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    keys = set(static.engine.runner.static._graphs)
    assert len(keys) >= 3 and {b for b, _ in keys} >= {4, 5}  # several padded batch sizes and lengths
    assert static.engine.stats().num_free_blocks == static.engine.cache.num_blocks - 1


def test_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="cuda_graphs: needs a CUDA device"):
        LLM(_model("llama_gqa"), cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_match_eager_on_gpu():
    model = _model("llama_gqa").cuda()  # float32: padding and masks must not flip a near-tie
    prompts = [[5, 6, 7], list(range(2, 40)), [9] * 20]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    eager = LLM(model).generate(prompts, params)
    graphs = LLM(model, cuda_graphs=True)
    got = graphs.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]
    assert graphs.engine.runner.static.num_graphs >= 1
