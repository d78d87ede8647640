"""INT8 layers, quantize_model and INT8 checkpoints (deepseek_core.quant)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from deepseek_core import CheckpointError, ModelConfig, Transformer, load_model
from deepseek_core.quant import (
    Int8Embedding,
    Int8Linear,
    Int8RoutedExperts,
    QuantizedTransformer,
    checkpoint_tensor_bytes,
    dequantize_weight,
    dynamic_linear,
    kernels,
    quantize_activations,
    quantize_model,
    quantize_weight,
    save_quantized_model,
    tensor_bytes,
    weight_only_linear,
)
from safetensors import safe_open

from .hf_tiny import TINY_CONFIGS

METHODS = ["weight_only", "dynamic_quantization"]


def _model(kind: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_dict(TINY_CONFIGS[kind])).eval()


def _reference(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return F.linear(
        x.double(), dequantize_weight(q, scale, torch.float64), None if bias is None else bias.double()
    )


# ---------------------------------------------------------------------------------------------- weights


def test_per_channel_quantization_error_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 80) * torch.logspace(-3, 0, 48).unsqueeze(1)  # rows of very different ranges
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (48,) and scale.dtype == torch.float32
    assert torch.allclose(scale, w.abs().amax(1) / 127)
    assert q.abs().max() == 127
    err = (dequantize_weight(q, scale) - w).abs()
    assert (err <= scale.unsqueeze(1) / 2 + 1e-7).all()


def test_per_tensor_and_clipping_lose_accuracy_on_uneven_rows():
    torch.manual_seed(0)
    w = torch.randn(48, 80) * torch.logspace(-3, 0, 48).unsqueeze(1)

    def row_error(dq: torch.Tensor) -> torch.Tensor:  # mean relative error per row
        return ((dq - w).norm(dim=1) / w.norm(dim=1)).mean()

    per_channel = row_error(dequantize_weight(*quantize_weight(w)))
    q, scale = quantize_weight(w, per_channel=False)
    assert torch.all(scale == scale[0]) and torch.isclose(scale[0], w.abs().max() / 127)
    per_tensor = row_error(dequantize_weight(q, scale))
    assert per_channel < 0.01 and per_tensor > 10 * per_channel
    q, scale = quantize_weight(w, clip_ratio=0.1)
    clipped = dequantize_weight(q, scale)
    assert torch.allclose(clipped.abs().amax(1), w.abs().amax(1) * 0.1, rtol=1e-5)  # saturated


def test_quantize_weight_edge_cases():
    w = torch.zeros(3, 5)
    w[1] = torch.tensor([1.0, -2.0, 0.5, 0.0, 4.0])
    q, scale = quantize_weight(w)
    assert torch.equal(q[0], torch.zeros(5, dtype=torch.int8)) and torch.isfinite(scale).all()
    assert torch.allclose(dequantize_weight(q, scale)[1], w[1], atol=4 / 254)
    stacked = torch.randn(4, 6, 10)
    q3, s3 = quantize_weight(stacked, per_channel=False)
    assert s3.shape == (4, 6) and torch.all(s3 == s3[:, :1])  # one scale per expert matrix
    with pytest.raises(ValueError, match="clip_ratio"):
        quantize_weight(w, clip_ratio=0.0)
    with pytest.raises(ValueError, match="clip_ratio"):
        quantize_weight(w, clip_ratio=1.5)
    with pytest.raises(ValueError, match="weight"):
        quantize_weight(torch.ones(4))


# ---------------------------------------------------------------------------------------------- matmuls


@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (3, 37, 13), (4, 96, 7), (17, 100, 33), (6, 8, 2)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_weight_only_linear_matches_dequantized_float(m, k, n, with_bias):
    torch.manual_seed(m * 1000 + k)
    x = torch.randn(m, k)
    q, scale = quantize_weight(torch.randn(n, k))
    bias = torch.randn(n) if with_bias else None
    out = weight_only_linear(x, q, scale, bias)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    torch.testing.assert_close(out.double(), _reference(x, q, scale, bias), rtol=1e-5, atol=1e-5)


def test_native_kernel_is_built_here_and_fallback_agrees(monkeypatch):
    # The CPU this runs on is x86-64 with a C compiler in CI; the kernel must really be the native one.
    assert kernels.native_library() is not None, "native INT8 kernel did not build"
    torch.manual_seed(0)
    x = torch.randn(2, 5, 96)
    q, scale = quantize_weight(torch.randn(40, 96))
    native = weight_only_linear(x, q, scale)
    monkeypatch.setattr(kernels, "native_library", lambda: None)
    fallback = weight_only_linear(x, q, scale)
    assert native.shape == (2, 5, 40)
    torch.testing.assert_close(native, fallback, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [64, 37])
@pytest.mark.parametrize("native", [True, False])
def test_weight_only_linear_in_bfloat16(k, native, monkeypatch):
    if not native:
        monkeypatch.setattr(kernels, "native_library", lambda: None)
    torch.manual_seed(0)
    x = torch.randn(3, k).bfloat16()
    q, scale = quantize_weight(torch.randn(24, k))
    bias = torch.randn(24)
    out = weight_only_linear(x, q, scale, bias)
    assert out.dtype == torch.bfloat16
    ref = _reference(x.float(), q, scale, bias)
    assert (out.double() - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (5, 37, 13), (20, 128, 40)])
def test_dynamic_linear_is_exact_integer_arithmetic(m, k, n):
    torch.manual_seed(k)
    x = torch.randn(m, k) * 3
    q, scale = quantize_weight(torch.randn(n, k))
    bias = torch.randn(n)
    out = dynamic_linear(x, q, scale, bias)
    xscale = x.abs().amax(1, keepdim=True) / 127
    xq = torch.round(x / xscale).clamp(-127, 127)
    exact = (xq.double() @ q.double().t()) * xscale.double() * scale.double() + bias.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-4)
    # and close to the float product, within activation + weight rounding
    ref = x.double() @ dequantize_weight(q, scale, torch.float64).t() + bias.double()
    assert (out.double() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("m", [1, 7, 16, 40])  # < 16 rows: the VNNI kernel (where built); else torch._int_mm
def test_dynamic_paths_agree_bit_for_bit(m, monkeypatch):
    torch.manual_seed(m)
    x = torch.randn(2, m, 72) * 4
    q, scale = quantize_weight(torch.randn(24, 72))
    bias = torch.randn(24)
    native = dynamic_linear(x, q, scale, bias)
    rows = x.reshape(-1, 72)
    if kernels.native_library() is not None:
        assert all(torch.equal(a, b) for a, b in zip(kernels.quantize_rows(rows), quantize_activations(rows)))
    monkeypatch.setattr(kernels, "native_library", lambda: None)
    assert torch.equal(dynamic_linear(x, q, scale, bias), native)


def test_int8_linear_fast_path_follows_weight_updates_and_moves():
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 24, bias=True)
    layer = Int8Linear.from_linear(linear, "weight_only")
    x = torch.randn(3, 40)

    def reference() -> torch.Tensor:
        return F.linear(x, layer.dequantized_weight(), layer.bias.detach().float())

    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference())
        layer.weight.copy_(layer.weight.flip(0))  # in place: same storage
        layer.bias.add_(1.0)
        torch.testing.assert_close(layer(x), reference())
        layer.load_state_dict(
            {k: v.clone() * (2 if v.is_floating_point() else 1) for k, v in layer.state_dict().items()}
        )
        torch.testing.assert_close(layer(x), reference())
        layer.to(torch.bfloat16)  # scales and bias become bfloat16: the generic path
        out = layer(x.bfloat16())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference(), rtol=0.02, atol=0.05)


def test_int8_linear_close_to_float_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(2, 7, 64)
    expected = linear(x)
    for method in METHODS:
        layer = Int8Linear.from_linear(linear, method)
        assert layer.weight.dtype == torch.int8 and layer.weight_scale.shape == (48,)
        out = layer(x)
        assert out.shape == expected.shape
        assert (out - expected).abs().max() < 0.02 * expected.abs().max(), method
    with pytest.raises(ValueError, match="method"):
        Int8Linear(4, 4, method="int4")


def test_int8_embedding_dequantizes_rows():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 32)
    q = Int8Embedding.from_embedding(emb)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    out = q(ids)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32)
    assert (out - emb(ids)).abs().max() <= emb.weight.abs().max() / 254 + 1e-6


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("kind", ["llama_gqa", "deepseek_v3"])
@pytest.mark.parametrize("method", METHODS)
def test_quantize_model_converts_linears_and_experts(kind, method):
    model = _model(kind)
    ids = torch.randint(0, 160, (2, 9))
    with torch.no_grad():
        expected = model(ids)
    float_bytes = tensor_bytes(model)
    quantized = quantize_model(model, method)
    assert quantized is model and isinstance(quantized, QuantizedTransformer)
    linears = [n for n, m in quantized.named_modules() if isinstance(m, torch.nn.Linear)]
    int8 = [n for n, m in quantized.named_modules() if isinstance(m, Int8Linear)]
    assert "lm_head" in int8 and all(
        m.method == method for m in quantized.modules() if isinstance(m, Int8Linear)
    )
    if kind == "deepseek_v3":
        assert sorted(linears) == [f"model.layers.{i}.self_attn.kv_b_proj" for i in range(3)]
        assert len([m for m in quantized.modules() if isinstance(m, Int8RoutedExperts)]) == 2
    else:
        assert linears == []
    assert isinstance(quantized.model.embed_tokens, torch.nn.Embedding)  # embeddings stay float
    assert quantized.model.norm.weight.dtype == torch.float32 and quantized.dtype == torch.float32
    qc = quantized.quantization_config
    assert qc["quant_method"] == "deepseek-int8" and qc["method"] == method and qc["bits"] == 8
    assert "model.embed_tokens" in qc["modules_not_converted"]
    assert tensor_bytes(quantized) < 0.5 * float_bytes
    with torch.no_grad():
        out = quantized(ids)
    # same predictions for nearly all positions, logits close
    agree = (out.argmax(-1) == expected.argmax(-1)).float().mean()
    assert agree >= 0.85, agree
    assert (out - expected).abs().mean() < 0.1 * expected.abs().mean()


def test_quantize_model_options_and_errors():
    model = quantize_model(
        _model("llama_tied_linear"),
        "weight_only",
        quantize_embeddings=True,
        modules_to_not_convert=["model.layers.1"],
    )
    assert not model.config.tie_word_embeddings  # untied: both converted separately
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)
    assert isinstance(model.model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert "model.layers.1.self_attn.q_proj" in model.quantization_config["modules_not_converted"]
    keep_head = quantize_model(_model("llama_gqa"), "dynamic_quantization", quantize_lm_head=False)
    assert isinstance(keep_head.lm_head, torch.nn.Linear)
    assert keep_head.quantization_config["modules_not_converted"] == ["lm_head", "model.embed_tokens"]
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(keep_head, "weight_only")
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        quantize_model(_model("llama_gqa"), "weight_only", modules_to_not_convert=["model.nope"])
    with pytest.raises(ValueError, match="method"):
        quantize_model(_model("llama_gqa"), "int4")


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kind", ["llama_tied_linear", "deepseek_v3"])
@pytest.mark.parametrize("method", METHODS)
def test_int8_checkpoint_round_trip(kind, method, tmp_path):
    quantized = quantize_model(_model(kind), method)
    target = save_quantized_model(quantized, tmp_path / "int8", max_shard_size="20KB")
    config = json.loads((target / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "deepseek-int8" and qc["method"] == method and qc["bits"] == 8
    assert config["tie_word_embeddings"] is False
    index = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
    names = set(index)
    assert "model.layers.0.mlp.down_proj.weight_scale" in names and "lm_head.weight_scale" in names
    shard = target / index["model.layers.0.mlp.down_proj.weight"]
    with safe_open(str(shard), "pt") as handle:
        assert handle.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.int8
    if kind == "deepseek_v3":  # experts per expert, as float checkpoints store them
        assert {
            "model.layers.1.mlp.experts.7.up_proj.weight",
            "model.layers.1.mlp.experts.7.up_proj.weight_scale",
        } <= names
        assert "model.layers.1.self_attn.kv_b_proj.weight_scale" not in names
    loaded = load_model(target)
    assert isinstance(loaded, QuantizedTransformer)
    assert loaded.quantization_config["method"] == method
    original = quantized.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == original[name].dtype and torch.equal(tensor, original[name]), name
    ids = torch.randint(0, 160, (1, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids), quantized(ids))
    assert checkpoint_tensor_bytes(target) == tensor_bytes(quantized)
    bf16 = load_model(target, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.lm_head.weight.dtype == torch.int8
    with torch.no_grad():
        assert bf16(ids).dtype == torch.bfloat16


def test_int8_checkpoint_errors_name_the_field(tmp_path):
    target = save_quantized_model(quantize_model(_model("llama_gqa"), "weight_only"), tmp_path / "int8")
    config_path = target / "config.json"
    good = json.loads(config_path.read_text())
    for field, value, needle in [
        ("quant_method", "gptq", "quant_method"),
        ("bits", 4, "bits"),
        ("method", "static", "method"),
        ("modules_not_converted", "lm_head", "modules_not_converted"),
    ]:
        bad = json.loads(json.dumps(good))
        bad["quantization_config"][field] = value
        config_path.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=needle):
            load_model(target)
    # a module listed as float while the file holds it as int8: tensors left over are an error
    bad = json.loads(json.dumps(good))
    bad["quantization_config"]["modules_not_converted"].append("lm_head")
    config_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="lm_head"):
        load_model(target)
    with pytest.raises(TypeError, match="quantized"):
        save_quantized_model(_model("llama_gqa"), tmp_path / "float")


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    target = save_quantized_model(quantize_model(_model("llama_gqa"), "weight_only"), tmp_path / "int8")
    before = sorted(p.name for p in target.iterdir())
    import deepseek_core.quant.checkpoint as qckpt

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(qckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized_model(quantize_model(_model("llama_gqa", 1), "dynamic_quantization"), target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert load_model(target).quantization_config["method"] == "weight_only"
    assert [p.name for p in tmp_path.iterdir()] == ["int8"]


# ---------------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize("kind", ["llama_gqa", "deepseek_v2"])
@pytest.mark.parametrize("method", METHODS)
def test_engine_generates_from_int8_checkpoint_like_uncached_greedy(kind, method, tmp_path):
    from deepseek_core.engine import LLM, SamplingParams

    model = _model(kind, seed=3)
    with torch.no_grad():  # larger weights so greedy decoding moves between tokens
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(2.0)
    quantized = quantize_model(model, method)
    target = save_quantized_model(quantized, tmp_path / "int8")
    llm = LLM(target, num_kv_blocks=16, block_size=8)
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                ids.append(int(quantized(torch.tensor([ids]))[0, -1].argmax()))
        assert out.token_ids == ids[len(prompt) :]
        assert out.finish_reason == "length"
