"""Queue-based (asynchronous) inference on Redis Streams: ``submit`` → job id → ``result``, and the worker.

A client :func:`submit`\\ s a job (named input tensors) to a Redis stream and gets a job id at once; a worker
(``mpack worker``, :func:`run_worker`) reads jobs through a consumer group, runs them through ONNX Runtime in
micro-batches, stores each result under the job's key and only then acknowledges the stream entry. A worker that
dies holding jobs leaves them pending in the group; another worker claims them (``XAUTOCLAIM``) once they have been
idle ``claim_idle_s``, so no job is lost (processing is at-least-once: a job may run twice, never zero times).
The stream is bounded: :func:`submit` refuses a job when ``max_queue`` jobs are waiting.

This module imports only numpy, redis and (in the worker) onnxruntime, and nothing else of mpack: it lives in
``mpack.serving`` so the server's job endpoints (job_api.py) share it, and ``mpack.queue`` is its public import path
(``mpack worker`` and Python clients use that). Errors are :class:`QueueError`\\ s carrying ``http_status`` and
``hint``; ``mpack worker`` maps them to mpack's exit codes in cli.py, the server to V2 errors in job_api.py.

Wire format (version 1; README.md "mpack worker" documents it for other clients, N.B. keep both in step)::

    stream NAME, one entry per job (XADD NAME * ...):
        v           "1"
        job         job id (32 hex chars)
        meta        JSON {"inputs": {"<name>": {"dtype": "float32", "shape": [rows, ...]}, ...}}
        t:<name>    the tensor's raw bytes, C order, little-endian
        submitted   Unix time (seconds, float)
    hash NAME:job:<id>   state (queued | done | failed), submitted, entry (the job's stream entry id), any extra
                         fields the submitter stored (mpack serve: request, a JSON object), and once finished:
                         finished, worker, attempts, error (failed), meta (JSON {"outputs": {...}} as above),
                         t:<name> per output; expires after job_ttl_s while queued, result_ttl_s once finished
    list NAME:done:<id>  one element pushed when the job finishes (lets result() block instead of polling)
    hash NAME:config     max_queue (set by ``mpack worker --max-queue``; submit's default bound)

Every input of a job has the same number of rows (axis 0); a job's rows are never split across inference calls,
and jobs whose inputs agree on every other axis are concatenated into one call of at most ``max_batch`` rows.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

WIRE_VERSION = "1"
DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_STREAM = "mpack:jobs"
DEFAULT_GROUP = "mpack-workers"
DEFAULT_MAX_QUEUE = 1000
DEFAULT_JOB_TTL_S = 86400
DEFAULT_RESULT_TTL_S = 3600
DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
          "float64")
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
               "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
               "tensor(uint64)": "uint64", "tensor(bool)": "bool"}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
START_HINT = ("start one with: redis-server --port 6379 --save '' --bind 127.0.0.1 "
              "(Debian/Ubuntu: apt-get install redis-server)")


# --- errors -------------------------------------------------------------------------------------------------------

class QueueError(Exception):
    """Base class: one line ``message``, an optional ``hint``, and the HTTP status a server should answer."""

    http_status = 500

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class QueueUnavailableError(QueueError):
    """Redis cannot be reached."""

    http_status = 503


class QueueFullError(QueueError):
    """The stream holds ``max_queue`` jobs already: retry later."""

    http_status = 503


class InvalidJobError(QueueError):
    """The job's tensors cannot be sent (or, in a result, did not fit the model)."""

    http_status = 400


class UnknownJobError(QueueError):
    """No such job: never submitted, or its result expired."""

    http_status = 404


class WorkerConfigError(QueueError):
    """The worker cannot start: a missing or unloadable model, or a bad option."""

    http_status = 500


# --- connection and encoding --------------------------------------------------------------------------------------

