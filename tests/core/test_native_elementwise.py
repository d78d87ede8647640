"""The fused rotary embedding and SwiGLU gate (quant/csrc/elementwise.c) of float32 and bfloat16 forward passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from deepseek_core.model.mlp import MLP
from deepseek_core.model.rope import RotaryTables
from deepseek_core.quant import kernels

pytestmark = pytest.mark.skipif(not kernels.avx512_available(), reason="no AVX-512 kernels on this CPU")


def _tables(batch: int, seq: int, dim: int, interleaved: bool = False) -> RotaryTables:
    angles = torch.rand(batch, seq, dim // 2) * 6
    return RotaryTables(cos=angles.cos(), sin=angles.sin(), interleaved=interleaved)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_is_bit_identical_to_the_torch_ops(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 33, 4, 64).to(dtype).transpose(1, 2)  # [B, H, S, D] over [B, S, H, D] memory
    tables = _tables(2, 33, 64)
    expected = tables.apply(x.clone().requires_grad_(True)).detach()  # gradients wanted: the torch ops
    calls: list[int] = []
    native = kernels.rope
    monkeypatch.setattr(kernels, "rope", lambda x, c, s: calls.append(1) or native(x, c, s))
    with torch.inference_mode():
        out = tables.apply(x)
    assert calls == [1] and torch.equal(out, expected)
    # Shapes it does not take come back as None (the caller keeps the torch ops).
    cos, signed_sin = tables._for(dtype)
    assert kernels.rope(x[..., :48], cos[..., :48], signed_sin[..., :48]) is None  # D % 32 != 0
    assert kernels.rope(x.half(), cos.half(), signed_sin.half()) is None  # float32 and bfloat16 only
    # Interleaved tables keep the torch ops.
    calls.clear()
    with torch.inference_mode():
        _tables(2, 33, 64, interleaved=True).apply(x)
    assert calls == []


def test_silu_mul_matches_torch_and_runs_in_mlp_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    gate, up = (torch.randn(3, 7, 2048) * 4).bfloat16(), torch.randn(3, 7, 2048).bfloat16()
    fused = kernels.silu_mul(gate, up)
    expected = F.silu(gate) * up
    assert fused is not None
    # Equal up to a rare last bit (a polynomial exp): within one bfloat16 step, and nearly always exact.
    assert torch.allclose(fused.float(), expected.float(), rtol=2**-7, atol=0)
    assert (fused != expected).float().mean().item() < 1e-3
    assert kernels.silu_mul(gate[..., :8], up[..., :8]) is None  # not contiguous
    # float32: within a few units in the last place.
    fused32 = kernels.silu_mul(gate.float(), up.float())
    assert fused32 is not None
    torch.testing.assert_close(fused32, F.silu(gate.float()) * up.float(), rtol=1e-6, atol=1e-30)

    mlp = MLP(64, 128).bfloat16()
    x = torch.randn(2, 5, 64).bfloat16()
    calls: list[int] = []
    native = kernels.silu_mul
    monkeypatch.setattr(kernels, "silu_mul", lambda g, u: calls.append(1) or native(g, u))
    trained = mlp(x)  # parameters want gradients: the torch ops
    assert calls == [] and trained.requires_grad
    with torch.inference_mode():
        inferred = mlp(x)
    assert calls == [1]
    assert torch.allclose(inferred.float(), trained.detach().float(), rtol=0.02, atol=0.02)
