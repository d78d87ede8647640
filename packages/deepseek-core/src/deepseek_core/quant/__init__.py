"""INT8 quantized layers and checkpoints: what every edition needs to run an INT8 model.

    from deepseek_core.quant import quantize_model, save_quantized_model
    model = quantize_model(model, "weight_only")          # or "dynamic_quantization"
    save_quantized_model(model, "out-int8", tokenizer=tok)
    model = deepseek_core.load_model("out-int8")          # dispatches to load_quantized_model

weight_only: int8 weights with per-output-channel scales, float activations (fastest at small batch on the
CPU: a native kernel that reads 1 byte per weight). dynamic_quantization: int8 weights and activations
quantized per token at run time, int8 x int8 -> int32 matmul (torch._int_mm). Embeddings (unless asked),
norms, biases and the MoE router stay float. Producing, evaluating and gating INT8 checkpoints is EE's
compression toolchain (deepseek_ee.compression).
"""

from .checkpoint import (
    check_quantization_config,
    checkpoint_tensor_bytes,
    load_quantized_model,
    quantized_state_dict,
    save_quantized_model,
    tensor_bytes,
)
from .convert import QUANT_METHOD, QuantizedTransformer, quantize_model
from .functional import (
    dequantize_weight,
    dynamic_linear,
    quantize_activations,
    quantize_weight,
    weight_only_linear,
)
from .kernels import kernel_isa, native_library
from .layers import METHODS, Int8Embedding, Int8Linear, Int8RoutedExperts

__all__ = [
    "METHODS",
    "QUANT_METHOD",
    "Int8Embedding",
    "Int8Linear",
    "Int8RoutedExperts",
    "QuantizedTransformer",
    "check_quantization_config",
    "checkpoint_tensor_bytes",
    "dequantize_weight",
    "dynamic_linear",
    "kernel_isa",
    "load_quantized_model",
    "native_library",
    "quantize_activations",
    "quantize_model",
    "quantize_weight",
    "quantized_state_dict",
    "save_quantized_model",
    "tensor_bytes",
    "weight_only_linear",
]
