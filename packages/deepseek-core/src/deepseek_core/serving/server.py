"""Run an app under uvicorn with draining: on SIGTERM stop accepting, finish in-flight requests, exit 0."""

from __future__ import annotations

import logging
import math
import signal
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that flags the app as draining on SIGTERM/SIGINT and treats SIGTERM as a clean exit.

    uvicorn then closes the listening sockets, lets in-flight requests (streams included) finish for up to
    `timeout_graceful_shutdown` seconds, and runs the app's lifespan shutdown. Plain uvicorn re-raises the
    signal after shutting down (exit status 143); a drained SIGTERM is a normal exit here (status 0).
    """

    def __init__(self, config: uvicorn.Config, app_state: Any = None) -> None:
        super().__init__(config)
        self.app_state = app_state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        ctx = getattr(self.app_state, "ctx", None)
        if ctx is not None and not ctx.draining:
            log.info(
                "signal %s: draining (%d sequences in flight)", signal.Signals(sig).name, ctx.inflight_seqs
            )
            ctx.draining = True
        if sig == signal.SIGTERM:
            if self.should_exit:
                self.force_exit = True  # a second SIGTERM: stop waiting
            self.should_exit = True
            return
        super().handle_exit(sig, frame)


def run_server(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_timeout: float = 30.0,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Serve `app` (from create_app) until SIGTERM/SIGINT; returns after a graceful drain."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=math.ceil(drain_timeout),
        timeout_keep_alive=5,
        backlog=4096,
        lifespan="on",
    )
    server = DrainingServer(config, app_state=getattr(app, "state", None))
    server.run()
