"""The engine's linear layers on AVX-512 CPUs: weights packed into column panels (quant/csrc/panel_gemm.c)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from deepseek_core import ModelConfig, Transformer
from deepseek_core.engine import LLM, SamplingParams, cpu_linear
from deepseek_core.quant import kernels

from .hf_tiny import TINY_CONFIGS

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 0.01}  # bf16: one rounding of the output (relative 2^-8)


def _needs(dtype: torch.dtype) -> None:
    if not kernels.panel_takes(torch.empty(4, 64, dtype=dtype)) or kernels.native_library() is None:
        pytest.skip(f"no native {dtype} panel kernel on this CPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 70])  # one tile, a partial tile, several tiles
@pytest.mark.parametrize("channels", [1027, 32, 5])  # a partial last panel, exactly one, fewer than one
def test_matches_f_linear(dtype: torch.dtype, rows: int, channels: int) -> None:
    _needs(dtype)
    torch.manual_seed(0)
    weight, bias = (torch.randn(channels, 96) / 10).to(dtype), torch.randn(channels).to(dtype)
    packed = kernels.pack_panels(weight)
    assert packed.numel() == -(-channels // kernels.PANEL_WIDTH) * kernels.PANEL_WIDTH * 96
    x = torch.randn(rows, 96).to(dtype)
    for b in (bias, None):
        out = kernels.panel_linear(x, packed, channels, b)
        assert out.dtype == dtype and out.shape == (rows, channels)
        expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
        rel = ((out.float() - expected).abs() / expected.abs().clamp_min(1.0)).max().item()
        assert rel < TOLERANCE[dtype]
    # A strided row view (x_stride != K) reads the right rows.
    wide = torch.randn(rows, 192).to(dtype)
    torch.testing.assert_close(
        kernels.panel_linear(wide[:, :96], packed, channels, None),
        kernels.panel_linear(wide[:, :96].contiguous(), packed, channels, None),
    )


def test_which_weights_it_takes() -> None:
    _needs(torch.float32)
    assert kernels.panel_takes(torch.randn(7, 13))  # any shape in float32
    assert not kernels.panel_takes(torch.randn(8, 13, dtype=torch.bfloat16))  # bf16 pairs k: K must be even
    assert not kernels.panel_takes(torch.randn(8, 64, dtype=torch.float16))  # no kernel for the dtype
    assert not kernels.panel_takes(torch.randn(2, 8, 64))  # not a matrix


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_runs_its_linears_through_it(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill and decode steps of several sequences go through the panels, with the plain engine's tokens."""
    _needs(dtype)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(TINY_CONFIGS["llama_gqa"])).to(dtype).eval()
    prompts = [[3, 4, 5], list(range(7, 30)), [9] * 12]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(model, cpu_prepack=False).generate(prompts, params)]
    rows: list[int] = []
    original = kernels.panel_linear

    def counting(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
        rows.append(x.shape[0])
        return original(x, packed, n, bias)

    monkeypatch.setattr(kernels, "panel_linear", counting)
    assert [o.token_ids for o in LLM(model).generate(prompts, params)] == expected
    assert 3 in rows and max(rows) > 8  # decode steps of the three sequences, and the prefill


def test_other_cpus_keep_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the panel kernel does not run, the engine packs for oneDNN instead, with the same tokens."""
    if not cpu_linear.prepack_available(torch.float32):
        pytest.skip("no oneDNN float32 linear kernels on this CPU")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(TINY_CONFIGS["llama_gqa"])).eval()
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = LLM(model, cpu_prepack=False).generate([[3, 4, 5]], params)[0].token_ids
    monkeypatch.setattr(kernels, "panel_takes", lambda weight: False)
    llm = LLM(model)
    packed = llm.engine.runner.packed
    assert packed is not None and not any(e.panels for e in packed._packed.values())
    assert llm.generate([[3, 4, 5]], params)[0].token_ids == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matches_each_experts_linear(dtype: torch.dtype) -> None:
    """Rows sorted by expert, uneven counts (some experts get none) through each expert's own weight."""
    _needs(dtype)
    torch.manual_seed(0)
    weights = (torch.randn(5, 70, 48) / 10).to(dtype)  # 5 experts of [70, 48]: a partial last panel
    counts = torch.tensor([3, 0, 17, 1, 0])
    offsets = torch.zeros(6, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    x = torch.randn(int(counts.sum()), 48).to(dtype)
    packed = torch.stack([kernels.pack_panels(w) for w in weights])
    out = kernels.grouped_panel_linear(x, packed, offsets, 70)
    assert out.shape == (21, 70) and out.dtype == dtype
    for e in range(5):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        expected = F.linear(x[rows].float(), weights[e].float())
        rel = (
            ((out[rows].float() - expected).abs() / expected.abs().clamp_min(1.0)).max().item()
            if counts[e]
            else 0
        )
        assert rel < TOLERANCE[dtype]


def _moe_block(dtype: torch.dtype) -> torch.nn.Module:
    from deepseek_core.model.moe import MoE

    torch.manual_seed(0)
    block = MoE(ModelConfig.from_dict(TINY_CONFIGS["deepseek_v2"]))
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(std=0.1)
    return block.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 300])  # decode-sized (the module's own GEMV) and grouped_mm-sized
