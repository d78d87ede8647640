"""create_gateway_app(config): the multi-tenant, multi-model OpenAI-compatible gateway (FastAPI).

Per request: authenticate the tenant by its key (401) -> find the model among the tenant's own (404 as if
it did not exist) -> validate the body with core's request schemas (400) -> rate limits (429 + Retry-After)
-> fair queue for the model's capacity (deepseek_cne.gateway.scheduler) -> load the model if it is cold
(deepseek_cne.gateway.models) -> forward to its worker, which runs deepseek-core's app -> relay the answer,
accounting for tokens, time to first token and the audit line.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from deepseek_core.serving.app import install_error_handlers
from deepseek_core.serving.audit import AuditLog, AuditRecord
from deepseek_core.serving.auth import bearer_token, key_id
from deepseek_core.serving.context import draining_error
from deepseek_core.serving.errors import OpenAIError, bad_request, validation_error_to_openai
from deepseek_core.serving.handlers import AUDIT_SCOPE_KEY, CLIENT_CLOSED_REQUEST, audit_record
from deepseek_core.serving.protocol import ChatCompletionRequest, CompletionRequest
from deepseek_core.serving.streaming import SSEResponse, run_unless_disconnected
from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import GatewayConfig, TenantSpec
from .limits import RateLimiter
from .metrics import CONTENT_TYPE, GatewayMetrics
from .models import ModelManager
from .pool import Worker, WorkerPool
from .proxy import Exchange, Services, SSEFilter, relay
from .scheduler import FairScheduler
from .tenancy import TenantDirectory, UsageBook, model_not_found

log = logging.getLogger(__name__)

TENANT_SCOPE_KEY = "deepseek.tenant"
_RUNTIME_PREFIX = "deepseek-cne-"
_PASSED_HEADERS = ("content-type", "x-request-id", "retry-after")


@dataclass
class GatewayState:
    """Everything the routes share; `draining` and `inflight_seqs` are what core's DrainingServer reads."""

    config: GatewayConfig
    tenants: TenantDirectory
    services: Services
    pool: WorkerPool
    audit: AuditLog | None
    draining: bool = False
    ready: bool = False
    inflight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    _idle: asyncio.Event | None = None

    @property
    def inflight_seqs(self) -> int:
        """Requests in flight (named as core's ServingContext, for the draining server's log)."""
        return self.inflight

    def enter(self) -> None:
        """A request starts."""
        self.inflight += 1

    def leave(self) -> None:
        """A request ends."""
        self.inflight = max(0, self.inflight - 1)
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests; wait until none is in flight (or `timeout`). True when drained."""
        self.draining = True
        if self.inflight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


# ---------------------------------------------------------------------------------------------- guard
class GatewayGuard:
    """ASGI middleware: refuses while draining, authenticates tenants (/v1) or admins (/admin, /metrics),
    counts every answer per tenant, and writes core's audit line once the response is complete."""

    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith(("/v1/", "/admin/")) or path == "/metrics"):
            await self.app(scope, receive, send)
            return
        st = self.state
        started, t0 = time.time(), time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        authorization = headers.get("authorization")
        record = AuditRecord(endpoint=path, key_id=key_id(bearer_token(authorization)))
        scope[AUDIT_SCOPE_KEY] = record
        tenant: TenantSpec | None = None
        status = 0

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        st.enter()
        try:
            try:
                if st.draining:
                    raise draining_error()
                if path.startswith("/v1/"):
                    tenant = st.tenants.authenticate(authorization)
                    scope[TENANT_SCOPE_KEY] = tenant
                    record.tenant = tenant.name
                elif not (path == "/metrics" and st.config.metrics_public):
                    st.tenants.authenticate_admin(authorization)
            except OpenAIError as refusal:
                record.error = refusal.message
                await refusal.response()(scope, receive, send_and_watch)
                return
            await self.app(scope, receive, send_and_watch)
        finally:
            st.leave()
            if record.client_disconnected and status in (0, 200):
                status = CLIENT_CLOSED_REQUEST if status == 0 else status
            final = status or 500
            if path.startswith("/v1/"):
                model = record.model if record.model in st.config.models else "-"
                tenant_name = tenant.name if tenant is not None else "-"
                metrics = st.services.metrics
                metrics.requests.labels(tenant_name, model, str(final)).inc()
                if final >= 400 and final != CLIENT_CLOSED_REQUEST:
                    metrics.errors.labels(tenant_name, model, str(final)).inc()
                if st.audit is not None:
                    try:
                        st.audit.write(record, final, time.perf_counter() - t0, started)
                    except Exception:  # the audit log must never break serving
                        log.exception("cannot write the audit log")


