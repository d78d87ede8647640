"""AdamW with the usual two parameter groups: weight decay on matrices, none on 1-D tensors."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters: >= 2-D tensors (linear and embedding matrices, expert stacks) decay;
    1-D tensors (norm scales, biases, router correction biases) do not, as in GPT-2/Llama practice.
    Tied weights appear once (named_parameters de-duplicates them)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over `parameter_groups(model)`; the fused kernel on CUDA, the foreach one elsewhere."""
    groups = parameter_groups(model, weight_decay)
    if not groups:
        raise ValueError("model: has no trainable parameters")
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    kwargs: dict[str, Any] = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **kwargs)