def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def connect(url: str = DEFAULT_URL, timeout: float = 2.0):
    """A ``redis.Redis`` client for ``url``, checked with PING.

    Raises:
        QueueUnavailableError: Redis is not reachable (the hint says how to start one).
    """
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, health_check_interval=30)
        client.ping()
    except ValueError as exc:
        raise QueueUnavailableError(f"{redact(url)} is not a Redis URL ({exc})",
                                    hint="e.g. redis://127.0.0.1:6379/0") from None
    except redis.exceptions.RedisError as exc:
        raise QueueUnavailableError(f"cannot reach Redis at {redact(url)}: {_first_line(exc)}",
                                    hint=START_HINT) from None
    return client


def _client(client, url: str):
    return client if client is not None else connect(url)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _entry_order(entry_id: bytes) -> tuple[int, int]:
    millis, _, seq = entry_id.partition(b"-")
    return int(millis), int(seq or 0)


def _keys(stream: str, job_id: str) -> tuple[str, str]:
    return f"{stream}:job:{job_id}", f"{stream}:done:{job_id}"


def encode_tensors(tensors: Mapping[str, np.ndarray], section: str) -> dict[str, bytes | str]:
    """``{"meta": JSON, "t:<name>": bytes}`` for named arrays (C order, little-endian)."""
    meta, fields = {}, {}
    for name, value in tensors.items():
        array = np.asarray(value)
        if array.dtype.name not in DTYPES:
            raise InvalidJobError(f"tensor {name!r} has dtype {array.dtype}, which the queue does not carry",
                                  hint=f"use one of: {', '.join(DTYPES)}")
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        meta[name] = {"dtype": array.dtype.name, "shape": list(array.shape)}
        fields[f"t:{name}"] = array.tobytes()
    fields["meta"] = json.dumps({section: meta})
    return fields


def decode_tensors(fields: Mapping[bytes, bytes], section: str) -> dict[str, np.ndarray]:
    """The arrays of an entry or result written by :func:`encode_tensors`.

    Raises:
        InvalidJobError: the fields do not hold what ``meta`` announces.
    """
    try:
        meta = json.loads(fields[b"meta"])[section]
        out = {}
        for name, info in meta.items():
            dtype = np.dtype(info["dtype"]).newbyteorder("<")
            if dtype.name not in DTYPES:
                raise ValueError(f"dtype {info['dtype']} is not carried")
            shape = tuple(int(d) for d in info["shape"])
            data = fields[f"t:{name}".encode()]
            array = np.frombuffer(data, dtype=dtype)
            out[name] = array.reshape(shape).astype(dtype.newbyteorder("="), copy=False)
        return out
    except (KeyError, ValueError, TypeError) as exc:
        raise InvalidJobError(f"malformed tensors ({_first_line(exc)})",
                              hint="see the wire format in README.md, mpack worker") from None


# --- client -------------------------------------------------------------------------------------------------------

# Bounded enqueue in one step (N.B. Redis runs a script atomically, so two clients cannot both take the last slot).
# KEYS: stream, config hash, job hash. ARGV: explicit bound or "", default bound, job ttl, submitted, the number n of
# extra job-hash field/value pairs, those 2n values, then the entry's field/value pairs.
_SUBMIT = """
local limit = tonumber(ARGV[1]) or tonumber(redis.call('HGET', KEYS[2], 'max_queue')) or tonumber(ARGV[2])
local waiting = redis.call('XLEN', KEYS[1])
if waiting >= limit then return {0, waiting, limit} end
local n = tonumber(ARGV[5])
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 6 + 2 * n))
if n > 0 then redis.call('HSET', KEYS[3], unpack(ARGV, 6, 5 + 2 * n)) end
redis.call('HSET', KEYS[3], 'state', 'queued', 'submitted', ARGV[4], 'entry', id)
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))
return {1, id, limit}
"""


