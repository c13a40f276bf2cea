"""Runs the server: REST (uvicorn + httptools) and gRPC (grpc.aio) on one event loop, models loaded after the
listeners are up (so liveness answers while readiness is false), graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from mpack.serving.config import ServeConfig
from mpack.serving.engine import Engine, Health
from mpack.serving.errors import ServeConfigError
from mpack.serving.model import RunnerFactory

log = logging.getLogger("mpack.serving")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus the record's ``fields`` (``extra={"fields": {...}}``)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
                "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if fields:
            data.update(fields)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup_logging(stream=None, level: int = logging.INFO) -> None:
    """Structured logs of the ``mpack.serving`` loggers (server events and access lines) to stderr. Idempotent."""
    logger = logging.getLogger("mpack.serving")
    if any(getattr(h, "_mpack_serving", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JsonLogFormatter())
    handler._mpack_serving = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (a test runner may swap it and close the old)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@dataclass(frozen=True)
class ServerInfo:
    host: str
    http_port: int
    grpc_port: int | None
    engine: Engine


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # N.B. proto IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when their proto says TCP; with
    # the default 0, keep-alive responses (headers and body are two writes) stalled 40 ms on delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeConfigError("--http-port", port, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def run_server(config: ServeConfig, *, runner_factory: RunnerFactory | None = None,
                     on_listening: Callable[[ServerInfo], None] | None = None,
                     on_ready: Callable[[ServerInfo], None] | None = None,
                     stop: asyncio.Event | None = None, handle_signals: bool = True) -> int:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives, then drain. Returns the exit code (0).

    Args:
        config: The server configuration.
        runner_factory: See :class:`Engine`. Defaults to ONNX Runtime sessions.
        on_listening: Called once both listeners are up (ports known), before the models load.
        on_ready: Called once every model is loaded and warmed up.
        stop: Set it to start the drain. Defaults to a private event.
        handle_signals: Install SIGTERM/SIGINT handlers (main thread only). Defaults to True.

    Raises:
        ServeConfigError: a port is taken or a model cannot be loaded.
    """
    import uvicorn

    from mpack.serving.http_api import make_app

    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    engine = Engine(config, runner_factory)
    jobs = None
    if config.queue is not None:
        from mpack.serving.job_api import JobService

        jobs = JobService(config, engine)
    sock = _bind(config.host, config.http_port)
    http_port = sock.getsockname()[1]
    uv_config = uvicorn.Config(
        make_app(engine, max_request_bytes=config.max_request_bytes, access_log=config.access_log, jobs=jobs),
        http="httptools" if _has("httptools") else "auto", lifespan="off", access_log=False, log_config=None,
        log_level="warning", timeout_graceful_shutdown=max(1, int(config.drain_timeout_s)) or None,
        server_header=False, proxy_headers=False,  # no X-Forwarded-* rewriting: one middleware less per request
        limit_concurrency=config.concurrency_limit)  # connections + requests in flight; past it: 503
    http_server = _uvicorn_server(uv_config)
    grpc_server, grpc_port = None, None
    if config.grpc_port is not None:
        from mpack.serving.grpc_api import make_grpc_server

        grpc_server = make_grpc_server(engine, max_request_bytes=config.max_request_bytes,
                                       max_concurrent_rpcs=config.concurrency_limit)
        address = f"[{config.host}]:{config.grpc_port}" if ":" in config.host else f"{config.host}:{config.grpc_port}"
        try:
            grpc_port = grpc_server.add_insecure_port(address)
        except RuntimeError:  # newer grpcio raises where older ones returned 0
            grpc_port = 0
        if not grpc_port:
            sock.close()
            raise ServeConfigError("--grpc-port", config.grpc_port, f"cannot listen on {address}",
                                   hint="the port is taken; choose another or 0 for a free one")
        await grpc_server.start()
    http_task = loop.create_task(http_server.serve(sockets=[sock]))
    while not http_server.started and not http_task.done():
        await asyncio.sleep(0.005)
    if http_task.done():
        http_task.result()  # re-raise uvicorn's start-up failure
    info = ServerInfo(config.host, http_port, grpc_port, engine)
    if handle_signals and threading.current_thread() is threading.main_thread():
        def on_signal(sig: int) -> None:
            if stop.is_set():  # a second signal: stop waiting for in-flight requests
                http_server.force_exit = True
            log.info("signal received", extra={"fields": {"signal": signal.Signals(sig).name}})
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
    log.info("listening", extra={"fields": {"host": config.host, "http_port": http_port, "grpc_port": grpc_port,
                                            "pid": _pid()}})
    if on_listening is not None:
        on_listening(info)
    if jobs is not None:
        jobs.start()

    failure: ServeConfigError | None = None
    load = loop.create_task(engine.load())
    await asyncio.wait([load, loop.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if load.done():
        failure = load.exception()  # type: ignore[assignment]
    else:  # stopped while loading
        load.cancel()
    if failure is None and not stop.is_set():
        # Everything allocated so far (sessions, modules) lives until exit: freezing it keeps the collector from
        # walking it on every request (measured in serving-notes.md as part of the plain-ASGI figure).
        gc.collect()
        gc.freeze()
        log.info("ready", extra={"fields": {"models": {n: list(m.versions) for n, m in engine.models.items()}}})
        if on_ready is not None:
            on_ready(info)
        await stop.wait()
    else:
        log.error("failed", extra={"fields": {"error": str(failure)}})

    # Drain: report not-ready, optionally keep serving a moment for load balancers to notice, then close the
    # listeners and let in-flight requests (and the queues behind them) finish within drain_timeout_s.
    started = time.perf_counter()
    if engine.state is not Health.FAILED:
        engine.state = Health.DRAINING
        log.info("draining", extra={"fields": {"timeout_s": config.drain_timeout_s}})
        if config.drain_delay_s:
            await asyncio.sleep(config.drain_delay_s)
    http_server.should_exit = True
    stops = [http_task]
    if grpc_server is not None:
        stops.append(loop.create_task(grpc_server.stop(grace=config.drain_timeout_s)))
    await asyncio.gather(*stops, return_exceptions=True)
    await engine.drain(config.drain_timeout_s)
    if jobs is not None:  # queued jobs stay in Redis for the workers; only callbacks in flight are waited for
        await jobs.close(config.drain_timeout_s)
    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped", extra={"fields": {"drain_s": round(time.perf_counter() - started, 3)}})
    gc.unfreeze()
    if failure is not None:
        raise failure
    return 0


def serve(config: ServeConfig, *, runner_factory: RunnerFactory | None = None) -> int:
    """Run the server in this thread until SIGTERM/SIGINT; returns the exit code.

    Raises:
        ServeConfigError: a port is taken or a model cannot be loaded.
    """
    setup_logging()
    return asyncio.run(run_server(config, runner_factory=runner_factory))


class ServerThread:
    """The server in a background thread, for tests, benchmarks and notebooks::

        with ServerThread(config) as server:
            requests.get(f"{server.http_url}/v2/health/ready")
    """

    def __init__(self, config: ServeConfig, runner_factory: RunnerFactory | None = None) -> None:
        self.config = config
        self.runner_factory = runner_factory
        self.info: ServerInfo | None = None
        self.error: BaseException | None = None
        self._listening = threading.Event()
        self._ready = threading.Event()
        self._done = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="mpack-serve", daemon=True)

    @property
    def engine(self) -> Engine:
        assert self.info is not None
        return self.info.engine

    @property
    def http_url(self) -> str:
        assert self.info is not None
        return f"http://{self.info.host}:{self.info.http_port}"

    @property
    def http_address(self) -> str:
        assert self.info is not None
        return f"{self.info.host}:{self.info.http_port}"

    @property
    def grpc_address(self) -> str:
        assert self.info is not None
        return f"{self.info.host}:{self.info.grpc_port}"

    def start(self, wait_ready: bool = True, timeout: float = 60) -> "ServerThread":
        self._thread.start()
        target = self._ready if wait_ready else self._listening
        deadline = time.monotonic() + timeout
        while not target.is_set() and not self._done.is_set() and time.monotonic() < deadline:
            target.wait(0.01)
        if self.error is not None:
            raise self.error
        if not target.is_set():
            raise TimeoutError("the server did not start in time")
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        if not self._ready.wait(timeout):
            raise self.error or TimeoutError("the server did not become ready in time")

    def stop(self, timeout: float = 30) -> None:
        if self._loop is not None and self._stop is not None and not self._done.is_set():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await run_server(self.config, runner_factory=self.runner_factory, stop=self._stop, handle_signals=False,
                             on_listening=self._on_listening, on_ready=lambda info: self._ready.set())

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that called start()
            self.error = exc
        finally:
            self._done.set()

    def _on_listening(self, info: ServerInfo) -> None:
        self.info = info
        self._listening.set()


def _uvicorn_server(config):
    """A uvicorn.Server without its own signal handling: mpack's handler drains first (not-ready, queues empty),
    and uvicorn's would re-raise the signal after shutting down, turning a clean drain into a death by SIGTERM."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server(config)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _pid() -> int:
    import os

    return os.getpid()
