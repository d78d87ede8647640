"""create_app(engine): the FastAPI application of the OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .audit import AuditLog, AuditRecord
from .auth import APIKeyChecker, bearer_token, key_id
from .context import ServingContext, draining_error
from .engine_client import Engine
from .errors import OpenAIError, error_body, validation_error_to_openai
from .handlers import AUDIT_SCOPE_KEY, create_chat_completion, create_completion
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
READY_CACHE_S = 1.0
READY_RECENT_S = 5.0


class APIGuard:
    """ASGI middleware for /v1/*: refuses while draining (503), checks the API key (401), counts errors and
    writes the audit line once the response is complete (streams included)."""

    def __init__(self, app: ASGIApp, ctx: ServingContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        started, t0 = time.time(), time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        record = AuditRecord(
            endpoint=scope["path"], key_id=key_id(bearer_token(headers.get("authorization")))
        )
        scope[AUDIT_SCOPE_KEY] = record
        status = 0

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            refusal: OpenAIError | None = None
            if self.ctx.draining:
                refusal = draining_error()
            else:
                try:
                    self.ctx.auth.check(headers.get("authorization"))
                except OpenAIError as exc:
                    refusal = exc
            if refusal is not None:
                record.error = refusal.message
                await refusal.response()(scope, receive, send_and_watch)
                return
            await self.app(scope, receive, send_and_watch)
        finally:
            if record.client_disconnected and status in (0, 200):
                status = 499 if status == 0 else status
            final = status or 500
            if final >= 400 and final != 499:
                self.ctx.metrics.error(final)
            if self.ctx.audit is not None:
                try:
                    self.ctx.audit.write(record, final, time.perf_counter() - t0, started)
                except Exception:  # the audit log must never break serving
                    log.exception("cannot write the audit log")


class _ReadyProbe:
    """Readiness: the engine loop runs and the model answers a one-token forward.

    Tokens generated in the last few seconds prove the forward works; otherwise the probe submits a one-token
    request itself. Successes are cached briefly against probe storms.
    """

    def __init__(self, engine: Engine, sampling_params_cls: Any, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.sampling_params_cls = sampling_params_cls
        self.metrics = metrics
        self._ok_until = 0.0
        self._forward_ok = False
        self._lock = asyncio.Lock()

    async def check(self) -> None:
        if time.monotonic() < self._ok_until:
            return
        async with self._lock:
            if time.monotonic() < self._ok_until:
                return
            check_health = getattr(self.engine, "check_health", None)
            if check_health is not None:
                await check_health()
            recent = time.perf_counter() - self.metrics.last_token_time < READY_RECENT_S
            if not (self._forward_ok and recent):
                await asyncio.wait_for(self._forward(), timeout=READY_TIMEOUT_S)
                self._forward_ok = True
            self._ok_until = time.monotonic() + READY_CACHE_S

    async def _forward(self) -> None:
        tokenizer = self.engine.tokenizer
        bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        params = self.sampling_params_cls(max_tokens=1, temperature=0.0, ignore_eos=True)
        produced = 0
        async for output in self.engine.generate(
            [bos if bos is not None else 0], params, request_id=f"ready-{time.monotonic_ns()}"
        ):
            produced = len(output.token_ids)
        if produced != 1:
            raise RuntimeError(f"readiness forward produced {produced} tokens, expected 1")


def create_app(
    engine: Engine,
    served_model_name: str | None = None,
    api_keys: Sequence[str] | None = None,
    max_waiting: int | None = None,
    drain_timeout: float = 30.0,
    audit_log: str | os.PathLike[str] | AuditLog | None = None,
    audit_log_include_text: bool = False,
    capacity: int | None = None,
    shutdown_engine: bool = False,
    retry_after_s: int = 1,
) -> FastAPI:
    """The OpenAI-compatible app over `engine` (an AsyncLLM, or anything with its interface).

    served_model_name: the `model` clients send (default: the engine's model name or "deepseek").
    api_keys: accepted bearer keys; none means no authentication.
    max_waiting: answer 429 when more sequences than this would wait for the engine (None: unbounded).
    drain_timeout: seconds the app waits for in-flight requests at shutdown.
    audit_log: a file (or an AuditLog) for one JSON line per request; texts only if audit_log_include_text.
    capacity: sequences the engine runs at once (default: the engine's max_num_seqs).
    shutdown_engine: call engine.shutdown() when the app shuts down.
    """
    from ..engine import SamplingParams

    if max_waiting is not None and max_waiting < 0:
        raise ValueError(f"max_waiting: must be >= 0, got {max_waiting}")
    if drain_timeout < 0:
        raise ValueError(f"drain_timeout: must be >= 0, got {drain_timeout}")
    name = served_model_name or str(getattr(engine, "model_name", None) or "deepseek")
    audit = (
        audit_log
        if isinstance(audit_log, AuditLog) or audit_log is None
        else AuditLog(audit_log, include_text=audit_log_include_text)
    )
    ctx = ServingContext(
        engine=engine,
        served_model_name=name,
        metrics=ServerMetrics(name),
        auth=APIKeyChecker(api_keys),
        sampling_params_cls=SamplingParams,
        max_model_len=int(engine.max_model_len),
        vocab_size=int(engine.config.vocab_size),
        max_waiting=max_waiting,
        capacity=capacity if capacity is not None else _engine_capacity(engine),
        drain_timeout=drain_timeout,
        audit=audit,
        retry_after_s=retry_after_s,
    )
    ctx.metrics.bind_engine_stats(engine.stats)
    probe = _ReadyProbe(engine, SamplingParams, ctx.metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start = getattr(engine, "start", None)
        if start is not None and asyncio.iscoroutinefunction(start):
            await start()
        try:
            yield
        finally:
            drained = await ctx.drain()
            if not drained:
                log.warning(
                    "drain timeout (%.1fs): %d sequences still in flight", drain_timeout, ctx.inflight_seqs
                )
            if shutdown_engine:
                result = engine.shutdown() if hasattr(engine, "shutdown") else None
                if asyncio.iscoroutine(result):
                    await result
            if audit is not None and not isinstance(audit_log, AuditLog):
                audit.close()

    app = FastAPI(title="DeepSeek OpenAI-compatible API", version=_version(), lifespan=lifespan)
    app.state.ctx = ctx
    app.add_middleware(APIGuard, ctx=ctx)
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completions (OpenAI's legacy endpoint); `stream` for server-sent events."""
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completions; `stream` for server-sent events."""
        return await create_chat_completion(ctx, body, request)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The served model."""
        return {"object": "list", "data": [_model_card(ctx)]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        """One model, or 404."""
        ctx.check_model(model_id)
        return _model_card(ctx)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: the model is loaded and a one-token forward succeeds; 503 while draining."""
        if ctx.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        try:
            await probe.check()
        except Exception as exc:
            log.warning("readiness check failed: %s", exc)
            return JSONResponse(
                {"status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"}, status_code=503
            )
        return JSONResponse({"status": "ready", "model": ctx.served_model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _model_card(ctx: ServingContext) -> dict[str, Any]:
    return {
        "id": ctx.served_model_name,
        "object": "model",
        "created": ctx.created,
        "owned_by": "deepseek",
        "max_model_len": ctx.max_model_len,
    }


def _engine_capacity(engine: Engine) -> int | None:
    """max_num_seqs of the engine's scheduler (AsyncLLM.engine.scheduler), when it can be found."""
    core = getattr(engine, "engine", None)
    for holder in (engine, core, getattr(engine, "scheduler", None), getattr(core, "scheduler", None)):
        value = getattr(holder, "max_num_seqs", None) if holder is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def install_error_handlers(app: FastAPI, ctx: ServingContext | None = None) -> None:
    """Answer every error in OpenAI's shape (also used by deepseek-cne's gateway); notes it on the audit record."""

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> Response:
        _note_error(request, exc.message)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        err = validation_error_to_openai(list(exc.errors()))
        _note_error(request, err.message)
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = str(exc.detail) if exc.detail else "error"
        if exc.status_code == 404:
            message = f"{request.url.path}: no such endpoint"
        elif exc.status_code == 405:
            message = f"{request.method} {request.url.path}: method not allowed"
        _note_error(request, message)
        return JSONResponse(
            error_body(exc.status_code, message),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        _note_error(request, f"{type(exc).__name__}: {exc}")
        return JSONResponse(
            error_body(500, f"internal error ({type(exc).__name__})", code="internal_error"), status_code=500
        )


def _note_error(request: Request, message: str) -> None:
    record = request.scope.get(AUDIT_SCOPE_KEY)
    if record is not None:
        record.error = message


def _version() -> str:
    from .. import __version__

    return __version__
