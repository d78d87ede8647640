"""EE INT8 compression: a model trained on real text, compressed both ways behind the perplexity gate,
loaded by core, generated through the engine, served over HTTP; a damaged quantization fails the gate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from deepseek_core import Tokenizer, Transformer, load_model
from deepseek_core.quant import Int8Linear, QuantizedTransformer, checkpoint_tensor_bytes
from deepseek_ee.cli import main as ee_main
from deepseek_ee.compression import compress, compress_checkpoint, load_eval_tokens, perplexity

EVAL_TOKENS = "8192"
METHODS = ["dynamic_quantization", "weight_only"]


@pytest.fixture(scope="module")
def compressed(stdlib_lm, tmp_path_factory):
    """Run `deepseek-ee compress` (in-process CLI) for both methods; method -> (exit code, report, out dir)."""
    out: dict[str, tuple[int, dict, Path]] = {}
    for method in METHODS:
        root = tmp_path_factory.mktemp(f"int8-{method}")
        target = root / "int8"
        code = ee_main(
            [
                "compress",
                "--model",
                str(stdlib_lm.model_dir),
                "--output",
                str(target),
                "--method",
                method,
                "--eval-data",
                str(stdlib_lm.eval_file),
                "--eval-tokens",
                EVAL_TOKENS,
            ]
        )
        report = json.loads((target / "compression_report.json").read_text()) if target.is_dir() else {}
        out[method] = (code, report, target)
    return out


def test_fixture_model_really_learned(stdlib_lm):
    # uniform over 512 tokens is ln(512) = 6.24 nats and the unigram plateau ~5.3; 250 steps get well below
    assert stdlib_lm.first_loss > 5.5
    assert stdlib_lm.final_loss < 4.7, stdlib_lm


@pytest.mark.parametrize("method", METHODS)
def test_compress_passes_gate_within_2_percent_and_shrinks_weights(method, compressed, stdlib_lm):
    code, report, target = compressed[method]
    assert code == 0, report
    assert report["passed"] is True and report["written"] is True and report["method"] == method
    before, after = report["before"]["perplexity"], report["after"]["perplexity"]
    assert before < 150, "the float model should predict held-out code far better than chance (512)"
    change = after / before - 1
    assert abs(change) <= 0.02, f"{method}: perplexity {before:.4f} -> {after:.4f} ({change:+.2%})"
    assert report["relative_change"] == pytest.approx(change)
    assert report["after"]["tokens"] >= 8000
    # The whole checkpoint's tensors on disk: INT8 against the float32 checkpoint.
    float_bytes = checkpoint_tensor_bytes(stdlib_lm.model_dir)
    int8_bytes = checkpoint_tensor_bytes(target)
    assert int8_bytes / float_bytes <= 0.30, (int8_bytes, float_bytes)
    assert report["weight_bytes"] == {
        "float": float_bytes,
        "int8": int8_bytes,
        "ratio": int8_bytes / float_bytes,
    }
    config = json.loads((target / "config.json").read_text())
    assert config["quantization_config"]["method"] == method
    assert config["quantization_config"]["modules_not_converted"] == ["model.embed_tokens"]
    assert (target / "tokenizer.json").is_file()


@pytest.mark.parametrize("method", METHODS)
def test_int8_checkpoint_loads_in_core_and_reproduces_the_reported_perplexity(method, compressed, stdlib_lm):
    _, report, target = compressed[method]
    model = load_model(target)
    assert isinstance(model, QuantizedTransformer)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    tokens = load_eval_tokens(stdlib_lm.eval_file, Tokenizer.from_pretrained(target), int(EVAL_TOKENS))
    measured = perplexity(model, tokens, window=report["eval_window"])
    assert measured.perplexity == pytest.approx(report["after"]["perplexity"], rel=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_int8_checkpoint_generates_through_the_engine(method, compressed):
    from deepseek_core.engine import LLM, SamplingParams

    _, _, target = compressed[method]
    llm = LLM(target)
    prompt = "def __init__(self"
    out = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 24 and out.text
    # the cached engine decodes exactly what the quantized model predicts without a cache
    model = load_model(target)
    ids = llm.tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out.token_ids == ids[-24:]


def test_int8_checkpoint_is_served_by_deepseek_core(compressed, serve_model):
    _, _, target = compressed["weight_only"]
    base = serve_model(target)
    response = httpx.post(
        base + "/v1/completions",
        json={"model": str(target), "prompt": "import ", "max_tokens": 12, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] == 12


def test_damaged_quantization_fails_the_gate_and_writes_nothing(stdlib_lm, tmp_path):
    target = tmp_path / "int8"
    cmd = [
        sys.executable,
        "-m",
        "deepseek_ee.cli",
        "compress",
        "--model",
        str(stdlib_lm.model_dir),
        "--output",
        str(target),
        "--eval-data",
        str(stdlib_lm.eval_file),
        "--eval-tokens",
        "4096",
        "--granularity",
        "per-tensor",
        "--clip-ratio",
        "0.1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert not target.exists()
    report_path = tmp_path / "int8.compression_report.json"
    report = json.loads(report_path.read_text())
    assert report["passed"] is False and report["written"] is False
    over = report["relative_change"] - 0.02
    assert over > 0.05  # far past the gate, not a borderline case
    assert "accuracy gate failed" in result.stderr
    assert f"by {over:.2%}" in result.stderr, result.stderr
    assert f"by {over:.2%}" in result.stdout  # the printed summary says it too

    forced = subprocess.run([*cmd, "--force"], capture_output=True, text=True, timeout=600)
    assert forced.returncode == 0, forced.stderr
    assert "WARNING: --force" in forced.stdout
    report = json.loads((target / "compression_report.json").read_text())
    assert report["passed"] is False and report["forced"] is True and report["written"] is True
    assert load_model(target).quantization_config["granularity"] == "per_tensor"


def test_failed_gate_keeps_an_existing_output(stdlib_lm, tmp_path):
    target = tmp_path / "int8"
    target.mkdir()
    (target / "keep.txt").write_text("previous")
    report = compress_checkpoint(
        stdlib_lm.model_dir,
        target,
        eval_data=stdlib_lm.eval_file,
        eval_tokens=2048,
        granularity="per-tensor",
        clip_ratio=0.05,
    )
    assert report.passed is False and not report.written
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_cli_input_errors(stdlib_lm, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert ee_main(["compress", "--model", str(stdlib_lm.model_dir), "--output", out]) == 2
    assert "--eval-data" in capsys.readouterr().err
    assert ee_main(["compress", "--model", str(tmp_path), "--output", out, "--force"]) == 2
    assert "config.json" in capsys.readouterr().err
    missing = tmp_path / "missing.txt"
    args = ["compress", "--model", str(stdlib_lm.model_dir), "--output", out, "--eval-data", str(missing)]
    assert ee_main(args) == 2
    assert "missing.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ee_main(["compress", "--model", str(stdlib_lm.model_dir), "--output", out, "--clip-ratio", "0"])
    assert not Path(out).exists()


def test_compress_api_in_memory(stdlib_lm):
    model = load_model(stdlib_lm.model_dir)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        expected = model(ids)
    quantized = compress(model, method="weight_only", dtype="int8")
    assert isinstance(quantized, QuantizedTransformer) and isinstance(quantized, Transformer)
    with torch.no_grad():
        assert (quantized(ids) - expected).abs().max() < 0.05 * expected.abs().max()
    with pytest.raises(ValueError, match="already quantized"):
        compress(quantized)
    with pytest.raises(ValueError, match="dtype"):
        compress(load_model(stdlib_lm.model_dir), dtype="int4")
    with pytest.raises(ValueError, match="method"):
        compress(load_model(stdlib_lm.model_dir), method="static")
    from deepseek_ee import Model

    facade = Model.from_pretrained(stdlib_lm.model_dir, device="cpu")
    assert compress(facade) is facade and isinstance(facade.module, QuantizedTransformer)
    assert facade.generate("def ", max_length=8)
