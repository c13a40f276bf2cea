"""Queue-based (asynchronous) inference on Redis Streams: ``submit`` → job id → ``result``, and the worker.

The public import path (``from mpack import queue``; ``mpack worker`` uses it). The implementation, with the wire
format, lives in :mod:`mpack.serving.jobs`: the server's job endpoints share it, and ``serving/`` may import nothing
of the rest of mpack (STYLE.md point 12), so the code sits there and this module re-exports it. Importing it pulls in
numpy, redis (when used) and ``mpack.serving``'s pure modules, nothing of the CLI.
"""

from __future__ import annotations

from mpack.serving.jobs import (
    DEFAULT_GROUP, DEFAULT_JOB_TTL_S, DEFAULT_MAX_QUEUE, DEFAULT_RESULT_TTL_S, DEFAULT_STREAM, DEFAULT_URL, DTYPES,
    START_HINT, WIRE_VERSION, InvalidJobError, JobResult, QueueError, QueueFullError, QueueUnavailableError,
    UnknownJobError, Worker, WorkerConfig, WorkerConfigError, WorkerResult, connect, decode_tensors, encode_tensors,
    find_stream, poll, redact, result, run_worker, status, submit)

__all__ = [
    "DEFAULT_GROUP", "DEFAULT_JOB_TTL_S", "DEFAULT_MAX_QUEUE", "DEFAULT_RESULT_TTL_S", "DEFAULT_STREAM", "DEFAULT_URL",
    "DTYPES", "START_HINT", "WIRE_VERSION", "InvalidJobError", "JobResult", "QueueError", "QueueFullError",
    "QueueUnavailableError", "UnknownJobError", "Worker", "WorkerConfig", "WorkerConfigError", "WorkerResult",
    "connect", "decode_tensors", "encode_tensors", "find_stream", "poll", "redact", "result", "run_worker", "status",
    "submit",
]
