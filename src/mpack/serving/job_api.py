"""The asynchronous job endpoints behind ``--queue``: accept a V2 infer request, queue it on Redis Streams for
``mpack worker`` (jobs.py, the same code as ``mpack.queue``), answer polls, and POST results to callback URLs.

``POST /v2/models/{m}[/versions/{v}]/jobs`` checks the request exactly as ``/infer`` does (engine.check), then
enqueues it and answers 202 ``{"id", "status": "queued", "location": "/v2/jobs/{id}"}``. ``GET /v2/jobs/{id}``
answers ``{"id", "status": queued|running|done|failed, ...}``, with the outputs in /infer's JSON response format
once done. Redis calls block, so they run on a small thread pool of their own, never on the event loop.

A background task watches the jobs this server accepted (until they finish): it counts completions for /metrics
and POSTs the answer to the job's ``parameters.callback_url`` (only to the hosts of ``callback_hosts``; redirects
are not followed), best-effort — a few attempts with back-off, from the
server process that accepted the job, so a restart of that process loses the callbacks still due.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import numpy as np

from mpack.serving import jobs
from mpack.serving.config import ServeConfig
from mpack.serving.engine import Engine
from mpack.serving.errors import (
    InvalidInputError, ModelNotFoundError, NotConfiguredError, ServeConfigError, ServingError, UnavailableError)
from mpack.serving.model import DTYPES
from mpack.serving.protocol import decode_rest

log = logging.getLogger("mpack.serving")

POLL_INTERVAL_S = 0.2  # how soon a finished job's callback goes out (and its completion is counted)
CALLBACK_ATTEMPTS = 3
CALLBACK_BACKOFF_S = 0.5  # doubled after each failed attempt: 0.5 s, 1 s
CALLBACK_TIMEOUT_S = 5.0
OFFLOAD_BYTES = 1 << 20  # request bodies larger than this are decoded in a thread, off the event loop
MAX_WATCHED = 100_000  # jobs watched at once; past it new jobs with a callback are refused (503)
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_V2_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def disabled() -> NotConfiguredError:
    """The answer of the job endpoints on a server without ``--queue`` (501)."""
    return NotConfiguredError("the job endpoints need a queue, and this server has none",
                              hint="start it with --queue redis://HOST:6379/0 (or MPACK_SERVE_QUEUE, or server.queue "
                                   "in the deployment file) and run mpack worker on the model's stream")


@dataclass
class _Watched:
    stream: str
    model: str
    version: str
    callback_url: str | None


class JobService:
    """The job endpoints' logic for one server; :meth:`start` and :meth:`close` run on the server's event loop.

    Args:
        config: The server configuration (``queue`` set).
        engine: The server's engine: models to check requests against, and the metrics.

    Raises:
        ServeConfigError: the redis package is missing or the URL cannot be used.
    """

    def __init__(self, config: ServeConfig, engine: Engine) -> None:
        try:
            import redis
        except ImportError:
            raise ServeConfigError("--queue", config.queue, "needs the Python package redis, which is not installed",
                                   hint="pip install 'mpack[serve]' (or mpack[queue])") from None
        try:
            self.client = redis.Redis.from_url(config.queue, socket_connect_timeout=2, socket_timeout=10,
                                               health_check_interval=30)
        except ValueError as exc:
            raise ServeConfigError("--queue", jobs.redact(str(config.queue)), f"is not a usable Redis URL: {exc}",
                                   hint="e.g. redis://127.0.0.1:6379/0") from None
        self.config = config
        self.engine = engine
        self.metrics = engine.metrics
        self.watched: dict[str, _Watched] = {}
        self.metrics.jobs_pending.collect = lambda: [((), float(len(self.watched)))]
        # N.B. separate pools: a slow callback URL must not hold up submits and polls.
        self._redis_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mpack-jobs")
        self._callback_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mpack-callback")
        self._watcher: asyncio.Task | None = None
        self._deliveries: set[asyncio.Task] = set()
        self._last_warning = 0.0

    # ---- streams ------------------------------------------------------------------------------------------------

    def stream(self, model: str, version: str | None = None) -> str:
        """The stream of a model's jobs; a versioned URL's go to ``<stream>:<version>``."""
        base = self.config.queue_stream.replace("{model}", model)
        return f"{base}:{version}" if version else base

    def streams(self) -> list[str]:
        return [s for spec in self.config.models
                for s in (self.stream(spec.name), *(self.stream(spec.name, v) for v, _ in spec.versions))]

    # ---- endpoints ----------------------------------------------------------------------------------------------

    async def submit(self, body: bytes, header_length: int | None, name: str, version: str | None) -> dict:
        """Check and enqueue one V2 infer request; the 202 answer.

        Raises:
            ServingError: 400 (as /infer would answer), 404 (unknown model or version), 503 (queue full, Redis
                unreachable, server starting).
        """
        try:
            if len(body) > OFFLOAD_BYTES:  # decoding megabytes of JSON would stall every other request
                request = await asyncio.to_thread(decode_rest, body, header_length, name, version)
            else:
                request = decode_rest(body, header_length, name, version)
            checked_version = self.engine.check(request)
            callback_url = _callback_url(request.parameters.get("callback_url"), self.config.callback_hosts)
        except InvalidInputError:
            if name in self.engine.models:  # known models only: URL paths must not mint label values
                self.metrics.jobs_rejected.inc((name, "invalid"))
            raise
        if callback_url is not None and len(self.watched) >= MAX_WATCHED:
            self.metrics.jobs_rejected.inc((name, "full"))
            raise UnavailableError(f"{len(self.watched)} jobs are waiting for their callbacks here; retry later")
        stream = self.stream(name, version)
        described = {"model": name, "version": checked_version}
        if request.id:
            described["id"] = request.id
        if request.outputs is not None:
            described["outputs"] = list(request.outputs)
        if callback_url is not None:
            described["callback_url"] = callback_url
        try:
            job_id = await self._redis(jobs.submit, request.inputs, client=self.client, stream=stream,
                                       max_queue=self.config.queue_max_jobs, extra={"request": json.dumps(described)})
        except jobs.QueueError as exc:
            reason = "full" if isinstance(exc, jobs.QueueFullError) else \
                "invalid" if isinstance(exc, jobs.InvalidJobError) else "unavailable"
            self.metrics.jobs_rejected.inc((name, reason))
            raise _serving_error(exc) from None
        self.metrics.jobs_submitted.inc((name, checked_version))
        if len(self.watched) < MAX_WATCHED:
            self.watched[job_id] = _Watched(stream, name, checked_version, callback_url)
        return {"id": job_id, "status": "queued", "location": f"/v2/jobs/{job_id}"}

    async def get(self, job_id: str) -> bytes:
        """The job's state, and its outputs or error once finished: the JSON body (built off the event loop).

        Raises:
            ServingError: 404 for an unknown (or expired) job, 503 when Redis cannot be reached.
        """
        unknown = ModelNotFoundError(f"unknown job {job_id!r} (never submitted here, or its result expired)",
                                     hint="results are kept for the worker's --result-ttl seconds")
        if not _JOB_ID.match(job_id):
            raise unknown
        watched = self.watched.get(job_id)

        def lookup():
            stream = watched.stream if watched else jobs.find_stream(job_id, self.streams(), client=self.client)
            if stream is None:
                return None
            # N.B. in this thread, not on the loop: a large result takes a while to turn into JSON.
            return json.dumps(answer(job_id, *jobs.poll(job_id, stream=stream, client=self.client))).encode()

        try:
            found = await self._redis(lookup)
        except jobs.UnknownJobError:
            raise unknown from None
        except jobs.QueueError as exc:
            raise _serving_error(exc) from None
        if found is None:
            raise unknown
        return found

    # ---- watching and callbacks ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start watching accepted jobs (call on the server's event loop)."""
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self, timeout: float) -> None:
        """Stop watching; let callbacks in flight finish within ``timeout`` seconds; release the threads."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._deliveries:
            done, late = await asyncio.wait(list(self._deliveries), timeout=timeout)
            for task in late:
                task.cancel()
        due = sum(1 for w in self.watched.values() if w.callback_url)
        if due:
            log.warning("callbacks not sent", extra={"fields": {"jobs": due, "why": "server stopped first"}})
        self._redis_pool.shutdown(wait=False, cancel_futures=True)
        self._callback_pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.client.close)

    async def _watch(self) -> None:
        try:
            await self._redis(self.client.ping)
            log.info("job queue", extra={"fields": {"queue": jobs.redact(str(self.config.queue)),
                                                    "streams": self.streams()}})
        except Exception as exc:  # noqa: BLE001 - reported; the endpoints answer 503 until Redis is back
            self._warn("job queue unreachable", exc)
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            if not self.watched:
                continue
            snapshot = list(self.watched.items())
            try:
                states = await self._redis(_states, self.client, [(w.stream, j) for j, w in snapshot])
            except Exception as exc:  # noqa: BLE001 - Redis away: try again next round
                self._warn("cannot poll jobs", exc)
                continue
            for (job_id, watched), state in zip(snapshot, states):
                if state in ("queued", "running"):
                    continue
                self.watched.pop(job_id, None)
                if state is None:  # expired or deleted under us
                    log.warning("job record gone", extra={"fields": {"job": job_id}})
                    continue
                self.metrics.jobs_completed.inc((watched.model, watched.version, state))
                if watched.callback_url is not None:
                    task = asyncio.get_running_loop().create_task(self._deliver(job_id, watched))
                    self._deliveries.add(task)
                    task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, job_id: str, watched: _Watched) -> None:
        fields = {"job": job_id, "url": watched.callback_url}
        try:
            body = await self._redis(lambda: json.dumps(answer(job_id, *jobs.poll(
                job_id, stream=watched.stream, client=self.client))).encode())
        except Exception as exc:  # noqa: BLE001 - best-effort: logged and counted
            self.metrics.job_callbacks.inc(("failed",))
            log.warning("callback failed", extra={"fields": {**fields, "error": _first_line(exc)}})
            return
        loop = asyncio.get_running_loop()
        error = ""
        for attempt in range(CALLBACK_ATTEMPTS):
            if attempt:
                await asyncio.sleep(CALLBACK_BACKOFF_S * 2 ** (attempt - 1))
            try:
                status = await loop.run_in_executor(self._callback_pool, _post, watched.callback_url, body, job_id)
            except Exception as exc:  # noqa: BLE001 - connection refused, timeout, ...: retried
                error = _first_line(exc)
                continue
            if 200 <= status < 300:
                self.metrics.job_callbacks.inc(("delivered",))
                log.info("callback delivered", extra={"fields": {**fields, "attempts": attempt + 1}})
                return
            error = f"HTTP {status}"
        self.metrics.job_callbacks.inc(("failed",))
        log.warning("callback failed", extra={"fields": {**fields, "attempts": CALLBACK_ATTEMPTS, "error": error}})

    # ---- helpers ------------------------------------------------------------------------------------------------

    async def _redis(self, fn: Callable, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._redis_pool, lambda: _guard(fn, *args, **kwargs))

    def _warn(self, message: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10:  # one line per 10 s while Redis is away, not five a second
            self._last_warning = now
            log.warning(message, extra={"fields": {"error": _first_line(exc)}})


def answer(job_id: str, state: str, fields: dict, result: jobs.JobResult | None) -> dict:
    """A job's JSON answer (GET /v2/jobs/{id} and the callback body): id, status, the model, timings, and once done
    ``outputs`` as /infer answers them (JSON tensors), or ``error`` once failed."""
    try:
        described = json.loads(fields.get(b"request") or b"{}")
    except ValueError:
        described = {}
    body: dict = {"id": job_id, "status": state}
    if described.get("model"):
        body.update(model_name=described["model"], model_version=described.get("version", ""))
    if described.get("id"):
        body["request_id"] = described["id"]
    if b"submitted" in fields:
        body["submitted"] = float(fields[b"submitted"])
    if result is None:
        return body
    body.update(finished=result.finished, worker=result.worker, attempts=result.attempts)
    if result.ok:
        wanted = described.get("outputs") or list(result.outputs)
        body["outputs"] = [_tensor(name, result.outputs[name]) for name in wanted if name in result.outputs]
    else:
        body["error"] = result.error
    return body


def _tensor(name: str, array: np.ndarray) -> dict:
    # N.B. the entries of protocol.encode_rest's JSON outputs, so a job's outputs read like /infer's.
    return {"name": name, "datatype": _V2_NAMES.get(array.dtype, str(array.dtype)), "shape": list(array.shape),
            "data": array.ravel().tolist()}


def _states(client, jobs_: list[tuple[str, str]]) -> list[str | None]:
    """``state`` of each (stream, job id) in one round trip per 1000; None where the record is gone. Queued and
    running are not told apart here (the watcher waits for the end)."""
    states: list[str | None] = []
    for start in range(0, len(jobs_), 1000):
        pipe = client.pipeline(transaction=False)
        for stream, job_id in jobs_[start:start + 1000]:
            pipe.hget(f"{stream}:job:{job_id}", "state")
        states.extend(s.decode() if s is not None else None for s in pipe.execute())
    return states


def _guard(fn: Callable, *args, **kwargs):
    """Run a Redis call, turning the client's connection errors into QueueUnavailableError (503)."""
    import redis

    try:
        return fn(*args, **kwargs)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise jobs.QueueUnavailableError(f"cannot reach the job queue: {_first_line(exc)}",
                                         hint="is Redis up? see the server's --queue") from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the 3xx it is (a failed attempt): following it could lead to any host."""

    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _post(url: str, body: bytes, job_id: str) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "mpack-serve", "X-Mpack-Job": job_id})
    try:
        with _OPENER.open(request, timeout=CALLBACK_TIMEOUT_S) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _callback_url(value, allowed_hosts: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if not allowed_hosts:
        raise InvalidInputError("parameters.callback_url is refused: this server allows no callback hosts",
                                hint="start it with --callback-host HOST (MPACK_SERVE_CALLBACK_HOSTS, or "
                                     "server.callback_hosts in the deployment file)")
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
        hostname = parts.hostname if parts is not None else None
    except ValueError:
        parts = hostname = None
    if parts is None or parts.scheme not in ("http", "https") or not hostname or len(value) > 2048 or \
            any(ord(c) < 33 for c in value):
        raise InvalidInputError(f"parameters.callback_url {value!r} is not an http(s) URL",
                                hint="e.g. http://client.internal:9000/results")
    if hostname.lower() not in allowed_hosts:
        raise InvalidInputError(f"parameters.callback_url host {hostname!r} is not an allowed callback host",
                                hint=f"callback_hosts (--callback-host): {', '.join(allowed_hosts)}")
    return value


def _serving_error(exc: jobs.QueueError) -> ServingError:
    kind = {400: InvalidInputError, 404: ModelNotFoundError, 503: UnavailableError}.get(exc.http_status)
    if kind is None:
        error = ServingError(exc.message, exc.hint)
        error.http_status = exc.http_status
        return error
    return kind(exc.message, exc.hint)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