def submit(inputs: Mapping[str, np.ndarray], *, url: str = DEFAULT_URL, stream: str = DEFAULT_STREAM, client=None,
           max_queue: int | None = None, job_ttl_s: int = DEFAULT_JOB_TTL_S,
           extra: Mapping[str, str] | None = None) -> str:
    """Queue one job and return its id at once.

    Args:
        inputs: Model input name → array; every array has the same number of rows (axis 0).
        url: Redis URL. Defaults to redis://127.0.0.1:6379/0.
        stream: Stream name. Defaults to "mpack:jobs".
        client: An existing ``redis.Redis`` (then ``url`` is not used).
        max_queue: Refuse the job when this many are waiting. Defaults to the stream's configured bound
            (``mpack worker --max-queue``), else 1000.
        job_ttl_s: Seconds an unfinished job's record is kept. Defaults to one day.
        extra: More fields for the job's hash (workers leave them alone; not ``state``, ``meta`` or ``t:*``).
            Defaults to none.

    Raises:
        InvalidJobError: no inputs, a dtype the queue does not carry, inputs of different row counts.
        QueueFullError: the stream is full.
        QueueUnavailableError: Redis cannot be reached.
    """
    import redis

    if not inputs:
        raise InvalidJobError("a job needs at least one input tensor")
    arrays = {str(k): np.asarray(v) for k, v in inputs.items()}
    rows = {a.shape[0] if a.ndim else None for a in arrays.values()}
    if None in rows or len(rows) != 1:
        raise InvalidJobError("every input needs the same number of rows along axis 0 "
                              f"(got {', '.join(f'{k} {list(a.shape)}' for k, a in arrays.items())})")
    client = _client(client, url)
    job_id = uuid.uuid4().hex
    submitted = repr(time.time())
    fields = {"v": WIRE_VERSION, "job": job_id, **encode_tensors(arrays, "inputs"), "submitted": submitted}
    extra = dict(extra or {})
    args = ["" if max_queue is None else max_queue, DEFAULT_MAX_QUEUE, job_ttl_s, submitted, len(extra)]
    for key, value in [*extra.items(), *fields.items()]:
        args += [key, value]
    script = client.register_script(_SUBMIT)
    job_key, _ = _keys(stream, job_id)
    try:
        ok, detail, limit = script(keys=[stream, f"{stream}:config", job_key], args=args)
    except redis.exceptions.ConnectionError as exc:
        raise QueueUnavailableError(f"cannot reach Redis: {_first_line(exc)}", hint=START_HINT) from None
    if not ok:
        raise QueueFullError(f"queue {stream} is full ({detail} jobs waiting, limit {limit})",
                             hint="retry later, start more workers, or raise the limit (mpack worker --max-queue)")
    return job_id


@dataclass
class JobResult:
    """A finished job: ``state`` done (``outputs`` by name) or failed (``error``)."""

    job_id: str
    state: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    error: str | None = None
    worker: str | None = None
    attempts: int = 1
    submitted: float | None = None
    finished: float | None = None

    @property
    def ok(self) -> bool:
        return self.state == "done"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["outputs"] = {k: v.tolist() for k, v in self.outputs.items()}
        return data


def status(job_id: str, *, url: str = DEFAULT_URL, stream: str = DEFAULT_STREAM, client=None) -> str:
    """``queued``, ``done``, ``failed`` or ``unknown`` (never submitted, or expired)."""
    client = _client(client, url)
    state = client.hget(_keys(stream, job_id)[0], "state")
    return state.decode() if state else "unknown"


def result(job_id: str, timeout: float = 0.0, *, url: str = DEFAULT_URL, stream: str = DEFAULT_STREAM,
           client=None) -> JobResult | None:
    """The job's result, waiting up to ``timeout`` seconds for it; None while it is still queued or running.

    ``timeout=0`` asks once (for an HTTP poll endpoint). A failed job is returned too (``state == "failed"``).

    Raises:
        UnknownJobError: no such job (never submitted, or its record expired).
        QueueUnavailableError: Redis cannot be reached.
    """
    import redis

    client = _client(client, url)
    job_key, done_key = _keys(stream, job_id)
    deadline = time.monotonic() + timeout
    try:
        while True:
            fields = client.hgetall(job_key)
            if not fields:
                raise UnknownJobError(f"no job {job_id} in {stream} (never submitted, or its result expired)",
                                      hint="results are kept for the worker's --result-ttl seconds")
            state = fields.get(b"state", b"").decode()
            if state in ("done", "failed"):
                return _job_result(job_id, state, fields)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # Wait for the worker's "done" push rather than polling; put it back so other waiters wake too.
            # The 0.5 s cap re-checks the record now and then (the push may have come before we listened).
            if client.blpop([done_key], timeout=min(left, 0.5)):
                client.lpush(done_key, b"1")
                client.expire(done_key, DEFAULT_RESULT_TTL_S)
    except redis.exceptions.ConnectionError as exc:
        raise QueueUnavailableError(f"cannot reach Redis: {_first_line(exc)}", hint=START_HINT) from None


