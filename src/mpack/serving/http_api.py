"""The REST side: a plain ASGI app (no framework) for the V2 endpoints, /metrics and the admin endpoints.

Starlette and FastAPI were measured at 2.4x and 3.6x slower than a plain ASGI app on uvicorn + httptools here
(shared/reference/serving-notes.md), for routing a dozen fixed paths; so routing is a split of the path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Awaitable, Callable

from mpack.serving.engine import Engine
from mpack.serving.errors import (
    InvalidInputError, MethodNotAllowedError, ModelNotFoundError, PayloadTooLargeError, ServingError)
from mpack.serving.job_api import OFFLOAD_BYTES, disabled
from mpack.serving.protocol import decode_rest, encode_rest, error_body

log = logging.getLogger("mpack.serving")
access = logging.getLogger("mpack.serving.access")

JSON = b"application/json"
EXTENSIONS = ["binary_tensor_data", "model_configuration"]  # no "statistics": perf_analyzer would poll /stats

_JSON_BYTES_PER_BYTE = 4  # an output array's JSON text is a few times its nbytes (binary: about 1)
Send = Callable[[dict], Awaitable[None]]


class _ClientGone(Exception):
    pass


def server_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mpack")
    except metadata.PackageNotFoundError:
        return "unknown"


def make_app(engine: Engine, *, max_request_bytes: int, access_log: bool = True, jobs=None):
    """The ASGI app serving ``engine``.

    Args:
        engine: The loaded (or loading) engine.
        max_request_bytes: Larger bodies get 413 before they are read.
        access_log: One JSON line per request on the ``mpack.serving.access`` logger.
        jobs: The job endpoints' ``job_api.JobService``; None answers them 501 (no ``--queue``). Defaults to None.
    """
    server_metadata = json.dumps({"name": "mpack", "version": server_version(), "extensions": EXTENSIONS}).encode()
    http_counter = engine.metrics.http

    async def app(scope: dict, receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":  # models load outside the app; just acknowledge
                while True:
                    message = await receive()
                    kind = message["type"].rsplit(".", 1)[-1]
                    await send({"type": f"lifespan.{kind}.complete"})
                    if kind == "shutdown":
                        return
            return
        started = time.perf_counter()
        info: dict = {}
        status = 500
        try:
            status = await _route(scope, receive, send, info)
        except _ClientGone:
            status = 499
        except ServingError as exc:
            status = exc.http_status
            await _respond(send, status, error_body(_message(exc)))
        except Exception as exc:  # a bug: answer 500, log the traceback, keep serving
            log.exception("internal error", extra={"fields": {"path": scope.get("path")}})
            await _respond(send, 500, error_body(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            http_counter.inc((str(status),))
            if access_log:
                client = scope.get("client")
                access.info("request", extra={"fields": {
                    "method": scope["method"], "path": scope["path"], "status": status,
                    "ms": round((time.perf_counter() - started) * 1000, 3),
                    "client": f"{client[0]}:{client[1]}" if client else None, **info}})

    async def _route(scope: dict, receive, send: Send, info: dict) -> int:
        path: str = scope["path"]
        method: str = scope["method"]
        parts = path.strip("/").split("/")
        if parts[0] == "v2":
            parts = parts[1:]
            if not parts or parts == [""]:
                _method(method, "GET")
                return await _respond(send, 200, server_metadata)
            if parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
                _method(method, "GET")
                health = engine.health.value
                ok = engine.live if parts[1] == "live" else engine.ready
                body = json.dumps({parts[1]: ok, "state": health}).encode()
                return await _respond(send, 200 if ok else 503, body)
            if parts[0] == "models" and len(parts) >= 2:
                name, rest = parts[1], parts[2:]
                version = None
                if len(rest) >= 2 and rest[0] == "versions":
                    version, rest = rest[1], rest[2:]
                action = rest[0] if len(rest) == 1 else ("" if not rest else None)
                info["model"] = name
                if action == "infer":
                    _method(method, "POST")
                    return await _infer(scope, receive, send, name, version, info)
                if action == "jobs":
                    _method(method, "POST")
                    return await _submit_job(scope, receive, send, name, version, info)
                if action == "":
                    _method(method, "GET")
                    return await _respond(send, 200, json.dumps(engine.metadata(name, version)).encode())
                if action == "ready":
                    _method(method, "GET")
                    engine.find(name, version)  # 404 for unknown ones
                    ready = engine.model_ready(name, version)
                    body = json.dumps({"name": name, "ready": ready}).encode()
                    return await _respond(send, 200 if ready else 503, body)
                if action == "config":
                    _method(method, "GET")
                    return await _respond(send, 200, json.dumps(engine.model_config(name, version)).encode())
            if parts[0] == "jobs" and len(parts) == 2:
                _method(method, "GET")
                if jobs is None:
                    raise disabled()
                info["job"] = parts[1]
                return await _respond(send, 200, await jobs.get(parts[1]))
        elif path == "/metrics":
            _method(method, "GET")
            return await _respond(send, 200, engine.metrics.render().encode(),
                                  b"text/plain; version=0.0.4; charset=utf-8")
        elif len(parts) == 4 and parts[:2] == ["admin", "models"] and parts[3] == "routing":
            token = _header(scope, b"authorization")
            token = token[7:] if token and token.lower().startswith("bearer ") else None
            if method == "GET":
                engine.check_admin(token)
                return await _respond(send, 200, json.dumps(engine.routing(parts[2])).encode())
            _method(method, "POST", "PUT")
            body = await _read_body(receive, max_request_bytes, _content_length(scope))
            try:
                change = json.loads(body or b"{}")
            except ValueError as exc:
                raise InvalidInputError(f"malformed JSON: {exc}") from None
            return await _respond(send, 200, json.dumps(engine.update_routing(parts[2], change, token=token)).encode())
        raise ModelNotFoundError(f"no endpoint {method} {path}")

    async def _infer(scope: dict, receive, send: Send, name: str, version: str | None, info: dict) -> int:
        body = await _read_body(receive, max_request_bytes, _content_length(scope))
        request = await _offload(len(body), decode_rest, body, _header_length(scope), name, version)
        key_header = engine.key_header(name)
        if key_header is not None:
            request.routing_key = _header(scope, key_header.encode())
        response = await engine.infer(request)
        info.update(version=response.version, route=response.route, bytes_in=len(body))
        payload, json_length = await _offload(
            _JSON_BYTES_PER_BYTE * sum(getattr(a, "nbytes", 0) for a in response.outputs.values()),
            encode_rest, response, request, engine.output_types(name, response.version))
        headers = [(b"x-mpack-version", response.version.encode()), (b"x-mpack-route", response.route.encode())]
        if json_length is not None:
            headers.append((b"inference-header-content-length", str(json_length).encode()))
            return await _respond(send, 200, payload, b"application/octet-stream", headers)
        return await _respond(send, 200, payload, JSON, headers)

    async def _submit_job(scope: dict, receive, send: Send, name: str, version: str | None, info: dict) -> int:
        if jobs is None:
            raise disabled()
        body = await _read_body(receive, max_request_bytes, _content_length(scope))
        accepted = await jobs.submit(body, _header_length(scope), name, version)
        info.update(job=accepted["id"], bytes_in=len(body))
        return await _respond(send, 202, json.dumps(accepted).encode(), JSON,
                              [(b"location", accepted["location"].encode())])

    return app


async def _offload(size: int, fn: Callable, *args):
    """``fn(*args)``, in a thread when ``size`` (bytes of JSON, about) is over OFFLOAD_BYTES: decoding or encoding
    megabytes of JSON takes a good part of a second, during which the event loop would answer nothing else."""
    if size > OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _header_length(scope: dict) -> int | None:
    value = _header(scope, b"inference-header-content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidInputError(f"Inference-Header-Content-Length {value!r} is not a number") from None


def _method(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise MethodNotAllowedError(f"method {method} not allowed here; use {' or '.join(allowed)}")


def _message(exc: ServingError) -> str:
    return f"{exc.message} ({exc.hint})" if exc.hint else exc.message


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _content_length(scope: dict) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        raise InvalidInputError(f"Content-Length {value!r} is not a number") from None


async def _read_body(receive, limit: int, declared: int | None) -> bytes:
    if declared is not None and declared > limit:
        raise PayloadTooLargeError(f"request body of {declared} bytes exceeds the limit of {limit}",
                                   hint="raise --max-request-bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes",
                                       hint="raise --max-request-bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, content_type: bytes = JSON,
                   headers: list[tuple[bytes, bytes]] | None = None) -> int:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *(headers or ())]})
    await send({"type": "http.response.body", "body": body})
    return status
