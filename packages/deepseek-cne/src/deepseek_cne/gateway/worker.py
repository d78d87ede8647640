"""A model worker: a process the gateway starts ahead of time, which later serves ONE model.

    python -m deepseek_cne.gateway.worker --socket /run/deepseek/w1.sock --threads 4 --engine-priority idle

Started warm: it imports torch, the engine and the serving layer, runs a tiny model through the whole request
path once (so lazy initialisation is paid up front), then listens on a Unix socket. There it answers
`GET /_worker/health` and, once, `POST /_worker/load {"path", "name", "dtype", "kv_cache_bytes", ...}`: it
builds an AsyncLLM on the memory-mapped checkpoint and from then on serves deepseek-core's OpenAI-compatible
app (create_app) for that model on the same socket. A cold model therefore only maps its weights and
allocates its (small) KV cache.

The worker ignores SIGINT and SIGTERM: the gateway drains first and then stops it by closing its stdin. It
also exits when the gateway dies (stdin reaches end of file), so no worker outlives its gateway. Exiting is
how a model's memory goes back to the operating system.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger("deepseek_cne.worker")

LOAD_PATH = "/_worker/load"
HEALTH_PATH = "/_worker/health"


def _exit_when_stdin_closes() -> None:
    """Block until the gateway closes our stdin (or dies), then exit at once."""
    try:
        while sys.stdin.buffer.read(1):
            pass
    finally:
        os._exit(0)


def _warm_up() -> None:
    """Run a tiny random model through checkpoint loading, the engine and the HTTP app once."""
    import httpx
    from deepseek_core import ModelConfig, Transformer, save_model
    from deepseek_core.engine import AsyncLLM
    from deepseek_core.serving import create_app

    config = ModelConfig.from_preset(
        "deepseek-tiny",
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    with tempfile.TemporaryDirectory(prefix="deepseek-warmup-") as tmp:
        save_model(Transformer(config), tmp)
        engine = AsyncLLM(tmp, max_num_seqs=2, num_kv_blocks=4)
    app = create_app(engine, served_model_name="warm-up")

    async def requests() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
            for stream in (True, False):
                body = {"model": "warm-up", "prompt": [5, 6, 7], "max_tokens": 2, "stream": stream}
                response = await client.post("/v1/completions", json=body)
                response.raise_for_status()

    try:
        asyncio.run(requests())
    finally:
        engine.shutdown()


_MADV_WILLNEED = 3
_MADV_POPULATE_READ = 22  # Linux >= 5.14: map the pages now, without one fault per page


def prefault_weights(model: Any) -> None:
    """Map the memory-mapped weights' pages ahead of the first forward pass (which would fault them in one by one).

    Runs in a background thread right after a load: ctypes drops the GIL during madvise, so on a spare core the
    pages are mapped while the first request is being forwarded and computed, in the order the layers run.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import itertools
    import mmap

    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    seen: set[int] = set()
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or ptr in seen:
            continue
        seen.add(ptr)
        start = ptr - ptr % page
        if madvise(start, ptr + size - start, _MADV_POPULATE_READ) != 0:
            madvise(start, ptr + size - start, _MADV_WILLNEED)  # older kernels: at least read ahead


async def _send_json(send: Any, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


class WorkerApp:
    """ASGI app of a worker: health and load endpoints, then deepseek-core's app for the loaded model."""

    def __init__(self, engine_priority: str = "normal") -> None:
        self.engine_priority = engine_priority
        self.inner: Any = None
        self.model: str | None = None
        self._lifespan: contextlib.AbstractAsyncContextManager[Any] | None = None
        self._lock = asyncio.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._run_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == HEALTH_PATH:
            await _send_json(send, 200, {"status": "loaded" if self.inner else "idle", "model": self.model})
        elif path == LOAD_PATH and scope["method"] == "POST":
            await self._load(await _read_body(receive), send)
        elif self.inner is None:
            await _send_json(
                send, 503, {"error": {"message": "no model loaded", "type": "service_unavailable"}}
            )
        else:
            await self.inner(scope, receive, send)

    async def _run_lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._lifespan is not None:
                    with contextlib.suppress(Exception):
                        await self._lifespan.__aexit__(None, None, None)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _load(self, raw: bytes, send: Any) -> None:
        async with self._lock:
            if self.inner is not None:
                await _send_json(send, 409, {"error": f"this worker already serves {self.model!r}"})
                return
            try:
                options = json.loads(raw)
                info = await self._build(options)
            except Exception as exc:
                log.exception("cannot load the model")
                await _send_json(send, 500, {"error": f"{type(exc).__name__}: {exc}"})
                return
            await _send_json(send, 200, info)

    async def _build(self, options: dict[str, Any]) -> dict[str, Any]:
        from deepseek_core.engine import AsyncLLM
        from deepseek_core.serving import create_app

        t0 = time.perf_counter()
        engine = await asyncio.to_thread(
            AsyncLLM,
            options["path"],
            dtype=options.get("dtype"),
            max_num_seqs=int(options.get("max_num_seqs", 16)),
            max_num_batched_tokens=int(options.get("max_num_batched_tokens", 2048)),
            kv_cache_bytes=int(options["kv_cache_bytes"]) if options.get("kv_cache_bytes") else None,
            max_model_len=options.get("max_model_len"),
            step_priority=self.engine_priority,
        )
        t1 = time.perf_counter()
        threading.Thread(
            target=prefault_weights, args=(engine.engine.model,), name="prefault", daemon=True
        ).start()
        app = create_app(engine, served_model_name=options["name"], shutdown_engine=True, drain_timeout=5.0)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        self._lifespan, self.inner, self.model = lifespan, app, options["name"]
        t2 = time.perf_counter()
        log.info("loaded %s from %s in %.3f s", options["name"], options["path"], t2 - t0)
        return {
            "model": options["name"],
            "pid": os.getpid(),
            "engine_s": t1 - t0,
            "app_s": t2 - t1,
            "max_model_len": int(engine.max_model_len),
            "kv_cache_bytes": int(engine.engine.cache.total_bytes),
        }


@contextlib.contextmanager
def _no_signal_capture() -> Iterator[None]:
    yield


def main(argv: Sequence[str] | None = None) -> int:
    """Import, warm up, then serve the worker app on --socket until stdin closes."""
    parser = argparse.ArgumentParser(prog="deepseek_cne.gateway.worker")
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--engine-priority",
        choices=["normal", "idle"],
        default="normal",
        help="CPU priority of the model's stepping thread (idle: request handling always goes first)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_when_stdin_closes, name="stdin-watch", daemon=True).start()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(levelname)s worker[%(process)d] %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)

    import torch
    import uvicorn

    torch.set_num_threads(max(1, args.threads))
    # The engine steps in its own thread and holds the GIL between torch calls; a short switch interval lets the
    # event loop thread take new requests (and send tokens) between steps without waiting 5 ms each time.
    sys.setswitchinterval(float(os.environ.get("DEEPSEEK_WORKER_SWITCH_INTERVAL", "0.0005")))
    _warm_up()
    gc.collect()
    gc.freeze()  # everything imported so far is permanent: later collections skip it (shorter GC pauses)

    config = uvicorn.Config(
        WorkerApp(args.engine_priority),
        uds=args.socket,
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=300,
    )
    server = uvicorn.Server(config)
    server.capture_signals = _no_signal_capture  # type: ignore[method-assign]  # the gateway decides when we stop
    server.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
