"""The native RMSNorm (quant/csrc/rms_norm.c) of CPU inference (the engine, and direct model calls)."""

from __future__ import annotations

import pytest
import torch
from deepseek_core.engine import LLM, SamplingParams
from deepseek_core.model.norm import RMSNorm
from deepseek_core.quant import kernels

from .hf_tiny import save_hf_model


def _needs() -> None:
    if not kernels.rms_norm_takes(torch.float32, 64):
        pytest.skip("no native RMSNorm on this CPU")


def _norm(dtype: torch.dtype, dim: int = 768) -> RMSNorm:
    torch.manual_seed(0)
    norm = RMSNorm(dim, 1e-6)
    with torch.no_grad():
        norm.weight.add_(torch.randn(dim) * 0.2)
    return norm.to(dtype)


def test_bfloat16_is_bit_identical_to_the_module() -> None:
    """Same float32 arithmetic and the same two roundings to bfloat16 as model/norm.py."""
    _needs()
    norm = _norm(torch.bfloat16)
    x = (torch.randn(4, 2, 768) * 3).to(torch.bfloat16)[:, 1]  # strided rows
    assert torch.equal(kernels.rms_norm(x, norm.weight, norm.eps), norm(x))


def test_bfloat16_inference_runs_it_on_whole_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bfloat16 RMSNorm that needs no gradient runs the kernel (rows split among threads), with the torch
    ops' exact result; with gradients wanted it keeps the torch ops."""
    _needs()
    norm = _norm(torch.bfloat16)
    x = (torch.randn(3, 50, 768) * 3).to(torch.bfloat16)
    calls: list[int] = []
    native = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda x, w, eps: calls.append(x.shape[0]) or native(x, w, eps))
    expected = norm(x)  # gradients wanted (the weight is a parameter): the torch ops
    assert calls == []
    with torch.inference_mode():
        out = norm(x)
    assert calls == [150] and torch.equal(out, expected)


def test_float32_matches_the_module_to_rounding() -> None:
    _needs()
    norm = _norm(torch.float32)
    x = torch.randn(3, 768) * 3
    torch.testing.assert_close(kernels.rms_norm(x, norm.weight, norm.eps), norm(x), rtol=2e-6, atol=1e-6)


def test_declines_what_it_cannot_run() -> None:
    _needs()
    assert not kernels.rms_norm_takes(torch.float16, 768)
    assert not kernels.rms_norm_takes(torch.float32, 72)  # not a multiple of 16
    with pytest.raises(ValueError, match="refused a \\[1, 72\\]"):
        kernels.rms_norm(torch.randn(1, 72), torch.ones(72), 1e-6)


def test_engine_decodes_through_it(tmp_path, monkeypatch) -> None:
    """A batch-1 decode runs the kernel and gives the tokens and logprobs of the torch ops."""
    _needs()
    save_hf_model("llama_gqa", tmp_path)
    calls = []
    native = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda *a: calls.append(1) or native(*a))
    llm = LLM(str(tmp_path), max_num_seqs=1)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    ours = llm.generate([list(range(3, 20))], params)[0]
    assert calls, "the native RMSNorm did not run"
    monkeypatch.setattr(kernels, "rms_norm_takes", lambda *a: False)
    calls.clear()
    torch_ops = llm.generate([list(range(3, 20))], params)[0]
    assert not calls
    assert ours.token_ids == torch_ops.token_ids and len(set(ours.token_ids)) > 3
    for a, b in zip(ours.logprobs, torch_ops.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
