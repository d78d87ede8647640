"""The native causal attention (quant/csrc/causal_attention.c) of whole-sequence forward passes: bfloat16
through vdpbf16ps, float32 through FMAs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from deepseek_core import ModelConfig, Transformer
from deepseek_core.quant import kernels

from .hf_tiny import TINY_CONFIGS

pytestmark = pytest.mark.skipif(
    not kernels.avx512_available() or not kernels.gemv_takes(torch.empty(4, 64, dtype=torch.bfloat16)),
    reason="no AVX512-BF16 kernels on this CPU",
)


def _qkv(
    batch: int,
    heads: int,
    kv_heads: int,
    seq: int,
    dim: int,
    value_dim: int,
    dtype: torch.dtype = torch.bfloat16,
) -> list[torch.Tensor]:
    # [B, S, H, D] memory seen as [B, H, S, D], as the model's projections produce them (strided heads/rows).
    torch.manual_seed(0)
    shapes = ((heads, dim), (kv_heads, dim), (kv_heads, value_dim))
    return [torch.randn(batch, seq, h, d).to(dtype).transpose(1, 2) for h, d in shapes]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "batch,heads,kv_heads,seq,dim,value_dim",
    [
        (2, 4, 2, 100, 64, 64),  # grouped-query heads, 4-row value tiles
        (1, 4, 4, 37, 64, 64),  # a sequence that is not a multiple of the 8-row and 16-key tiles
        (1, 2, 2, 33, 192, 128),  # MLA's shapes: 192-wide keys, 128-wide values (2-row value tiles)
        (1, 3, 1, 20, 32, 48),  # the generic value path
    ],
)
def test_matches_exact_attention(
    batch: int, heads: int, kv_heads: int, seq: int, dim: int, value_dim: int, dtype: torch.dtype
) -> None:
    q, k, v = _qkv(batch, heads, kv_heads, seq, dim, value_dim, dtype)
    scale = 1 / math.sqrt(dim)
    assert kernels.causal_attention_takes(q, k, v)
    out = kernels.causal_attention(q, k, v, scale)
    assert out is not None and out.shape == (batch, heads, seq, value_dim) and out.dtype == dtype
    gqa = heads != kv_heads
    reference = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, scale=scale, enable_gqa=gqa
    )
    torch_same_dtype = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    ours_error = (out.double() - reference).abs().max().item()
    torch_error = (torch_same_dtype.double() - reference).abs().max().item()
    assert ours_error <= 2 * torch_error + 1e-6, (ours_error, torch_error)  # the dtype's rounding, no more
    # Row 0 sees only key 0: its output is exactly that key's value row.
    group = heads // kv_heads
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0].repeat_interleave(group, dim=1), atol=0, rtol=0)


def test_declines_what_it_does_not_compute() -> None:
    q, k, v = _qkv(1, 4, 2, 16, 64, 64)
    assert not kernels.causal_attention_takes(q.half(), k.half(), v.half())  # float32 and bfloat16 only
    assert not kernels.causal_attention_takes(
        q[:, :, :8], k, v
    )  # fewer queries than keys (not self-attention)
    assert not kernels.causal_attention_takes(q, k, v[..., :8])  # value width not a multiple of 16
    assert not kernels.causal_attention_takes(
        q, k, v.transpose(2, 3).contiguous().transpose(2, 3)
    )  # strided d
    assert not kernels.causal_attention_takes(q[:, :3], k, v)  # 3 query heads over 2 kv heads


def _mla_config() -> dict[str, object]:
    return {**TINY_CONFIGS["deepseek_v2"], "v_head_dim": 16}  # a value width the kernel takes


@pytest.mark.parametrize("kind", ["llama_gqa", "deepseek_v2"])
def test_bfloat16_inference_forward_runs_it(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bfloat16 forward pass without gradients runs the kernel in every layer, with the logits of torch's
    attention up to bfloat16 rounding; a training forward (gradients wanted) keeps torch's, and gets gradients."""
    spec = _mla_config() if kind == "deepseek_v2" else TINY_CONFIGS[kind]
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(spec)).to(torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    calls: list[int] = []
    native = kernels.causal_attention
    monkeypatch.setattr(
        kernels, "causal_attention", lambda q, k, v, s: calls.append(q.shape[2]) or native(q, k, v, s)
    )
    with torch.inference_mode():
        ours = model(ids).float()
    assert calls == [40] * model.config.num_hidden_layers
    calls.clear()
    monkeypatch.setattr(kernels, "causal_attention_takes", lambda *a: False)
    with torch.inference_mode():
        reference = model(ids).float()
    assert calls == []
    scale = reference.abs().max().item()
    assert (ours - reference).abs().max().item() <= 0.05 * scale
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean().item() > 0.9

    monkeypatch.undo()
    monkeypatch.setattr(
        kernels, "causal_attention", lambda q, k, v, s: calls.append(q.shape[2]) or native(q, k, v, s)
    )
    model.train()
    model(ids).float().sum().backward()
    assert calls == [] and all(p.grad is not None for p in model.parameters() if p.requires_grad)
