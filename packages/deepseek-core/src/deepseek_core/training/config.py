"""TrainingConfig: the hyper-parameters both trainers (CE's Trainer, EE's DistributedTrainer) read."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainingConfig:
    """What a training run does; every field is checked on construction (ValueError naming the field).

    `batch_size` is the number of sequences in one micro-batch; one optimizer step consumes
    `batch_size * grad_accum_steps` sequences of `seq_len` tokens.
    """

    max_steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100  # capped at max_steps
    min_lr_ratio: float = 0.1  # the cosine decays to learning_rate * min_lr_ratio at max_steps
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    eval_every: int = 200  # 0 disables periodic evaluation (the final one still runs when there is eval data)
    eval_steps: int = 20  # eval batches per evaluation; 0 evaluates the whole eval set
    save_every: int = 500  # 0 saves only at the end
    keep_last: int = 2  # complete checkpoints kept on disk; 0 keeps all
    seed: int = 42
    precision: str = "auto"  # auto: bf16 autocast on a GPU that supports it, fp32 elsewhere
    eval_fraction: float = 0.05  # of a single-file dataset's sequences held out when no eval_data is given
    log_every: int = 10
    text_field: str = "text"  # the field read from .jsonl lines and .parquet columns
    max_time_s: float | None = None  # stop (and checkpoint) once training has run this long
    gradient_checkpointing: bool = False
    loss_chunk_size: int = 0  # >0: compute the loss over this many tokens at a time (saves logits memory)
    progress_bar: bool = True

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot work."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            hint = hints[f.name]
            if not _type_ok(value, hint):
                raise ValueError(f"TrainingConfig.{f.name}: expected {_type_name(hint)}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"TrainingConfig.{f.name}: must be finite, got {value!r}")

        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ValueError(f"TrainingConfig.{name}: {why}, got {getattr(self, name)!r}")

        for name in ("max_steps", "batch_size", "grad_accum_steps", "log_every"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.seq_len >= 2, "seq_len", "must be >= 2 (one input and one target token)")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        for name in (
            "warmup_steps",
            "eval_every",
            "eval_steps",
            "save_every",
            "keep_last",
            "loss_chunk_size",
        ):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        need(0.0 <= self.adam_beta1 < 1.0, "adam_beta1", "must be in [0, 1)")
        need(0.0 <= self.adam_beta2 < 1.0, "adam_beta2", "must be in [0, 1)")
        need(self.adam_eps > 0, "adam_eps", "must be > 0")
        need(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        need(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
        need(bool(self.text_field), "text_field", "must be a non-empty string")
        need(self.max_time_s is None or self.max_time_s > 0, "max_time_s", "must be > 0 or None")

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON-serializable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Build from a dict; unknown keys are an error naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"TrainingConfig: expected a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"TrainingConfig: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        hints = typing.get_type_hints(cls)
        values = dict(data)
        for key, value in values.items():
            # Config files have one number type: accept 1 for a float field.
            if isinstance(value, int) and not isinstance(value, bool) and _allows(hints[key], float):
                values[key] = float(value)
        return cls(**values)

    def replace(self, **changes: Any) -> TrainingConfig:
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step."""
        return self.batch_size * self.grad_accum_steps * self.seq_len


def _allows(hint: Any, kind: type) -> bool:
    args = typing.get_args(hint)
    return hint is kind or kind in args


def _type_ok(value: Any, hint: Any) -> bool:
    args = typing.get_args(hint)
    options = args if args else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return True
        if option is bool and isinstance(value, bool):
            return True
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option is str and isinstance(value, str):
            return True
    return False


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    options = args if args else (hint,)
    return " or ".join("None" if o is type(None) else o.__name__ for o in options)
