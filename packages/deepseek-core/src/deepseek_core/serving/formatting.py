"""OpenAI response bodies and stream chunks for completions and chat completions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


class TokenText:
    """Text of single tokens (for logprobs), cached: the same ids recur across requests."""

    def __init__(self, tokenizer: Any, max_cache: int = 65536) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._max = max_cache

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = str(self.tokenizer.decode([token_id], skip_special_tokens=False))
            if len(self._cache) < self._max:
                self._cache[token_id] = text
        return text


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The usage object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _lp(value: float) -> float:
    # JSON has no -inf: OpenAI clients expect a finite number.
    return value if value > -9999.0 else -9999.0


def completion_logprobs(entries: Sequence[Any], token_text: TokenText, text_offset: int) -> dict[str, Any]:
    """Completions' logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = text_offset
    for entry in entries:
        text = token_text(entry.token_id)
        tokens.append(text)
        token_logprobs.append(_lp(float(entry.logprob)))
        top.append({token_text(tid): _lp(float(lp)) for tid, lp in (entry.top or [])})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(entries: Sequence[Any], token_text: TokenText) -> dict[str, Any]:
    """Chat's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for entry in entries:
        text = token_text(entry.token_id)
        content.append(
            {
                "token": text,
                "logprob": _lp(float(entry.logprob)),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": (t := token_text(tid)),
                        "logprob": _lp(float(lp)),
                        "bytes": list(t.encode("utf-8")),
                    }
                    for tid, lp in (entry.top or [])
                ],
            }
        )
    return {"content": content}


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying `payload`."""
    return (
        b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"
    )


SSE_DONE = b"data: [DONE]\n\n"
