"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math

import torch


class WarmupCosine:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based), as LambdaLR expects.

    Steps 0..warmup_steps-1 ramp linearly up to 1 (step 0 already trains, at 1/warmup of the peak); from
    warmup_steps to max_steps the multiplier follows a half cosine from 1 down to `min_lr_ratio`.
    A plain class (not a lambda) so LambdaLR's state_dict saves it and a resumed run restores it exactly.
    """

    def __init__(self, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1, got {max_steps}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = min(warmup_steps, max_steps)  # a warmup longer than the run ends with it
        self.max_steps = max_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `optimizer` following WarmupCosine; call .step() after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, max_steps, min_lr_ratio))
