"""Run the gateway under uvicorn: HTTPS when cne.yaml names a certificate and key, draining on SIGTERM."""

from __future__ import annotations

import uvicorn
from deepseek_core.serving.server import DrainingServer

from .app import create_gateway_app
from .config import GatewayConfig


def build_server(config: GatewayConfig, log_level: str = "info", access_log: bool = False) -> DrainingServer:
    """A uvicorn server for the gateway app (core's DrainingServer: SIGTERM drains, then exits 0)."""
    app = create_gateway_app(config, log_level=log_level)
    ssl: dict[str, str] = {}
    if config.tls is not None:
        ssl = {"ssl_certfile": str(config.tls.cert), "ssl_keyfile": str(config.tls.key)}
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=int(config.drain_timeout_s),
        timeout_keep_alive=30,
        backlog=4096,
        lifespan="on",
        **ssl,  # type: ignore[arg-type]
    )
    return DrainingServer(uv_config, app_state=app.state)


def run_gateway(config: GatewayConfig, log_level: str = "info", access_log: bool = False) -> None:
    """Serve until SIGTERM/SIGINT; returns after draining in-flight requests and stopping the workers."""
    build_server(config, log_level, access_log).run()