# ---------------------------------------------------------------------------------------------- requests
def _parse_body(
    raw: bytes, schema: type[BaseModel], tenant: TenantSpec, tenants: TenantDirectory
) -> tuple[dict[str, Any], Any]:
    """The JSON body and its validated request; the model is checked before the schema (404 first)."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("request body: must be a JSON object", None)
    model = data.get("model")
    if isinstance(model, str) and model:
        tenants.resolve(tenant, model)
    try:
        return data, schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error_to_openai(list(exc.errors())) from None


def _sequences(req: Any) -> int:
    """Engine sequences a request runs: n per prompt."""
    prompts = 1
    raw = req.prompt if isinstance(req, CompletionRequest) else None
    if isinstance(raw, list) and raw and not all(isinstance(x, int) for x in raw):
        prompts = len(raw)  # a list of prompts (strings or token-id lists), not one prompt of token ids
    return prompts * (req.n or 1)


async def forward_generation(state: GatewayState, request: Request, chat: bool) -> Response:
    """POST /v1/completions or /v1/chat/completions through the tenant's limits to the model's worker."""
    arrival = time.perf_counter()
    tenant: TenantSpec = request.scope[TENANT_SCOPE_KEY]
    record = audit_record(request)
    services = state.services
    schema: type[BaseModel] = ChatCompletionRequest if chat else CompletionRequest
    data, req = _parse_body(await request.body(), schema, tenant, state.tenants)
    model = state.tenants.resolve(tenant, req.model)
    record.model, record.stream, record.n = model, bool(req.stream), req.n or 1
    try:
        services.limiter.check(tenant.name)
    except OpenAIError:
        services.metrics.rate_limited.labels(tenant.name, "rate").inc()
        raise
    strip_usage = bool(req.stream) and not (req.stream_options and req.stream_options.include_usage)
    if strip_usage:
        data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
    body = json.dumps(data).encode("utf-8")
    exchange = Exchange(services, tenant.name, model, arrival, record)

    async def admit_and_send() -> tuple[Worker, httpx.Response]:
        try:
            exchange.ticket = await services.scheduler.acquire(tenant.name, model, _sequences(req))
        except OpenAIError:
            services.metrics.rate_limited.labels(tenant.name, "queue").inc()
            raise
        services.metrics.queue_time.labels(tenant.name, model).observe(exchange.ticket.queue_time)
        worker = await services.models.acquire(model)
        exchange.holds_model = True
        upstream = worker.client.build_request(
            "POST", request.url.path, content=body, headers={"content-type": "application/json"}
        )
        try:
            return worker, await worker.client.send(upstream, stream=True)
        except httpx.TransportError as exc:
            log.error("model %s: worker %d failed: %s", model, worker.pid, exc)
            services.models.worker_failed(model, worker)
            raise OpenAIError(
                503,
                f"model {model!r} is unavailable (its worker failed); retry",
                code="model_unavailable",
                headers={"Retry-After": "1"},
            ) from None

    try:
        disconnected, sent = await run_unless_disconnected(request, admit_and_send())
    except BaseException:
        exchange.finish(ok=False)
        raise
    if disconnected:
        exchange.finish(ok=False, disconnected=True)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    worker, response = sent
    record.request_id = response.headers.get("x-request-id")
    headers = {k: v for k, v in response.headers.items() if k.lower() in _PASSED_HEADERS}
    is_stream = response.headers.get("content-type", "").startswith("text/event-stream")
    if response.status_code != 200 or not is_stream:
        try:
            content = await response.aread()
        except httpx.TransportError as exc:
            services.models.worker_failed(model, worker)
            exchange.finish(ok=False)
            raise OpenAIError(
                502, f"the model worker failed ({type(exc).__name__})", code="upstream_error"
            ) from None
        finally:
            await response.aclose()
        ok = response.status_code == 200
        if ok:
            with contextlib.suppress(ValueError):
                parsed = json.loads(content)
                exchange.note_usage(parsed.get("usage"))
                for choice in parsed.get("choices") or []:
                    if isinstance(choice, dict) and choice.get("finish_reason"):
                        exchange.finish_reasons.append(str(choice["finish_reason"]))
        else:
            with contextlib.suppress(ValueError, AttributeError):
                record.error = str(json.loads(content)["error"]["message"])
        exchange.finish(ok=ok)
        return Response(content, status_code=response.status_code, headers=headers)

    sse_filter = SSEFilter(exchange, chat, strip_usage)

    def closed(client_left: bool) -> None:
        exchange.finish(ok=record.error is None, disconnected=client_left)

    chunks = relay(response, sse_filter, on_error=lambda: services.models.worker_failed(model, worker))
    return SSEResponse(
        chunks, on_close=closed, headers={k: v for k, v in headers.items() if k != "content-type"}
    )


# ---------------------------------------------------------------------------------------------- the app
def _model_card(state: GatewayState, tenant: TenantSpec, name: str) -> dict[str, Any]:
    spec = state.config.models[name]
    card: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "shared" if spec.shared else tenant.name,
    }
    length = state.services.models.slots[name].max_model_len
    if length is not None:
        card["max_model_len"] = length
    return card


def _refresh_gauges(state: GatewayState) -> None:
    services = state.services
    for tenant in state.config.tenants:
        for model in state.config.models:
            services.metrics.running.labels(tenant, model).set(services.scheduler.sequences(tenant, model))
            services.metrics.waiting.labels(tenant, model).set(services.scheduler.queued(tenant, model))
    services.metrics.warm_workers.set(len(state.pool.idle))


def _remove_stale_runtime_dirs() -> None:
    """Socket directories left by gateways that were killed (SIGKILL skips the cleanup)."""
    for directory in Path(tempfile.gettempdir()).glob(f"{_RUNTIME_PREFIX}*-*"):
        try:
            pid = int(directory.name[len(_RUNTIME_PREFIX) :].split("-", 1)[0])
            if directory.stat().st_uid != os.getuid() or _pid_exists(pid):
                continue
        except (ValueError, OSError):
            continue
        shutil.rmtree(directory, ignore_errors=True)


def _pid_exists(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 probes, sending nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_gateway_app(config: GatewayConfig, log_level: str = "warning") -> FastAPI:
    """The gateway app for `config`; workers start with the app (lifespan) and stop with it."""
    metrics = GatewayMetrics()
    _remove_stale_runtime_dirs()
    # 0700: only this user reaches the workers' sockets (the workers do not authenticate).
    runtime_dir = Path(tempfile.mkdtemp(prefix=f"{_RUNTIME_PREFIX}{os.getpid()}-"))
    pool = WorkerPool(
        config.warm_pool,
        runtime_dir,
        config.worker_threads,
        log_level=log_level,
        engine_priority=config.engine_priority,
    )
    capacities = {name: spec.max_num_seqs for name, spec in config.models.items()}
    services = Services(
        scheduler=FairScheduler(capacities, config.tenants),
        models=ModelManager(config.models, pool, metrics),
        limiter=RateLimiter(config.tenants),
        usage=UsageBook(),
        metrics=metrics,
    )
    audit = (
        AuditLog(config.audit_log, include_text=config.audit_log_include_text) if config.audit_log else None
    )
    state = GatewayState(config, TenantDirectory(config), services, pool, audit)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Everything imported so far (torch comes with deepseek_core) is permanent: without this, full
        # collections under load walk hundreds of thousands of objects and stall every stream for a while.
        gc.collect()
        gc.freeze()
        services.models.start()

        async def fill() -> None:
            try:
                await pool.wait_full()
                state.ready = True
                log.info("warm pool ready: %d workers", pool.size)
            except Exception:
                log.exception("the warm pool did not start")

        filling = asyncio.get_running_loop().create_task(fill())
        try:
            yield
        finally:
            filling.cancel()
            drained = await state.drain(config.drain_timeout_s)
            if not drained:
                log.warning("drain timeout: %d requests still in flight", state.inflight)
            await services.models.close()
            await pool.close()
            if audit is not None:
                audit.close()
            shutil.rmtree(runtime_dir, ignore_errors=True)

    app = FastAPI(title="DeepSeek CNE gateway (OpenAI-compatible)", lifespan=lifespan)
    app.state.ctx = state
    app.add_middleware(GatewayGuard, state=state)
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """Text completions on one of the tenant's models."""
        return await forward_generation(state, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """Chat completions on one of the tenant's models."""
        return await forward_generation(state, request, chat=True)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        """The tenant's private models and the shared models it may use."""
        tenant: TenantSpec = request.scope[TENANT_SCOPE_KEY]
        return {
            "object": "list",
            "data": [_model_card(state, tenant, m) for m in state.tenants.visible(tenant)],
        }

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
        """One of the tenant's models, or 404."""
        tenant: TenantSpec = request.scope[TENANT_SCOPE_KEY]
        audit_record(request).model = model_id
        return _model_card(state, tenant, state.tenants.resolve(tenant, model_id))

    @app.get("/v1/usage")
    async def usage(request: Request) -> dict[str, Any]:
        """The calling tenant's usage since the gateway started, and what is left of its limits."""
        tenant: TenantSpec = request.scope[TENANT_SCOPE_KEY]
        report = services.usage.report(tenant.name)
        remaining = services.limiter.remaining(tenant.name)
        report["limits"] = {
            "requests_per_minute": tenant.requests_per_minute,
            "tokens_per_minute": tenant.tokens_per_minute,
            "max_concurrent": tenant.max_concurrent,
            "remaining_requests": remaining["requests"],
            "remaining_tokens": remaining["tokens"],
            "running": services.scheduler.running(tenant.name),
            "queued": services.scheduler.queued(tenant.name),
        }
        return report

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: the warm pool is filled; 503 while starting or draining."""
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "starting", "pool": pool.status()}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        """Prometheus text exposition (per tenant and model); needs an admin key unless metrics_public."""
        _refresh_gauges(state)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/admin/status")
    async def admin_status() -> dict[str, Any]:
        """Models (state, worker pid, in flight, last load's timings), the warm pool and tenant queues."""
        return {
            "ready": state.ready,
            "models": services.models.status(),
            "pool": pool.status(),
            "tenants": {
                t: {"running": services.scheduler.running(t), "queued": services.scheduler.queued(t)}
                for t in config.tenants
            },
        }

    @app.post("/admin/models/{name:path}/unload")
    async def admin_unload(name: str) -> dict[str, Any]:
        """Unload a model now (when no request holds it)."""
        if name not in config.models:
            raise model_not_found(name)
        unloaded = await services.models.unload(name)
        return {"model": name, "unloaded": unloaded, "state": services.models.slots[name].state}

    return app