def _job_result(job_id: str, state: str, fields: Mapping[bytes, bytes]) -> JobResult:
    def text(key: bytes) -> str | None:
        return fields[key].decode() if key in fields else None

    outputs = decode_tensors(fields, "outputs") if state == "done" else {}
    return JobResult(job_id=job_id, state=state, outputs=outputs, error=text(b"error"), worker=text(b"worker"),
                     attempts=int(fields.get(b"attempts", b"1")),
                     submitted=float(fields[b"submitted"]) if b"submitted" in fields else None,
                     finished=float(fields[b"finished"]) if b"finished" in fields else None)


def find_stream(job_id: str, streams: list[str], *, client) -> str | None:
    """Which of ``streams`` holds the job (one round trip), or None: for a server answering ``GET /v2/jobs/{id}``
    without knowing the model."""
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.exists(_keys(stream, job_id)[0])
    return next((s for s, found in zip(streams, pipe.execute()) if found), None)


def poll(job_id: str, *, stream: str = DEFAULT_STREAM, client) -> tuple[str, dict[bytes, bytes], JobResult | None]:
    """The job's state with its record, asked once: ``queued``; ``running`` (a consumer group has delivered its
    entry, to a live worker or to one that died holding it); ``done`` or ``failed`` with the :class:`JobResult`.

    Raises:
        UnknownJobError: no such job (never submitted, or its record expired).
        QueueUnavailableError: Redis cannot be reached.
    """
    import redis

    job_key, _ = _keys(stream, job_id)
    try:
        fields = client.hgetall(job_key)
        if not fields:
            raise UnknownJobError(f"no job {job_id} in {stream} (never submitted, or its result expired)",
                                  hint="results are kept for the worker's --result-ttl seconds")
        state = fields.get(b"state", b"").decode()
        if state in ("done", "failed"):
            return state, fields, _job_result(job_id, state, fields)
        entry = fields.get(b"entry")
        if entry is not None:
            try:
                groups = client.xinfo_groups(stream)
            except redis.exceptions.ResponseError:  # no stream yet: nothing delivered
                groups = []
            # Entry ids grow with time, so an entry at or before a group's last delivered id has been delivered.
            if any(_entry_order(entry) <= _entry_order(_as_bytes(g["last-delivered-id"])) for g in groups):
                state = "running"
        return state, fields, None
    except redis.exceptions.ConnectionError as exc:
        raise QueueUnavailableError(f"cannot reach Redis: {_first_line(exc)}", hint=START_HINT) from None


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


