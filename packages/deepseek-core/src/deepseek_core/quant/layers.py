"""Modules that hold INT8 weights: Int8Linear, Int8Embedding, Int8RoutedExperts (inference only).

Each keeps `weight` (int8) and `weight_scale` (float, one per output channel / embedding row / expert
channel) as buffers, so state_dict names follow the checkpoint's `<name>.weight` / `<name>.weight_scale`.
Biases stay float.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import RoutedExperts
from . import kernels
from .functional import dynamic_linear, quantize_weight, weight_only_linear

Method = Literal["weight_only", "dynamic_quantization"]
METHODS: tuple[str, ...] = ("weight_only", "dynamic_quantization")


def check_method(method: str) -> str:
    """Validate a quantization method name."""
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; use one of {', '.join(METHODS)}")
    return method


class Int8Linear(nn.Module):
    """A Linear with int8 weights [out, in] and per-output-channel scales [out].

    method 'weight_only': activations stay float (dequantize-in-register matmul);
    method 'dynamic_quantization': activations are quantized per token at run time (int8 x int8 -> int32).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        method: str = "weight_only",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.method = check_method(method)
        self.weight: torch.Tensor
        self.weight_scale: torch.Tensor
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._plan: kernels.WeightOnlyPlan | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, method: str = "weight_only", per_channel: bool = True, clip_ratio: float = 1.0
    ) -> Int8Linear:
        """Quantize a float nn.Linear."""
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            method,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        q, scale = quantize_weight(linear.weight, per_channel, clip_ratio)
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            assert module.bias is not None
            module.bias.data.copy_(linear.bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inference only: the native kernels read raw pointers (no autograd through them).
        weight, scale, bias = self.weight, self.weight_scale, self.bias
        if self.method == "dynamic_quantization":
            return dynamic_linear(x, weight, scale, bias)
        # Decode hot path (~85 calls per token for a 134M model): pointers prepared once per layer.
        plan = self._plan
        if plan is not None and x.dtype is torch.float32 and plan.matches(weight, scale, bias):
            return plan(x)
        if (
            x.dtype is torch.float32
            and x.device.type == "cpu"
            and kernels.native_library() is not None
            and kernels.WeightOnlyPlan.usable(weight, scale, bias)
        ):
            self._plan = plan = kernels.WeightOnlyPlan(weight, scale, bias)
            return plan(x)
        return weight_only_linear(x, weight, scale, bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this layer computes with (q * scale)."""
        return (self.weight.to(torch.float32) * self.weight_scale.to(torch.float32).unsqueeze(-1)).to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, method={self.method}"
        )


class Int8Embedding(nn.Module):
    """An Embedding with int8 rows and one scale per row; lookups dequantize only the rows they read."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight: torch.Tensor
        self.weight_scale: torch.Tensor
        self.register_buffer(
            "weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=dtype, device=device))

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, per_channel: bool = True, clip_ratio: float = 1.0
    ) -> Int8Embedding:
        """Quantize a float nn.Embedding row by row."""
        module = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            device=embedding.weight.device,
            dtype=embedding.weight.dtype,
        )
        q, scale = quantize_weight(embedding.weight, per_channel, clip_ratio)
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Output dtype follows the scales, which follow the model's dtype through Module.to().
        rows = F.embedding(input_ids, self.weight).to(self.weight_scale.dtype)
        return rows * self.weight_scale[input_ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


class Int8RoutedExperts(nn.Module):
    """MoE routed experts with int8 weights quantized per expert and output channel.

    Same layout as RoutedExperts: gate_up_proj [E, 2I, H], down_proj [E, H, I] (int8), with scales
    gate_up_proj_scale [E, 2I] and down_proj_scale [E, H]; each expert runs its token group through the
    INT8 linear of `method`.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        method: str = "weight_only",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.method = check_method(method)
        i8 = torch.int8
        self.gate_up_proj: torch.Tensor
        self.down_proj: torch.Tensor
        self.gate_up_proj_scale: torch.Tensor
        self.down_proj_scale: torch.Tensor
        self.register_buffer(
            "gate_up_proj",
            torch.zeros(num_experts, 2 * intermediate_size, hidden_size, dtype=i8, device=device),
        )
        self.register_buffer(
            "down_proj", torch.zeros(num_experts, hidden_size, intermediate_size, dtype=i8, device=device)
        )
        self.register_buffer(
            "gate_up_proj_scale", torch.ones(num_experts, 2 * intermediate_size, device=device)
        )
        self.register_buffer("down_proj_scale", torch.ones(num_experts, hidden_size, device=device))

    @classmethod
    def from_experts(
        cls,
        experts: RoutedExperts,
        method: str = "weight_only",
        per_channel: bool = True,
        clip_ratio: float = 1.0,
    ) -> Int8RoutedExperts:
        """Quantize a float RoutedExperts."""
        gate_up, down = experts.gate_up_proj, experts.down_proj
        module = cls(gate_up.shape[0], gate_up.shape[2], gate_up.shape[1] // 2, method, device=gate_up.device)
        for name, weight in (("gate_up_proj", gate_up), ("down_proj", down)):
            q, scale = quantize_weight(weight, per_channel, clip_ratio)
            getattr(module, name).copy_(q)
            getattr(module, f"{name}_scale").copy_(scale)
        return module

    def _linear(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.method == "dynamic_quantization":
            return dynamic_linear(x, q, scale)
        return weight_only_linear(x, q, scale)

    def forward(
        self, hidden_states: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [T, H], weights/expert_ids [T, k] -> [T, H]."""
        top_k = expert_ids.shape[-1]
        flat_ids = expert_ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        routed_inputs = hidden_states[token_of]  # [T*k, H], grouped by expert
        outputs = torch.empty_like(routed_inputs)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            chunk = routed_inputs[start : start + count]
            gate, up = self._linear(chunk, self.gate_up_proj[expert], self.gate_up_proj_scale[expert]).chunk(
                2, -1
            )
            outputs[start : start + count] = self._linear(
                F.silu(gate) * up, self.down_proj[expert], self.down_proj_scale[expert]
            )
            start += count
        outputs = outputs * weights.reshape(-1)[order].unsqueeze(-1).to(outputs.dtype)
        combined = torch.zeros_like(hidden_states)
        return combined.index_add_(0, token_of, outputs.to(hidden_states.dtype))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, method={self.method}"
