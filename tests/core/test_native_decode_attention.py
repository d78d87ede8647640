"""The native single-query attention (quant/csrc/decode_attention.c) that CPU per-sequence decoding uses."""

from __future__ import annotations

import pytest
import torch
from deepseek_core.engine import LLM, SamplingParams
from deepseek_core.quant import kernels

from .hf_tiny import TINY_CONFIGS, save_hf_model

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # bf16: one rounding of the output (2^-8 relative)


def _needs(dtype: torch.dtype) -> None:
    if not kernels.decode_attention_takes(dtype, 64, 64):
        pytest.skip("no native decode attention on this CPU")


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [H, D], k [KVH, L, D], v [KVH, L, Dv] -> [H, Dv] in float32."""
    group = q.shape[0] // k.shape[0]
    k, v = k.float().repeat_interleave(group, 0), v.float().repeat_interleave(group, 0)
    scores = torch.einsum("hd,hld->hl", q.float(), k) * scale
    return torch.einsum("hl,hld->hd", scores.softmax(-1), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,length", [(12, 12, 1), (12, 4, 37), (8, 1, 300)])
def test_matches_softmax_attention_over_strided_cache(dtype, heads, kv_heads, length) -> None:
    """GQA over a slice of a [KVH, slots, D] cache (head stride = slots x D), written into a strided out."""
    _needs(dtype)
    torch.manual_seed(0)
    cache_k = torch.randn(kv_heads, 512, 64).to(dtype)
    cache_v = torch.randn(kv_heads, 512, 64).to(dtype)
    k, v = cache_k.narrow(1, 100, length), cache_v.narrow(1, 100, length)
    q = (torch.randn(heads, 3, 64) * 2).to(dtype)[:, 1]  # a [H, D] view with head stride 3 x 64
    out = torch.full((heads, 2, 64), float("nan"), dtype=dtype)
    kernels.decode_attention(q, k, v, 0.125, out[:, 1])
    expected = _reference(q, k, v, 0.125)
    assert (out[:, 1].float() - expected).abs().max().item() < TOLERANCE[dtype] * expected.abs().max().item()
    assert torch.isnan(out[:, 0]).all()  # the other sequence's slot is untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_latent_head_with_narrower_values(dtype) -> None:
    """MLA's absorbed form: every query head attends over the same latent rows; values are their first
    columns (row stride wider than the value width)."""
    _needs(dtype)
    torch.manual_seed(1)
    rows = torch.randn(50, 96).to(dtype)  # [L, latent 64 + rope 32]
    q = torch.randn(4, 96).to(dtype)
    out = torch.empty(4, 64, dtype=dtype)
    k = rows.unsqueeze(0)
    kernels.decode_attention(q, k, k[..., :64], 0.1, out)
    expected = _reference(q, k, k[..., :64], 0.1)
    assert (out.float() - expected).abs().max().item() < TOLERANCE[dtype] * expected.abs().max().item()


def test_declines_shapes_it_cannot_run() -> None:
    assert not kernels.decode_attention_takes(torch.float16, 64, 64)
    assert not kernels.decode_attention_takes(torch.float32, 40, 64)  # head dim not a multiple of 16
    assert not kernels.decode_attention_takes(torch.float32, 64, 2048)  # values wider than the kernel holds


@pytest.mark.parametrize("kind", ["llama_gqa", "mla_wide"])
def test_engine_batch1_decode_uses_it_and_matches_the_torch_path(kind, tmp_path, monkeypatch) -> None:
    """A batch-1 decode (the per-sequence path) runs the native kernel and greedy-decodes the same tokens,
    with logprobs within float32 rounding, as the engine's torch ops. mla_wide: DeepSeek-V2's MLA with a
    latent row (32 + 16) the kernel takes."""
    _needs(torch.float32)
    monkeypatch.setitem(
        TINY_CONFIGS,
        "mla_wide",
        {**TINY_CONFIGS["deepseek_v2"], "kv_lora_rank": 32, "qk_rope_head_dim": 16, "v_head_dim": 16},
    )
    save_hf_model(kind, tmp_path)
    calls = []
    native = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or native(*a))
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)
    prompt = [list(range(3, 20))]
    llm = LLM(str(tmp_path), max_num_seqs=1)
    ours = llm.generate(prompt, params)[0]
    assert calls, "the native kernel did not run"
    llm.engine.runner.decode_backend = "matmul"
    calls.clear()
    torch_ops = llm.generate(prompt, params)[0]
    assert not calls
    assert ours.token_ids == torch_ops.token_ids
    assert len(set(ours.token_ids)) > 3  # not a degenerate repeat
    for a, b in zip(ours.logprobs, torch_ops.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
