"""INT8 compression with an accuracy gate (Enterprise Edition).

    from deepseek_ee.compression import compress, compress_checkpoint
    int8_model = compress(model, method="dynamic_quantization", dtype="int8")   # in memory
    report = compress_checkpoint("ckpt/", "ckpt-int8/", eval_data="heldout.txt", max_loss=0.02)

The quantized layers themselves live in deepseek_core.quant, so every edition serves what this produces
(`deepseek-core serve --model ckpt-int8/`). Console: `deepseek-ee compress --model DIR --output DIR`.
"""

from .evaluate import Perplexity, load_eval_tokens, perplexity, windows_of
from .gate import REPORT_NAME, CompressionReport, compress_checkpoint
from .quantize import DTYPES, GRANULARITIES, compress

__all__ = [
    "DTYPES",
    "GRANULARITIES",
    "REPORT_NAME",
    "CompressionReport",
    "Perplexity",
    "compress",
    "compress_checkpoint",
    "load_eval_tokens",
    "perplexity",
    "windows_of",
]
