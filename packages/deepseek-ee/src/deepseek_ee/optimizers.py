"""AdaFactor: Adam-like updates with factored second moments (Shazeer & Stern, 2018).

For a parameter with two or more dimensions the running mean of squared gradients is kept as one row
vector and one column vector (memory O(n + m) instead of O(n * m)); vectors and scalars keep the full
running mean. The update rule, defaults and argument names follow fairseq's and transformers'
implementation, so the two produce the same parameters step for step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["AdaFactor"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class AdaFactor(Optimizer):
    """AdaFactor optimizer with factored second moments for matrices (and higher-rank tensors).

    Args:
        params: parameters or parameter-group dicts.
        lr: external learning rate; must be None when ``relative_step`` is True (the step size is then
            ``min(1e-2, 1/sqrt(step))``, or ``min(1e-6 * step, 1/sqrt(step))`` with ``warmup_init``).
        eps: ``(eps1, eps2)``: eps1 regularizes the squared gradient, eps2 floors the parameter scale.
        clip_threshold: the update is scaled down so its RMS does not exceed this.
        decay_rate: exponent of the second-moment decay, ``beta2_t = 1 - step ** decay_rate``.
        beta1: when set, also keep a running mean of updates (first moment) with this coefficient.
        weight_decay: decoupled L2 penalty, scaled by the step size.
        scale_parameter: multiply the step size by ``max(eps2, RMS(param))``.
        relative_step: compute a time-dependent step size instead of using ``lr``.
        warmup_init: linear warm-up of the relative step size; requires ``relative_step``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "eps": eps,
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "beta1": beta1,
            "weight_decay": weight_decay,
            "scale_parameter": scale_parameter,
            "relative_step": relative_step,
            "warmup_init": warmup_init,
        }
        _validate_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; its options (after defaults are filled in) are validated."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["eps"] = tuple(group["eps"])
        _validate_group(group)

    @staticmethod
    def _step_size(group: dict[str, Any], step: int, param_rms: torch.Tensor) -> torch.Tensor | float:
        """The learning rate for this step: relative (time-dependent) or external, optionally scaled."""
        step_size = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            step_size = min(min_step, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            # A tensor, so that no host-device sync is needed on accelerators.
            return param_rms.clamp(min=group["eps"][1]) * step_size
        return step_size

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("AdaFactor does not support sparse gradients")
                self._update_param(param, group)
        return loss

    def _update_param(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        grad = param.grad
        assert grad is not None
        if grad.dtype in _LOW_PRECISION:
            grad = grad.float()
        factored = grad.dim() >= 2
        use_first_moment = group["beta1"] is not None

        state = self.state[param]
        if len(state) == 0:
            state["step"] = 0
            if use_first_moment:
                state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                # Row statistics: mean over the last dim; column statistics: mean over the second-to-last.
                state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
        else:
            # State loaded from a checkpoint may be on another device or dtype.
            for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(grad)

        param_fp32 = param.float() if param.dtype in _LOW_PRECISION else param

        state["step"] += 1
        step = state["step"]
        param_rms = _rms(param_fp32)
        state["RMS"] = param_rms
        step_size = self._step_size(group, step, param_rms)

        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        sq_grad = grad.square().add_(group["eps"][0])
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(sq_grad.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(sq_grad.mean(dim=-2), alpha=1.0 - beta2t)
            update = _approx_rsqrt_second_moment(row, col).mul_(grad)
        else:
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.mul_(beta2t).add_(sq_grad, alpha=1.0 - beta2t)
            update = exp_avg_sq.rsqrt().mul_(grad)

        # Update clipping: scale down so RMS(update) <= clip_threshold.
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(step_size)

        if use_first_moment:
            exp_avg = state["exp_avg"]
            exp_avg.mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
            update = exp_avg

        if group["weight_decay"] != 0:
            param_fp32.add_(param_fp32 * (-group["weight_decay"] * step_size))
        param_fp32.add_(-update)
        if param_fp32 is not param:
            param.copy_(param_fp32)


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    """Root mean square of all elements."""
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def _approx_rsqrt_second_moment(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """1/sqrt of the rank-1 estimate ``row ⊗ col / mean(row)`` of the squared-gradient average."""
    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    col_factor = col.unsqueeze(-2).rsqrt()
    return row_factor * col_factor


def _validate_group(group: dict[str, Any]) -> None:
    """Refuse option values that cannot work, naming the parameter at fault."""
    lr = group["lr"]
    relative_step = group["relative_step"]
    if lr is not None and relative_step:
        raise ValueError(
            f"AdaFactor: lr={lr!r} cannot be combined with relative_step=True "
            "(the step size is then computed); pass relative_step=False to use an external lr"
        )
    if lr is None and not relative_step:
        raise ValueError("AdaFactor: lr is required when relative_step=False")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"AdaFactor: lr must be a positive finite number, got {lr!r}")
    if group["warmup_init"] and not relative_step:
        raise ValueError("AdaFactor: warmup_init=True requires relative_step=True")
    eps = group["eps"]
    if (
        not isinstance(eps, (tuple, list))
        or len(eps) != 2
        or not all(isinstance(e, (int, float)) and e >= 0 for e in eps)
    ):
        raise ValueError(f"AdaFactor: eps must be a pair of non-negative numbers (eps1, eps2), got {eps!r}")
    clip = group["clip_threshold"]
    if not (isinstance(clip, (int, float)) and clip > 0):
        raise ValueError(f"AdaFactor: clip_threshold must be > 0, got {clip!r}")
    decay_rate = group["decay_rate"]
    if not (isinstance(decay_rate, (int, float)) and -1.0 <= decay_rate <= 0.0):
        raise ValueError(f"AdaFactor: decay_rate must be in [-1.0, 0.0], got {decay_rate!r}")
    beta1 = group["beta1"]
    if beta1 is not None and not (isinstance(beta1, (int, float)) and 0.0 <= beta1 < 1.0):
        raise ValueError(f"AdaFactor: beta1 must be None or in [0.0, 1.0), got {beta1!r}")
    weight_decay = group["weight_decay"]
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0.0):
        raise ValueError(f"AdaFactor: weight_decay must be >= 0, got {weight_decay!r}")
    for flag in ("scale_parameter", "relative_step", "warmup_init"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"AdaFactor: {flag} must be a bool, got {group[flag]!r}")
