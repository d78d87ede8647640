"""From an OpenAI request to engine jobs: prompt tokenization and checks, SamplingParams, seeds for n > 1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .engine_client import SequenceJob
from .errors import OpenAIError, bad_request
from .protocol import ChatCompletionRequest, CompletionRequest, TextContentPart

_SEED_MODULUS = 2**63
_MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (as in vLLM)


@dataclass
class Prompt:
    """One tokenized prompt and the text it came from (for echo and the audit log)."""

    token_ids: list[int]
    text: str | None


def completion_prompts(req: CompletionRequest, tokenizer: Any, vocab_size: int) -> list[Prompt]:
    """The prompts of a completion request: a string, strings, token ids, or lists of token ids."""
    raw = req.prompt
    if isinstance(raw, str):
        items: list[str | list[int]] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [list(raw)]  # type: ignore[arg-type]
    else:
        items = list(raw)  # type: ignore[arg-type]
    prompts = []
    for i, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            ids = list(tokenizer.encode(item))
            prompts.append(Prompt(ids, item))
        else:
            bad = next((t for t in item if t >= vocab_size), None)
            if bad is not None:
                raise bad_request(
                    f"{param}: token id {bad} is out of range (vocabulary size {vocab_size})", param
                )
            prompts.append(Prompt(list(item), None))
        if not prompts[-1].token_ids:
            raise bad_request(f"{param}: the prompt is empty (it has no tokens)", param)
    return prompts


def message_text(content: Any, index: int) -> str:
    """The text of a message's content (a string or a list of text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, TextContentPart):
            raise bad_request(
                f"messages[{index}].content[{j}]: content type {getattr(part, 'type', '?')!r} is not supported "
                "(this model takes text only)",
                f"messages[{index}].content[{j}].type",
                "unsupported_content",
            )
        texts.append(part.text)
    return "".join(texts)


def chat_prompt(req: ChatCompletionRequest, tokenizer: Any) -> Prompt:
    """Render the conversation with the tokenizer's chat template and tokenize it."""
    if req.tools or req.functions:
        raise bad_request(
            "tools: function calling is not supported by this server", "tools", "unsupported_parameter"
        )
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise bad_request(
            f"response_format: type {fmt!r} is not supported (only 'text')",
            "response_format",
            "unsupported_parameter",
        )
    messages = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": message_text(m.content, i)})
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=bool(req.add_generation_prompt))
    except ValueError as exc:
        raise bad_request(f"messages: {exc}", "messages") from None
    except Exception as exc:  # a template error: the request cannot be rendered
        raise bad_request(
            f"messages: the chat template cannot render this conversation ({exc})", "messages"
        ) from None
    ids = list(tokenizer.encode(str(text), add_special_tokens=False))
    if not ids:
        raise bad_request("messages: the rendered conversation is empty", "messages")
    return Prompt(ids, str(text))


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    """The max_tokens to use: checked against the context length, or all the room left when not given."""
    if prompt_len >= max_model_len:
        raise OpenAIError(
            400,
            f"{param}: the prompt has {prompt_len} tokens, and this model's context length is {max_model_len} "
            "tokens (leave room for at least one generated token)",
            param=param,
            code="context_length_exceeded",
        )
    room = max_model_len - prompt_len
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise OpenAIError(
            400,
            f"max_tokens: {max_tokens} requested with a prompt of {prompt_len} tokens exceeds this model's context "
            f"length of {max_model_len} tokens (at most {room} here)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def check_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """Refuse parameters we recognise but cannot honour, naming them."""
    if req.logit_bias:
        raise bad_request("logit_bias: not supported by this server", "logit_bias", "unsupported_parameter")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise bad_request("suffix: not supported by this server", "suffix", "unsupported_parameter")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise bad_request("best_of: only best_of == n is supported", "best_of", "unsupported_parameter")
        if req.echo and req.logprobs is not None:
            raise bad_request(
                "echo: echo together with logprobs (prompt logprobs) is not supported",
                "echo",
                "unsupported_parameter",
            )
    elif req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs: requires logprobs to be true", "top_logprobs")


def check_token_ids(req: CompletionRequest | ChatCompletionRequest, vocab_size: int) -> None:
    """stop_token_ids must name tokens of the vocabulary."""
    bad = next((t for t in req.stop_token_ids or [] if t >= vocab_size), None)
    if bad is not None:
        raise bad_request(
            f"stop_token_ids: token id {bad} is out of range (vocabulary size {vocab_size})", "stop_token_ids"
        )


def sampling_kwargs(req: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> dict[str, Any]:
    """Keyword arguments of SamplingParams for one choice (the seed is set per choice)."""
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    # top_p 0 means "only the most likely token"; a vanishing temperature would overflow the logits.
    if top_p == 0.0 or temperature < _MIN_TEMPERATURE:
        temperature, top_p = 0.0, 1.0
    if isinstance(req, ChatCompletionRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    stop = req.stop
    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": -1 if req.top_k in (None, 0) else req.top_k,
        "min_p": req.min_p or 0.0,
        "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "stop": [stop] if isinstance(stop, str) else (list(stop) if stop else None),
        "stop_token_ids": list(req.stop_token_ids) if req.stop_token_ids else None,
        "ignore_eos": bool(req.ignore_eos),
        "logprobs": logprobs,
    }
    return kwargs


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of the `choice`-th sample: derived from the request's seed so a repeated request repeats."""
    if seed is None:
        return None
    return (seed + choice) % _SEED_MODULUS


def build_jobs(
    request_id: str,
    prompts: list[Prompt],
    n: int,
    kwargs_per_prompt: list[dict[str, Any]],
    seed: int | None,
    sampling_params_cls: Any,
) -> list[SequenceJob]:
    """n jobs per prompt; choice index = prompt_index * n + i, engine ids `{request_id}-{index}`."""
    jobs = []
    for p_index, (prompt, kwargs) in enumerate(zip(prompts, kwargs_per_prompt, strict=True)):
        for i in range(n):
            index = p_index * n + i
            try:
                params = sampling_params_cls(**kwargs, seed=choice_seed(seed, i))
            except (ValueError, TypeError) as exc:
                raise bad_request(str(exc), _param_of(str(exc))) from None
            jobs.append(SequenceJob(index, f"{request_id}-{index}", prompt.token_ids, params, p_index))
    return jobs


def _param_of(message: str) -> str | None:
    head = message.split(":", 1)[0].strip()
    return head if head.isidentifier() else None
