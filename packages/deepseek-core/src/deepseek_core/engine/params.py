"""SamplingParams: how one request is decoded, validated when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

_MAX_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5  # below this, decoding is greedy (as in vLLM): 1/T would only amplify rounding


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """Decoding options of one request (the names and meanings follow vLLM / the OpenAI API).

    temperature 0 (or below 1e-5) means greedy. top_k -1 (or 0) disables top-k; top_p 1 and min_p 0 disable those filters.
    repetition_penalty (> 0, 1 = off) divides positive / multiplies negative logits of every token already in
    the prompt or output; presence_penalty and frequency_penalty ([-2, 2]) subtract from the logits of tokens
    already generated. `stop` strings end the request (cut from the text unless include_stop_str_in_output),
    as do `stop_token_ids` and the model's EOS ids (unless ignore_eos). `seed` makes sampling reproducible
    whatever else runs in the batch. `logprobs` None = none, 0 = the chosen token's, N = also the top N.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    _stop_strings: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}: {why}, got {getattr(self, name)!r}")

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= 1, or -1 / 0 to disable")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(self.stop, str):
            stops = (self.stop,)
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            stops = tuple(self.stop)
        else:
            raise bad("stop", "must be a string or a list of strings")
        if any(s == "" for s in stops):
            raise bad("stop", "stop strings must not be empty")
        self._stop_strings = stops
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, (list, tuple))
            or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)
        ):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a bool")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an integer or None")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= _MAX_LOGPROBS
        ):
            raise bad("logprobs", f"must be None or an integer in [0, {_MAX_LOGPROBS}]")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise bad("include_stop_str_in_output", "must be a bool")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple (empty when None)."""
        return self._stop_strings

    @property
    def greedy(self) -> bool:
        """True when decoding takes the arg-max (temperature 0 or below GREEDY_TEMPERATURE, or top_k 1)."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        """True when any repetition / presence / frequency penalty is active."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