def test_packed_experts_match_the_module(dtype: torch.dtype, tokens: int) -> None:
    _needs(dtype)
    block = _moe_block(dtype)
    packed = cpu_linear.PackedLinears(block)
    assert packed.num_packed_experts == 1 and packed.num_packed == 3  # the routed experts, the shared MLP
    x = torch.randn(1, tokens, block.experts.gate_up_proj.shape[-1]).to(dtype)
    used: list[int] = []
    original = kernels.grouped_panel_linear
    with torch.inference_mode():
        expected = block(x)
        try:
            kernels.grouped_panel_linear = lambda *a: used.append(a[0].shape[0]) or original(*a)  # type: ignore[assignment]
            with packed:
                out = block(x)
        finally:
            kernels.grouped_panel_linear = original  # type: ignore[assignment]
    assert used == [tokens * 3, tokens * 3]  # gate_up, then down, over every (token, expert) assignment
    torch.testing.assert_close(
        out, expected, **({} if dtype == torch.float32 else {"atol": 0.02, "rtol": 0.02})
    )
    # A weight changed in place is repacked before its next use.
    with torch.no_grad():
        block.experts.down_proj.mul_(-1.0)
    with torch.inference_mode():
        expected = block(x)
        with packed:
            out = block(x)
    torch.testing.assert_close(
        out, expected, **({} if dtype == torch.float32 else {"atol": 0.02, "rtol": 0.02})
    )


def test_engine_runs_moe_experts_through_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _needs(torch.float32)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(TINY_CONFIGS["deepseek_v3"])).eval()
    prompts = [[3, 4, 5], list(range(7, 30))]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(model, cpu_prepack=False).generate(prompts, params)]
    calls: list[int] = []
    original = kernels.grouped_panel_linear
    monkeypatch.setattr(kernels, "grouped_panel_linear", lambda *a: calls.append(1) or original(*a))
    llm = LLM(model)
    assert llm.engine.runner.packed is not None and llm.engine.runner.packed.num_packed_experts > 0
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    assert calls


def test_amx_cpus_keep_onednn_for_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPUs with AMX, oneDNN's tile kernels beat vdpbf16ps: bfloat16 weights keep oneDNN's layout there."""
    _needs(torch.float32)
    monkeypatch.setattr(cpu_linear, "_amx_available", lambda: True)
    for dtype, panels in ((torch.float32, True), (torch.bfloat16, False)):
        if not cpu_linear.prepack_available(dtype):
            continue
        packed = cpu_linear.PackedLinears(_moe_block(dtype))
        assert {e.panels for e in packed._packed.values()} == {panels}
        assert packed.num_packed_experts == int(panels)


def test_background_packing_serves_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing in the background (what AsyncLLM does): until a weight is packed its layer runs F.linear."""
    import threading

    _needs(torch.float32)
    release = threading.Event()
    original_pack = cpu_linear._Entry.pack

    def held_pack(entry: cpu_linear._Entry) -> None:
        release.wait(60)
        original_pack(entry)

    monkeypatch.setattr(cpu_linear._Entry, "pack", held_pack)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(TINY_CONFIGS["deepseek_v2"])).eval()
    packed = cpu_linear.PackedLinears(model, background=True)  # returns at once
    assert not packed.wait(0.05)
    used: list[int] = []
    original_linear = kernels.panel_linear
    monkeypatch.setattr(kernels, "panel_linear", lambda *a: used.append(1) or original_linear(*a))
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.inference_mode():
        expected = model(ids)
        with packed:
            assert torch.equal(model(ids), expected) and not used  # the model's own path, unchanged
        release.set()
        assert packed.wait(60)
        with packed:
            torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-4)
    assert used


def test_async_engine_packs_in_the_background() -> None:
    from deepseek_core.engine import AsyncLLM

    _needs(torch.float32)
    torch.manual_seed(0)
    engine = AsyncLLM(Transformer(ModelConfig.from_dict(TINY_CONFIGS["llama_gqa"])))
    try:
        packed = engine.engine.runner.packed
        assert packed is not None and packed.wait(60)
        assert all(e.packed is not None and e.panels for e in packed._packed.values())
    finally:
        engine.shutdown()


def test_a_failed_background_packing_leaves_the_model_path(monkeypatch: pytest.MonkeyPatch) -> None:
    _needs(torch.float32)

    def failing_pack(entry: cpu_linear._Entry) -> None:
        raise MemoryError("no room for the packed copy")

    monkeypatch.setattr(cpu_linear._Entry, "pack", failing_pack)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(TINY_CONFIGS["llama_gqa"])).eval()
    packed = cpu_linear.PackedLinears(model, background=True)
    assert packed.wait(60)  # done (and logged), not hung
    ids = torch.tensor([[3, 4, 5]])
    with torch.inference_mode():
        expected = model(ids)
        with packed:
            assert torch.equal(model(ids), expected)
    with pytest.raises(MemoryError):  # packing in the constructor reports the error to its caller
        cpu_linear.PackedLinears(model)
