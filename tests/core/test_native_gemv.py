"""The native float GEMV (quant/csrc/gemv.c) that decode-sized MoE expert calls use on AVX-512 CPUs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from deepseek_core.quant import kernels

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.07}  # bf16: one rounding of the output (relative 2^-8)


def _needs(dtype: torch.dtype) -> None:
    if not kernels.gemv_takes(torch.empty(4, 64, dtype=dtype)):
        pytest.skip(f"no native {dtype} GEMV on this CPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_matches_f_linear(dtype: torch.dtype, rows: int) -> None:
    _needs(dtype)
    torch.manual_seed(0)
    x, weight, bias = torch.randn(rows, 512), torch.randn(1027, 512) / 20, torch.randn(1027)
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    for b in (bias, None):
        assert kernels.gemv_takes(weight)
        out = kernels.float_gemv(x, weight, b)
        assert out.dtype == dtype and out.shape == (rows, 1027)
        expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
        rel = ((out.float() - expected).abs() / expected.abs().clamp_min(1.0)).max().item()
        assert rel < TOLERANCE[dtype]
    # A strided row view (x_stride != K) reads the right rows.
    wide = torch.randn(rows, 1024).to(dtype)
    out = kernels.float_gemv(wide[:, :512], weight, None)
    torch.testing.assert_close(out, kernels.float_gemv(wide[:, :512].contiguous(), weight, None))


def test_unsupported_weights_are_declined() -> None:
    _needs(torch.float32)
    assert not kernels.gemv_takes(torch.randn(8, 520))  # K % 16
    assert not kernels.gemv_takes(torch.randn(8, 528, dtype=torch.bfloat16))  # K % 32 (bf16)
    assert kernels.gemv_takes(torch.randn(7, 512))  # any number of output rows
    assert not kernels.gemv_takes(torch.randn(512, 8).t())  # not contiguous
    assert not kernels.gemv_takes(torch.randn(8, 512, dtype=torch.float16))  # no kernel for the dtype
    # The kernel's own shape check still guards a caller that skipped gemv_takes: an error, nothing written.
    with pytest.raises(ValueError, match="refused a \\[1, 520\\] x \\[8, 520\\]"):
        kernels.float_gemv(torch.randn(1, 520), torch.randn(8, 520), None)


def _routed_experts(dtype: torch.dtype) -> torch.nn.Module:
    from deepseek_core.model.moe import RoutedExperts

    torch.manual_seed(0)
    experts = RoutedExperts(num_experts=8, hidden_size=128, intermediate_size=96)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.05)
        experts.down_proj.normal_(std=0.05)
    return experts.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_decode_streams_experts_through_it(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode-sized MoE call (a few rows per expert) runs each expert through the GEMV, in chunks of at most 4
    rows, with the grouped matmul's result; anything larger, or anything that needs gradients, does not."""
    from deepseek_core.model import moe

    _needs(dtype)
    experts = _routed_experts(dtype)
    tokens = 5
    hidden = torch.randn(tokens, 128).to(dtype)
    # Expert 3 gets every token (5 rows: two GEMV chunks), expert 6 two of them, the rest nothing.
    expert_ids = torch.tensor([[3, 6], [3, 0], [3, 6], [3, 1], [3, 0]])
    weights = torch.rand(tokens, 2)
    calls: list[int] = []
    real_gemv = kernels.float_gemv
    monkeypatch.setattr(kernels, "float_gemv", lambda x, w, b: calls.append(x.shape[0]) or real_gemv(x, w, b))

    with torch.inference_mode():
        streamed = experts(hidden, weights, expert_ids)
    assert calls and max(calls) <= kernels.GEMV_MAX_ROWS and sum(calls) == 2 * tokens * 2  # gate_up + down
    calls.clear()
    monkeypatch.setattr(moe, "_GEMV_ROWS_PER_EXPERT", 0)  # the grouped-matmul path, as reference
    with torch.inference_mode():
        grouped = experts(hidden, weights, expert_ids)
    assert calls == []
    rel = ((streamed.float() - grouped.float()).abs() / grouped.float().abs().clamp_min(1.0)).max().item()
    assert rel < TOLERANCE[dtype]

    # Training (gradients wanted) takes the autograd-capable path, and gets gradients.
    monkeypatch.setattr(moe, "_GEMV_ROWS_PER_EXPERT", 6)
    experts.float()
    experts(hidden.float(), weights, expert_ids).sum().backward()
    assert calls == [] and experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.abs().sum() > 0
