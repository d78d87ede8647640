"""DeepSeekMoE: shared experts plus routed top-k experts, computed by grouping tokens per expert.

Routing:
  deepseek_v2  softmax scores; greedy top-k, or group-limited (best `topk_group` groups by max score)
  deepseek_v3  sigmoid scores + e_score_correction_bias for choosing; groups ranked by the sum of their
               top-2 scores; weights are the uncorrected scores, optionally normalized
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .mlp import MLP
from .native import inference_on_cpu

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
# Up to this many (token, expert) assignments per expert on average, the native GEMV beats a grouped matmul
# (tools/bench/forward.py, V2-Lite-shaped layer: 1.2-2.3x at 16-64 tokens, slower from about 10 per expert).
_GEMV_ROWS_PER_EXPERT = 6

# An inference engine may compute the routed experts from its own packed copy of their weights, on its own
# thread only (like model/linear.py's router): router(experts, inputs sorted by expert, counts) -> outputs, or
# None to leave this call to the module.
ExpertsRouter = Callable[["RoutedExperts", torch.Tensor, torch.Tensor], "torch.Tensor | None"]
_local = threading.local()


def swap_experts_router(router: ExpertsRouter | None) -> ExpertsRouter | None:
    """Send this thread's routed-expert products to `router` (None: the module's own); returns the previous one."""
    previous: ExpertsRouter | None = getattr(_local, "router", None)
    _local.router = router
    return previous


class Router(nn.Module):
    """Chooses `top_k` experts per token and their weights (computed in float32)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.n_routed_experts and config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.scoring = config.routing
        self.topk_method = config.topk_method
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.e_score_correction_bias: torch.Tensor
        if self.scoring == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))

    def _group_mask(self, scores_for_choice: torch.Tensor) -> torch.Tensor:
        """Boolean [tokens, experts]: experts that belong to one of the best `topk_group` groups."""
        grouped = scores_for_choice.view(-1, self.n_group, self.num_experts // self.n_group)
        if self.scoring == "sigmoid":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        return group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, self.num_experts)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states [tokens, hidden] -> (weights [tokens, k] float32, expert ids [tokens, k])."""
        logits = F.linear(hidden_states.float(), self.weight.float())
        grouped = self.n_group > 1 and self.topk_method != "greedy"
        if self.scoring == "sigmoid":
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()
            if grouped:
                choice = choice.masked_fill(~self._group_mask(choice), float("-inf"))
            expert_ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, expert_ids)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return weights * self.routed_scaling_factor, expert_ids
        scores = logits.softmax(dim=-1)
        if grouped:
            scores = scores.masked_fill(~self._group_mask(scores), 0.0)
        weights, expert_ids = scores.topk(self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * self.routed_scaling_factor
        return weights, expert_ids


class RoutedExperts(nn.Module):
    """All routed experts' weights stacked, so one grouped matmul serves every expert."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        # gate and up stacked along dim 1, like transformers' in-memory layout: [E, 2I, H]
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(
        self, hidden_states: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [T, H], weights/expert_ids [T, k] -> [T, H]."""
        top_k = expert_ids.shape[-1]
        flat_ids = expert_ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of = order // top_k  # which token each sorted assignment came from
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        routed_inputs = hidden_states[token_of]  # [T*k, H], grouped by expert
        router: ExpertsRouter | None = getattr(_local, "router", None)
        routed = router(self, routed_inputs, counts) if router is not None else None
        if routed is not None:
            outputs = routed
        elif self._streams_weights(routed_inputs):
            outputs = self._gemv_loop(routed_inputs, counts)
        elif _HAS_GROUPED_MM and routed_inputs.dtype in (torch.float32, torch.bfloat16):
            offsets = counts.cumsum(0).to(torch.int32)
            gate_up = F.grouped_mm(routed_inputs, self.gate_up_proj.transpose(1, 2), offs=offsets)
            gate, up = gate_up.chunk(2, dim=-1)
            outputs = F.grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
        else:
            outputs = self._loop(routed_inputs, counts)
        outputs = outputs * weights.reshape(-1)[order].unsqueeze(-1).to(outputs.dtype)
        combined = torch.zeros_like(hidden_states)
        return combined.index_add_(0, token_of, outputs.to(hidden_states.dtype))

    def _streams_weights(self, routed_inputs: torch.Tensor) -> bool:
        """Few rows per expert (decode): each expert's product is bound by reading its weights, which the native
        GEMV streams at about twice the rate of a matmul. CPU inference only (the kernel has no backward)."""
        if routed_inputs.shape[0] > _GEMV_ROWS_PER_EXPERT * self.num_experts or not inference_on_cpu(
            routed_inputs, self.gate_up_proj
        ):
            return False
        from ..quant import kernels

        return (
            routed_inputs.dtype == self.gate_up_proj.dtype
            and kernels.gemv_takes(self.gate_up_proj[0])
            and kernels.gemv_takes(self.down_proj[0])
            and kernels.native_library() is not None
        )

    def _gemv_loop(self, routed_inputs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        from ..quant.kernels import GEMV_MAX_ROWS, float_gemv

        outputs = torch.empty_like(routed_inputs)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            for row in range(start, start + count, GEMV_MAX_ROWS):
                end = min(row + GEMV_MAX_ROWS, start + count)
                gate, up = float_gemv(routed_inputs[row:end], self.gate_up_proj[expert], None).chunk(
                    2, dim=-1
                )
                outputs[row:end] = float_gemv(F.silu(gate) * up, self.down_proj[expert], None)
            start += count
        return outputs

    def _loop(self, routed_inputs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outputs = torch.empty_like(routed_inputs)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            chunk = routed_inputs[start : start + count]
            gate, up = F.linear(chunk, self.gate_up_proj[expert]).chunk(2, dim=-1)
            outputs[start : start + count] = F.linear(F.silu(gate) * up, self.down_proj[expert])
            start += count
        return outputs


class MoE(nn.Module):
    """Shared experts (a dense SwiGLU) plus routed experts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.n_routed_experts and config.moe_intermediate_size
        self.gate = Router(config)
        self.experts = RoutedExperts(
            config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        )
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        weights, expert_ids = self.gate(flat)
        out = self.experts(flat, weights, expert_ids).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out
