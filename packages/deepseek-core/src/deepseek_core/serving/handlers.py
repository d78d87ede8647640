"""POST /v1/completions and /v1/chat/completions: validate, submit to the engine, answer or stream."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .audit import AuditRecord
from .context import ServingContext
from .engine_client import SequenceRunner, SequenceState
from .errors import OpenAIError, error_body
from .formatting import SSE_DONE, chat_logprobs, completion_logprobs, sse, usage
from .protocol import ChatCompletionRequest, CompletionRequest
from .requests import (
    Prompt,
    build_jobs,
    chat_prompt,
    check_context,
    check_token_ids,
    check_unsupported,
    completion_prompts,
    sampling_kwargs,
)
from .streaming import SSEResponse, run_unless_disconnected

log = logging.getLogger(__name__)

AUDIT_SCOPE_KEY = "deepseek.audit"
CLIENT_CLOSED_REQUEST = 499  # nginx's code for "the client went away before the answer"


def audit_record(request: Request) -> AuditRecord:
    """The request's audit record (created by the API guard middleware; a throwaway one otherwise)."""
    record = request.scope.get(AUDIT_SCOPE_KEY)
    if record is None:
        record = AuditRecord(endpoint=request.url.path)
        request.scope[AUDIT_SCOPE_KEY] = record
    return record


class _Call:
    """One admitted HTTP request: its sequences, bookkeeping, and release of its reservation."""

    def __init__(
        self,
        ctx: ServingContext,
        record: AuditRecord,
        runner: SequenceRunner,
        prompts: list[Prompt],
        arrival: float,
    ) -> None:
        self.ctx = ctx
        self.record = record
        self.runner = runner
        self.prompts = prompts
        self.arrival = arrival
        self._released = False

    def finish(self, disconnected: bool = False) -> None:
        """Record counts and latency, abort leftovers, release the admission (idempotent)."""
        if self._released:
            return
        self._released = True
        self.runner.abort_unfinished()
        states = self.runner.states
        self.record.completion_tokens = sum(len(s.token_ids) for s in states)
        self.record.finish_reasons = [s.finish_reason or "abort" for s in states]
        if disconnected:
            self.record.client_disconnected = True
        elif all(s.finish_reason != "abort" for s in states):
            self.ctx.metrics.e2e_latency.observe(time.perf_counter() - self.arrival)
        if self.ctx.audit is not None and self.ctx.audit.include_text:
            self.record.completion_text = [s.text for s in states]
        self.ctx.release(len(states))


def _admit(
    ctx: ServingContext,
    record: AuditRecord,
    request_id: str,
    prompts: list[Prompt],
    n: int,
    kwargs: list[dict[str, Any]],
    seed: int | None,
    arrival: float,
) -> _Call:
    jobs = build_jobs(request_id, prompts, n, kwargs, seed, ctx.sampling_params_cls)
    ctx.admit(len(jobs))
    record.prompt_tokens = sum(len(p.token_ids) for p in prompts)
    if ctx.audit is not None and ctx.audit.include_text:
        record.prompt_text = [p.text for p in prompts] if len(prompts) > 1 else prompts[0].text
    return _Call(ctx, record, SequenceRunner(ctx.engine, jobs, ctx.metrics, arrival), prompts, arrival)


async def _collect(call: _Call) -> list[SequenceState]:
    async with aclosing(call.runner.stream()) as stream:
        async for _ in stream:
            pass
    return call.runner.states


async def _answer(
    request: Request, call: _Call, build: Callable[[list[SequenceState]], dict[str, Any]], request_id: str
) -> Response:
    """Run to completion (aborting if the client leaves) and return the JSON body."""
    try:
        disconnected, states = await run_unless_disconnected(request, _collect(call))
    except BaseException:
        call.finish()
        raise
    call.finish(disconnected)
    if disconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(build(states), headers={"X-Request-Id": request_id})


def _stream(call: _Call, chunks: AsyncGenerator[bytes, None], request_id: str) -> SSEResponse:
    return SSEResponse(
        chunks, on_close=lambda disconnected: call.finish(disconnected), headers={"X-Request-Id": request_id}
    )


def _stream_error(call: _Call, exc: Exception) -> bytes:
    """The error event that ends a stream whose headers (200) were already sent (counted as its error code)."""
    if isinstance(exc, OpenAIError):
        call.record.error = exc.message
        call.ctx.metrics.error(exc.status_code)
        return sse(exc.body())
    call.ctx.metrics.error(500)
    log.exception("request %s failed while streaming", call.record.request_id)
    call.record.error = f"{type(exc).__name__}: {exc}"
    return sse(error_body(500, f"generation failed: {type(exc).__name__}", code="internal_error"))


def _chunk_builder(
    request_id: str, object_name: str, created: int, model: str, include_usage: bool
) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """A streaming chunk's body around `choices` (with `usage: null` when the client asked for usage)."""

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": request_id,
            "object": object_name,
            "created": created,
            "model": model,
            "choices": choices,
            "system_fingerprint": None,
        }
        if include_usage:
            body["usage"] = None
        return body

    return chunk


def _usage_chunk(
    chunk: Callable[[list[dict[str, Any]]], dict[str, Any]], prompt_tokens: int, states: list[SequenceState]
) -> bytes:
    """The final chunk of a stream whose client asked for usage: no choices, the request's token counts."""
    final = chunk([])
    final["usage"] = usage(prompt_tokens, sum(len(s.token_ids) for s in states))
    return sse(final)