# --- worker -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerConfig:
    """What ``mpack worker`` runs.

    Args:
        model: The .onnx file.
        url: Redis URL. Defaults to redis://127.0.0.1:6379/0.
        stream: Stream name. Defaults to "mpack:jobs".
        group: Consumer group (workers of one model share one). Defaults to "mpack-workers".
        consumer: This worker's name in the group. Defaults to HOST-PID.
        max_batch: Most rows per inference call (whole jobs only; one larger job runs alone). Defaults to 32.
        max_wait_ms: After the first job arrives, how long to wait for more to fill a batch. Defaults to 5.
        claim_idle_s: Jobs pending this long at another (dead) worker are claimed. Set it above the longest
            batch time, or slow jobs run twice. Defaults to 30.
        block_ms: Longest wait for new jobs per read (bounds shutdown time). Defaults to 1000.
        result_ttl_s: Seconds results are kept. Defaults to 3600.
        max_queue: Bound stored for submitters (``NAME:config``). Defaults to leaving the stored one.
        max_deliveries: A job delivered this often (it keeps killing workers) is failed instead. Defaults to 5.
        providers: ONNX Runtime providers, short (cpu, cuda, tensorrt) or full names. Defaults to ("cpu",).
        threads: intra-op threads. Defaults to ONNX Runtime's choice.
        max_jobs: Stop after this many jobs. Defaults to running until stopped.
    """

    model: Path
    url: str = DEFAULT_URL
    stream: str = DEFAULT_STREAM
    group: str = DEFAULT_GROUP
    consumer: str | None = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    claim_idle_s: float = 30.0
    block_ms: int = 1000
    result_ttl_s: int = DEFAULT_RESULT_TTL_S
    max_queue: int | None = None
    max_deliveries: int = 5
    providers: tuple[str, ...] = ("cpu",)
    threads: int | None = None
    max_jobs: int | None = None


@dataclass
class WorkerResult:
    consumer: str
    jobs: int = 0
    failed: int = 0
    batches: int = 0
    reclaimed: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Job:
    entry_id: bytes
    job_id: str
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    attempts: int = 1
    error: str | None = None
    outputs: dict[str, np.ndarray] | None = None

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def signature(self) -> tuple:
        return tuple((k, v.dtype.name, v.shape[1:]) for k, v in sorted(self.inputs.items()))


