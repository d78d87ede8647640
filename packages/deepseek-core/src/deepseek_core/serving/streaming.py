"""Server-sent events that notice a client going away at once, even while no token is being sent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (call only after the request body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(Response):
    """Streams `chunks` as text/event-stream; on a client disconnect the generator is closed immediately.

    Closing the generator runs its `finally` blocks, which abort the engine requests and free their KV cache.
    `on_close(disconnected)` runs exactly once, whatever happened (even if the stream never started).
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        chunks: AsyncGenerator[bytes, None],
        on_close: Callable[[bool], None],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.chunks = chunks
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False

        async def pump() -> None:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pump_task = asyncio.create_task(pump())
        listen_task = asyncio.create_task(wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({pump_task, listen_task}, return_when=asyncio.FIRST_COMPLETED)
            if pump_task in done:
                error = pump_task.exception()
                if isinstance(error, OSError):  # the socket went away while we were writing
                    disconnected = True
                elif error is not None:
                    raise error
            else:
                disconnected = True
        finally:
            for task in (pump_task, listen_task):
                task.cancel()
            await asyncio.gather(pump_task, listen_task, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.chunks.aclose()
            self.on_close(disconnected)


async def run_unless_disconnected(request: Request, work: Any) -> tuple[bool, Any]:
    """Await coroutine `work` while watching for a disconnect; on one, cancel it. Returns (disconnected, result)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return False, task.result()
        return True, None
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