# ---------------------------------------------------------------------------------------------- completions
async def create_completion(ctx: ServingContext, req: CompletionRequest, request: Request) -> Response:
    """POST /v1/completions."""
    arrival = time.perf_counter()
    record = audit_record(request)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    record.request_id, record.model, record.stream = request_id, req.model, bool(req.stream)
    ctx.check_model(req.model)
    check_unsupported(req)
    check_token_ids(req, ctx.vocab_size)
    n = req.n or 1
    record.n = n
    prompts = completion_prompts(req, ctx.tokenizer, ctx.vocab_size)
    kwargs = [
        sampling_kwargs(
            req,
            check_context(
                len(p.token_ids),
                req.max_tokens,
                ctx.max_model_len,
                "prompt" if len(prompts) == 1 else f"prompt[{i}]",
            ),
        )
        for i, p in enumerate(prompts)
    ]
    call = _admit(ctx, record, request_id, prompts, n, kwargs, req.seed, arrival)
    created = int(time.time())
    echo_texts = [
        (p.text if p.text is not None else ctx.tokenizer.decode(p.token_ids)) if req.echo else ""
        for p in prompts
    ]

    def logprobs_of(state: SequenceState, entries: list[Any], offset: int) -> dict[str, Any] | None:
        if req.logprobs is None:
            return None
        return completion_logprobs(entries, ctx.token_text, offset)

    if not req.stream:

        def build(states: list[SequenceState]) -> dict[str, Any]:
            choices = []
            for s in states:
                prefix = echo_texts[s.job.prompt_index]
                choices.append(
                    {
                        "index": s.job.index,
                        "text": prefix + s.text,
                        "logprobs": logprobs_of(s, s.logprobs, len(prefix)),
                        "finish_reason": s.finish_reason,
                    }
                )
            return {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": req.model,
                "choices": choices,
                "system_fingerprint": None,
                "usage": usage(record.prompt_tokens, sum(len(s.token_ids) for s in states)),
            }

        return await _answer(request, call, build, request_id)

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunk = _chunk_builder(request_id, "text_completion", created, req.model, include_usage)

    async def chunks() -> AsyncGenerator[bytes, None]:
        try:
            if req.echo:
                for state in call.runner.states:
                    prefix = echo_texts[state.job.prompt_index]
                    yield sse(
                        chunk(
                            [
                                {
                                    "index": state.job.index,
                                    "text": prefix,
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    )
            async with aclosing(call.runner.stream()) as stream:
                async for state, out in stream:
                    text = out.text_delta or ""
                    entries = list(out.logprobs_delta or [])
                    if not text and not entries and not state.finished:
                        continue
                    offset = len(echo_texts[state.job.prompt_index]) + len(state.text) - len(text)
                    yield sse(
                        chunk(
                            [
                                {
                                    "index": state.job.index,
                                    "text": text,
                                    "logprobs": logprobs_of(state, entries, offset) if entries else None,
                                    "finish_reason": state.finish_reason if state.finished else None,
                                }
                            ]
                        )
                    )
            if include_usage:
                yield _usage_chunk(chunk, record.prompt_tokens, call.runner.states)
        except Exception as exc:
            yield _stream_error(call, exc)
        yield SSE_DONE

    return _stream(call, chunks(), request_id)


# ---------------------------------------------------------------------------------------------- chat
async def create_chat_completion(
    ctx: ServingContext, req: ChatCompletionRequest, request: Request
) -> Response:
    """POST /v1/chat/completions."""
    arrival = time.perf_counter()
    record = audit_record(request)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    record.request_id, record.model, record.stream = request_id, req.model, bool(req.stream)
    ctx.check_model(req.model)
    check_unsupported(req)
    check_token_ids(req, ctx.vocab_size)
    n = req.n or 1
    record.n = n
    prompt = chat_prompt(req, ctx.tokenizer)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = check_context(len(prompt.token_ids), requested, ctx.max_model_len, "messages")
    call = _admit(ctx, record, request_id, [prompt], n, [sampling_kwargs(req, max_tokens)], req.seed, arrival)
    created = int(time.time())
    want_logprobs = bool(req.logprobs)

    if not req.stream:

        def build(states: list[SequenceState]) -> dict[str, Any]:
            choices = [
                {
                    "index": s.job.index,
                    "message": {"role": "assistant", "content": s.text},
                    "logprobs": chat_logprobs(s.logprobs, ctx.token_text) if want_logprobs else None,
                    "finish_reason": s.finish_reason,
                }
                for s in states
            ]
            return {
                "id": request_id,
                "object": "chat.completion",
                "created": created,
                "model": req.model,
                "choices": choices,
                "system_fingerprint": None,
                "usage": usage(record.prompt_tokens, sum(len(s.token_ids) for s in states)),
            }

        return await _answer(request, call, build, request_id)

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunk = _chunk_builder(request_id, "chat.completion.chunk", created, req.model, include_usage)

    async def chunks() -> AsyncGenerator[bytes, None]:
        try:
            for state in call.runner.states:  # the role comes first, as OpenAI sends it
                yield sse(
                    chunk(
                        [
                            {
                                "index": state.job.index,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                )
            async with aclosing(call.runner.stream()) as stream:
                async for state, out in stream:
                    text = out.text_delta or ""
                    entries = list(out.logprobs_delta or [])
                    if not text and not entries and not state.finished:
                        continue
                    yield sse(
                        chunk(
                            [
                                {
                                    "index": state.job.index,
                                    "delta": {"content": text} if text else {},
                                    "logprobs": chat_logprobs(entries, ctx.token_text)
                                    if want_logprobs and entries
                                    else None,
                                    "finish_reason": state.finish_reason if state.finished else None,
                                }
                            ]
                        )
                    )
            if include_usage:
                yield _usage_chunk(chunk, record.prompt_tokens, call.runner.states)
        except Exception as exc:
            yield _stream_error(call, exc)
        yield SSE_DONE

    return _stream(call, chunks(), request_id)