class Worker:
    """Consumes one stream through a consumer group; see :class:`WorkerConfig` and the module docstring."""

    def __init__(self, cfg: WorkerConfig, client=None) -> None:
        self.cfg = cfg
        self.name = cfg.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.result = WorkerResult(consumer=self.name)
        self.client = client
        self.session = None
        self._last_claim = 0.0

    def start(self) -> None:
        """Load the model, connect, create the group (and the stream) if needed, store the queue bound."""
        self._load_model()
        self.client = _client(self.client, self.cfg.url)
        self._ensure_group()
        if self.cfg.max_queue is not None:
            self.client.hset(f"{self.cfg.stream}:config", "max_queue", self.cfg.max_queue)
        self._forget_dead_consumers()

    def _ensure_group(self) -> None:
        import redis

        try:
            # id "0": a new group also serves jobs submitted before any worker existed.
            self.client.xgroup_create(self.cfg.stream, self.cfg.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _load_model(self) -> None:
        import onnxruntime as ort

        if not Path(self.cfg.model).is_file():
            raise WorkerConfigError(f"model {self.cfg.model} does not exist", hint="give an .onnx file")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.cfg.threads:
            options.intra_op_num_threads = self.cfg.threads
        try:
            self.session = ort.InferenceSession(str(self.cfg.model), sess_options=options,
                                                providers=[_PROVIDERS.get(p, p) for p in self.cfg.providers])
        except Exception as exc:  # ORT's own exception types: the file cannot be run
            raise WorkerConfigError(f"ONNX Runtime cannot load {self.cfg.model}: {_first_line(exc)}",
                                    hint="check the file with `mpack inspect`") from None
        self.inputs = {i.name: (_ORT_DTYPES.get(i.type, i.type), tuple(i.shape)) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        # Jobs can share a call only when every input's axis 0 is symbolic (not a fixed size).
        self.batchable = all(shape and not isinstance(shape[0], int) for _, shape in self.inputs.values())

    def _forget_dead_consumers(self) -> None:
        # Consumer names carry the PID, so restarts leave names behind: drop those idle an hour with nothing pending.
        try:
            for consumer in self.client.xinfo_consumers(self.cfg.stream, self.cfg.group):
                if consumer["pending"] == 0 and consumer["idle"] > 3_600_000:
                    self.client.xgroup_delconsumer(self.cfg.stream, self.cfg.group, consumer["name"])
        except Exception:  # housekeeping only: never stops a worker
            pass

    # -- one iteration --

    def step(self) -> int:
        """Claim abandoned jobs or read new ones, run them, store results, acknowledge. Returns jobs handled."""
        entries = self._claim()
        if not entries:
            entries = self._read()
        if not entries:
            return 0
        jobs = [self._decode(entry_id, fields) for entry_id, fields in entries]
        self._attempts(jobs)
        self._run(jobs)
        self._store(jobs)
        return len(jobs)

    def _read(self) -> list:
        cfg = self.cfg
        reply = self.client.xreadgroup(cfg.group, self.name, {cfg.stream: ">"}, count=cfg.max_batch,
                                       block=cfg.block_ms)
        entries = reply[0][1] if reply else []
        if entries and len(entries) < cfg.max_batch and cfg.max_wait_ms > 0:
            more = self.client.xreadgroup(cfg.group, self.name, {cfg.stream: ">"},
                                          count=cfg.max_batch - len(entries), block=max(1, int(cfg.max_wait_ms)))
            entries += more[0][1] if more else []
        return entries

    def _claim(self) -> list:
        now = time.monotonic()
        if now - self._last_claim < min(self.cfg.claim_idle_s / 2, 5.0):
            return []
        self._last_claim = now
        reply = self.client.xautoclaim(self.cfg.stream, self.cfg.group, self.name,
                                       min_idle_time=int(self.cfg.claim_idle_s * 1000), start_id="0-0",
                                       count=self.cfg.max_batch)
        claimed, deleted = reply[1], (reply[2] if len(reply) > 2 else [])
        if deleted:  # entries trimmed away while pending: nothing left to run
            self.client.xack(self.cfg.stream, self.cfg.group, *deleted)
        claimed = [(entry_id, fields) for entry_id, fields in claimed if fields]
        self.result.reclaimed += len(claimed)
        return claimed

    def _attempts(self, jobs: list[_Job]) -> None:
        ids = sorted((j.entry_id for j in jobs), key=_entry_order)
        pending = self.client.xpending_range(self.cfg.stream, self.cfg.group, min=ids[0], max=ids[-1],
                                             count=len(ids) + 100, consumername=self.name)
        counts = {p["message_id"]: p["times_delivered"] for p in pending}
        for job in jobs:
            job.attempts = int(counts.get(job.entry_id, 1))
            if job.error is None and job.attempts > self.cfg.max_deliveries:
                job.error = (f"gave up after {job.attempts - 1} deliveries: the job stopped every worker that took "
                             "it (crash or kill)")

    def _decode(self, entry_id: bytes, fields: dict) -> _Job:
        job = _Job(entry_id=entry_id, job_id=(fields.get(b"job") or b"").decode() or None)
        try:
            if fields.get(b"v") != WIRE_VERSION.encode():
                raise InvalidJobError(f"wire format version {fields.get(b'v')!r} is not {WIRE_VERSION}")
            job.inputs = decode_tensors(fields, "inputs")
            self._check(job.inputs)
        except InvalidJobError as exc:
            job.error = exc.message
        return job

    def _check(self, inputs: dict[str, np.ndarray]) -> None:
        names = set(self.inputs)
        if set(inputs) != names:
            raise InvalidJobError(f"inputs {sorted(inputs)} do not match the model's {sorted(names)}")
        rows = {a.shape[0] if a.ndim else None for a in inputs.values()}
        if None in rows or len(rows) != 1:
            raise InvalidJobError("every input needs the same number of rows along axis 0")
        for name, (dtype, shape) in self.inputs.items():
            array = inputs[name]
            if array.dtype.name != dtype:
                raise InvalidJobError(f"input {name!r} has dtype {array.dtype.name}, the model wants {dtype}")
            if array.ndim != len(shape) or any(isinstance(d, int) and d != n for d, n in zip(shape, array.shape)):
                raise InvalidJobError(f"input {name!r} has shape {list(array.shape)}, the model wants "
                                      f"{[d if isinstance(d, int) else (d or '?') for d in shape]}")

    def _run(self, jobs: list[_Job]) -> None:
        ready = [j for j in jobs if j.error is None]
        groups: dict[tuple, list[_Job]] = {}
        for job in ready:
            groups.setdefault(job.signature if self.batchable else (job.entry_id,), []).append(job)
        for members in groups.values():
            batch: list[_Job] = []
            for job in members:
                if batch and sum(j.rows for j in batch) + job.rows > self.cfg.max_batch:
                    self._infer(batch)
                    batch = []
                batch.append(job)
            if batch:
                self._infer(batch)

    def _infer(self, batch: list[_Job]) -> None:
        self.result.batches += 1
        feeds = {name: (np.concatenate([j.inputs[name] for j in batch]) if len(batch) > 1 else batch[0].inputs[name])
                 for name in self.inputs}
        try:
            outputs = self.session.run(self.outputs, feeds)
        except Exception as exc:  # ORT's own types: this data does not run on this model
            if len(batch) > 1:  # find the job that fails; the others still get results
                for job in batch:
                    self._infer([job])
                self.result.batches -= 1
                return
            batch[0].error = f"the model failed on this job: {_first_line(exc)}"
            return
        start = 0
        for job in batch:
            job.outputs = {name: value[start:start + job.rows] for name, value in zip(self.outputs, outputs)}
            start += job.rows

    def _store(self, jobs: list[_Job]) -> None:
        """Results first, then XACK + XDEL, in one MULTI/EXEC: a job is acknowledged only with its result stored."""
        cfg = self.cfg
        now = repr(time.time())
        pipe = self.client.pipeline(transaction=True)
        for job in jobs:
            if job.job_id is None:
                continue  # not a job at all: acknowledged below, nothing to answer
            job_key, done_key = _keys(cfg.stream, job.job_id)
            record = {"finished": now, "worker": self.name, "attempts": job.attempts}
            if job.error is None and job.outputs is not None:
                record.update(state="done", **encode_tensors(job.outputs, "outputs"))
            else:
                record.update(state="failed", error=job.error or "no result")
                self.result.failed += 1
            pipe.hset(job_key, mapping=record)
            pipe.expire(job_key, cfg.result_ttl_s)
            pipe.lpush(done_key, b"1")
            pipe.expire(done_key, cfg.result_ttl_s)
        ids = [j.entry_id for j in jobs]
        pipe.xack(cfg.stream, cfg.group, *ids)
        # Deleting acknowledged entries keeps XLEN equal to the jobs still waiting, which is what the bound counts.
        pipe.xdel(cfg.stream, *ids)
        pipe.execute()
        self.result.jobs += len(jobs)

    # -- the loop --

    def run(self, stop: threading.Event | None = None, on_step: Callable[[WorkerResult], None] | None = None
            ) -> WorkerResult:
        """Run until ``stop`` is set or ``max_jobs`` jobs are done. A batch in flight is finished first."""
        import redis

        stop = stop or threading.Event()
        started = time.monotonic()
        if self.session is None:
            self.start()
        try:
            while not stop.is_set():
                if self.cfg.max_jobs is not None and self.result.jobs >= self.cfg.max_jobs:
                    break
                try:
                    handled = self.step()
                except redis.exceptions.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    self._ensure_group()  # the stream was deleted under us (e.g. DEL by an operator): start over
                    continue
                if handled and on_step:
                    on_step(self.result)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise QueueUnavailableError(f"lost Redis at {redact(self.cfg.url)}: {_first_line(exc)}",
                                        hint="unacknowledged jobs stay pending and are claimed by another worker") \
                from None
        finally:
            self.result.seconds = time.monotonic() - started
        return self.result


def run_worker(cfg: WorkerConfig, stop: threading.Event | None = None,
               on_step: Callable[[WorkerResult], None] | None = None) -> WorkerResult:
    """Start a :class:`Worker` and run it until ``stop`` is set (or ``max_jobs`` are done)."""
    worker = Worker(cfg)
    worker.start()
    return worker.run(stop, on_step)
