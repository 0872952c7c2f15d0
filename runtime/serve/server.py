"""The single-process server: the API (api.py) on one in-process engine, under uvicorn.

uvicorn's own SIGTERM handling is the drain: it stops accepting connections, lets the requests in flight
(streams included) finish, then the lifespan's shutdown stops the engine, and the process exits 0.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

from dualbrain.runtime.serve.api import ApiSettings, ModelInfo, build_app
from dualbrain.runtime.serve.service import EngineService, ServeConfig


def local_app(config: ServeConfig, settings: ApiSettings, name: str | None = None):
    """The app and its engine (loaded now, so a bad export fails before the server binds)."""
    from dualbrain.runtime.serve.metrics import PrometheusMetrics

    service = EngineService(config, PrometheusMetrics())
    info = ModelInfo.read(config.model_dir, name, solver=config.mode is not None)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    return build_app(service, info, settings, lifespan=lifespan), service


def run_local(config: ServeConfig, settings: ApiSettings, *, host: str, port: int, name: str | None = None) -> None:
    import signal
    import sys

    import uvicorn

    app, _ = local_app(config, settings, name)
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found: ignoring it there
    # makes a drained server exit 0 (the default handler would end the process with 143)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # the engine thread wants the GIL back after each ONNX Runtime call while the event loop serves the
    # streams: a shorter switch interval than Python's 5 ms keeps it from waiting a whole interval
    sys.setswitchinterval(0.0005)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
