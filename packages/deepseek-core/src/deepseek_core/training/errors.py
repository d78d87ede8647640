"""Errors of training runs."""

from __future__ import annotations

from ..errors import DeepSeekError


class DataError(DeepSeekError, ValueError):
    """A data file that cannot be trained on; the message names the file (and line, where there is one)."""


class TrainingDivergedError(DeepSeekError, FloatingPointError):
    """The loss became NaN or infinite; the run stopped before applying that step."""

    def __init__(self, step: int, loss: float, last_checkpoint: str | None = None) -> None:
        where = f"; the last complete checkpoint is {last_checkpoint}" if last_checkpoint else ""
        super().__init__(
            f"step {step}: loss is {loss} (not finite); training stopped{where}. "
            "Try a lower learning_rate, precision='fp32' or a smaller max_grad_norm."
        )
        self.step = step
        self.loss = loss
