"""compress_checkpoint: load a float checkpoint, measure, quantize, measure again, gate, then write INT8.

The gate compares held-out perplexity before and after quantization; the INT8 directory is written only
when the relative increase is at most `max_loss` (or when `force` is set, which the report records).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from deepseek_core import Tokenizer, load_model
from deepseek_core.errors import CheckpointError
from deepseek_core.fileio import atomic_write_text
from deepseek_core.quant import (
    QuantizedTransformer,
    checkpoint_tensor_bytes,
    save_quantized_model,
    tensor_bytes,
)

from .evaluate import Perplexity, load_eval_tokens, perplexity
from .quantize import compress

REPORT_NAME = "compression_report.json"


@dataclass
class CompressionReport:
    """What compress_checkpoint measured and decided; `to_json()` is the saved report."""

    model: str
    output: str
    method: str
    granularity: str
    clip_ratio: float
    quantize_embeddings: bool
    max_loss: float
    eval_data: str | None
    eval_window: int
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    relative_change: float | None = None  # (ppl_int8 - ppl_float) / ppl_float
    passed: bool | None = None  # None: not evaluated
    forced: bool = False
    written: bool = False
    weight_bytes: dict[str, Any] = field(default_factory=dict)
    modules_not_converted: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    report_path: str | None = None

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @property
    def excess(self) -> float:
        """How far the relative change is over the limit (<= 0 when within it)."""
        return (self.relative_change or 0.0) - self.max_loss

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [f"INT8 {self.method} ({self.granularity}, clip ratio {self.clip_ratio:g}) of {self.model}"]
        if self.before and self.after and self.relative_change is not None:
            lines.append(
                f"  perplexity on {self.eval_data} ({self.after['tokens']} tokens, windows of {self.eval_window}): "
                f"float {self.before['perplexity']:.4f} -> int8 {self.after['perplexity']:.4f} "
                f"({self.relative_change:+.2%}; limit +{self.max_loss:.2%})"
            )
        else:
            lines.append("  perplexity: not evaluated (no eval data)")
        wb = self.weight_bytes
        if wb:
            lines.append(
                f"  weight bytes: float {wb['float']:,} -> int8 {wb['int8']:,} ({wb['ratio']:.1%} of float)"
            )
        if self.passed is False:
            verdict = f"FAILED the accuracy gate: +{self.relative_change:.2%} exceeds +{self.max_loss:.2%} by {self.excess:.2%}"
            verdict += " (written anyway: --force)" if self.forced and self.written else "; nothing written"
        elif self.passed:
            verdict = "passed the accuracy gate"
        else:
            verdict = "accuracy not checked (--force)"
        lines.append(f"  {verdict}" + (f"; INT8 checkpoint: {self.output}" if self.written else ""))
        return "\n".join(lines)


def _load_float(model_dir: Path, device: str) -> Any:
    model = load_model(model_dir, dtype=torch.float32, device=device)
    if isinstance(model, QuantizedTransformer):
        raise CheckpointError(f"{model_dir}: already an INT8 checkpoint; compress its float original")
    return model


def compress_checkpoint(
    model_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    method: str = "dynamic_quantization",
    eval_data: str | os.PathLike[str] | None = None,
    max_loss: float = 0.02,
    granularity: str = "per-channel",
    clip_ratio: float = 1.0,
    quantize_embeddings: bool = False,
    quantize_lm_head: bool = True,
    modules_to_not_convert: list[str] | None = None,
    eval_tokens: int | None = 16384,
    eval_window: int = 256,
    batch_size: int = 8,
    force: bool = False,
    report_path: str | os.PathLike[str] | None = None,
    max_shard_size: str = "2GB",
    device: str = "cpu",
    progress: bool = False,
) -> CompressionReport:
    """Quantize the checkpoint in `model_dir` to INT8 into `output_dir` behind the accuracy gate.

    Returns the report (also saved as JSON: `report_path`, else inside `output_dir` when written, else
    beside it as `<output_dir>.compression_report.json`). Without `eval_data` the gate cannot run: that is
    an error unless `force` is set.
    """
    if not 0.0 <= max_loss < 1.0:
        raise ValueError(f"max_loss: must be in [0, 1), got {max_loss}")
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if output_dir.resolve() == model_dir.resolve():
        raise ValueError(f"output: {output_dir} is the input checkpoint; choose another directory")
    if eval_data is None and not force:
        raise ValueError("eval_data: the accuracy gate needs held-out text (or force=True to skip the check)")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model = _load_float(model_dir, device)
    tokenizer_file = model_dir / "tokenizer.json"
    tokenizer = Tokenizer.from_pretrained(model_dir) if tokenizer_file.is_file() else None
    window = min(eval_window, model.config.max_position_embeddings)
    report = CompressionReport(
        model=str(model_dir),
        output=str(output_dir),
        method=method,
        granularity=granularity,
        clip_ratio=clip_ratio,
        quantize_embeddings=quantize_embeddings,
        max_loss=max_loss,
        eval_data=str(eval_data) if eval_data is not None else None,
        eval_window=window,
    )
    float_bytes = tensor_bytes(model)
    timings["load"] = time.perf_counter() - start
    tokens = None
    if eval_data is not None:
        if tokenizer is None:
            raise CheckpointError(
                f"{tokenizer_file}: missing; the eval text is tokenized with the checkpoint's tokenizer"
            )
        tokens = load_eval_tokens(eval_data, tokenizer, eval_tokens)
        t0 = time.perf_counter()
        report.before = perplexity(
            model, tokens, window, batch_size, progress, "float32 perplexity"
        ).to_dict()
        timings["eval_float"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    quantized = compress(
        model,
        method,
        "int8",
        granularity,
        clip_ratio,
        quantize_embeddings,
        quantize_lm_head,
        modules_to_not_convert,
    )
    timings["quantize"] = time.perf_counter() - t0
    report.modules_not_converted = list(quantized.quantization_config["modules_not_converted"])
    report.weight_bytes = {"float": float_bytes, "int8": tensor_bytes(quantized)}
    if tokens is not None:
        t0 = time.perf_counter()
        after: Perplexity = perplexity(quantized, tokens, window, batch_size, progress, "int8 perplexity")
        timings["eval_int8"] = time.perf_counter() - t0
        report.after = after.to_dict()
        assert report.before is not None
        report.relative_change = after.perplexity / report.before["perplexity"] - 1.0
        report.passed = report.relative_change <= max_loss
    report.forced = force
    if report.passed or force:
        t0 = time.perf_counter()
        save_quantized_model(quantized, output_dir, max_shard_size=max_shard_size, tokenizer=tokenizer)
        timings["save"] = time.perf_counter() - t0
        report.written = True
        report.weight_bytes["int8"] = checkpoint_tensor_bytes(output_dir)  # what is on disk
    report.weight_bytes["ratio"] = report.weight_bytes["int8"] / report.weight_bytes["float"]
    report.seconds = {k: round(v, 3) for k, v in timings.items()}
    if report_path is not None:
        path = Path(report_path)
    elif report.written:
        path = output_dir / REPORT_NAME
    else:
        path = output_dir.with_name(f"{output_dir.name}.{REPORT_NAME}")
    report.report_path = str(path)
    atomic_write_text(path, report.to_json())
    return report
