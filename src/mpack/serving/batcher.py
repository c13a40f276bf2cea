"""Dynamic batching: requests of one model version merged into one ``session.run``, run off the event loop.

Policy: greedy, as measured in shared/reference/serving-notes.md. A fixed wait window (collect N ms, then run) cut
throughput at concurrency 1 by 12x there, because a closed-loop client's next request never arrives while the
server waits for it. So:

- a request that finds a free instance runs at once, alone if it is alone (no wait on an idle model);
- requests that arrive while every instance is busy queue up, and the moment an instance frees, the queue's head
  and every queued request of the same shape (the batch dim aside) go together, up to ``max_batch_size`` samples,
  in arrival order; requests of other shapes wait for the next batch;
- opt-in, with ``preferred_batch_sizes`` (Triton's policy): a batch smaller than the smallest preferred size waits
  for more requests, even on an idle model, but never past ``max_queue_delay_ms`` after its oldest request arrived,
  and a larger batch is trimmed to the largest preferred size it reaches. This is the only waiting there is: the
  delay bounds how long a batch may wait to fill, and without preferred sizes nothing waits but for a free instance.
- at most ``max_queue_size`` requests wait; one more is refused at once (QueueFullError → 503 / UNAVAILABLE)
  rather than queued for longer than any client waits.

All state lives on the event loop thread; only ``session.run`` (plus concatenating and splitting) runs in the
worker threads, one per instance. When a merged batch fails, its requests run again one by one, so a request that
makes the model raise fails alone and the others of its batch still get their answers.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mpack.serving.errors import ServingError, UnavailableError


class QueueFullError(UnavailableError):
    pass


@dataclass
class _Pending:
    feeds: dict[str, np.ndarray]
    size: int  # samples
    key: tuple  # non-batch shapes: equal keys can be concatenated
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatchStats:
    """Reported after every run, on the event loop: for the batch-size and compute-time metrics."""

    requests: int
    samples: int
    compute_s: float
    queue_s: float  # how long the oldest request of the batch waited


class Batcher:
    """Queues requests of one model version and runs them in batches on worker threads.

    Args:
        run: The model call, ``feeds -> outputs``; thread-safe; raises on failure.
        max_batch_size: Most samples per run; 1 turns merging off.
        max_queue_delay_ms: Longest a batch waits to reach a preferred size (only with preferred_batch_sizes).
        max_queue_size: Most waiting requests; past it, submit raises QueueFullError.
        preferred_batch_sizes: Batch sizes worth waiting for. Defaults to none (never wait).
        instances: Runs in flight at once (worker threads). Defaults to 1.
        batchable: False for models without a batch dim: every request runs alone. Defaults to True.
        on_batch: Called with a BatchStats after every run, on the event loop. Defaults to None.
        name: For the worker threads' names.
    """

    def __init__(self, run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], *, max_batch_size: int,
                 max_queue_delay_ms: float, max_queue_size: int, preferred_batch_sizes: tuple[int, ...] = (),
                 instances: int = 1, batchable: bool = True, on_batch: Callable[[BatchStats], None] | None = None,
                 name: str = "model") -> None:
        self.run = run
        self.max_batch_size = max_batch_size if batchable else 1
        self.max_queue_delay_s = max_queue_delay_ms / 1000
        self.max_queue_size = max_queue_size
        self.preferred_batch_sizes = tuple(sorted(p for p in preferred_batch_sizes if p <= self.max_batch_size))
        self.instances = instances
        self.batchable = batchable
        self.on_batch = on_batch
        self.queue: deque[_Pending] = deque()
        self.running = 0  # batches in flight
        self.closed = False
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=f"mpack-{name}")
        self._timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def full(self) -> bool:
        return len(self.queue) >= self.max_queue_size

    async def submit(self, feeds: dict[str, np.ndarray], size: int, key: tuple) -> dict[str, np.ndarray]:
        """Queue one request and wait for its outputs (the rows of the batch that belong to it).

        Raises:
            QueueFullError: max_queue_size requests are already waiting.
            ServingError: the model failed on this request.
        """
        if self.closed:
            raise UnavailableError("the server is shutting down")
        if len(self.queue) >= self.max_queue_size:
            raise QueueFullError(f"queue full ({self.max_queue_size} requests waiting); retry later")
        future = asyncio.get_running_loop().create_future()
        self.queue.append(_Pending(feeds, size, key, future))
        self._idle.clear()
        self._dispatch()
        return await future

    async def drain(self) -> None:
        """Wait until nothing is queued or running, then stop the worker threads; later submits are refused."""
        while self.queue or self.running:
            self._idle.clear()
            await self._idle.wait()
        self.closed = True
        self._executor.shutdown(wait=False)

    # ---- scheduling: event loop only ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while self.running < self.instances and self.queue:
            batch = self._take()
            if batch is None:
                break
            self.running += 1
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            queue_s = started - batch[0].enqueued
            done = loop.run_in_executor(self._executor, self._execute, batch)
            done.add_done_callback(lambda f, b=batch, q=queue_s: self._finished(b, q, f))

    def _take(self) -> list[_Pending] | None:
        """Form the next batch from the queue (see the module docstring), or None to wait for more requests."""
        head = self.queue[0]
        if not self.batchable or self.max_batch_size == 1:
            return [self.queue.popleft()]
        chosen, total = [], 0
        for pending in self.queue:
            if pending.key == head.key and total + pending.size <= self.max_batch_size:
                chosen.append(pending)
                total += pending.size
                if total == self.max_batch_size:
                    break
        if self.preferred_batch_sizes:
            reachable = [p for p in self.preferred_batch_sizes if p <= total]
            if not reachable and total < self.max_batch_size:
                wait = head.enqueued + self.max_queue_delay_s - time.perf_counter()
                if wait > 0:
                    self._arm_timer(wait)
                    return None
            elif reachable and total not in self.preferred_batch_sizes:
                limit, kept, total = reachable[-1], [], 0
                for pending in chosen:
                    if total + pending.size > limit:
                        break
                    kept.append(pending)
                    total += pending.size
                chosen = kept or chosen[:1]
        if len(chosen) == len(self.queue):
            self.queue.clear()
        else:
            ids = {id(p) for p in chosen}
            self.queue = deque(p for p in self.queue if id(p) not in ids)
        return chosen

    def _arm_timer(self, delay: float) -> None:
        if self._timer is None:
            def fire() -> None:
                self._timer = None
                self._dispatch()

            self._timer = asyncio.get_running_loop().call_later(delay, fire)

    def _finished(self, batch: list[_Pending], queue_s: float, done: asyncio.Future) -> None:
        self.running -= 1
        try:
            results, compute_s = done.result()
        except BaseException as exc:  # noqa: BLE001 - an executor failure must still answer every request
            results, compute_s = [exc] * len(batch), 0.0
        for pending, result in zip(batch, results):
            if pending.future.done():  # the client went away and its handler was cancelled
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)
        if self.on_batch is not None:
            self.on_batch(BatchStats(len(batch), sum(p.size for p in batch), compute_s, queue_s))
        self._dispatch()
        if not self.queue and not self.running:
            self._idle.set()

    # ---- worker threads ----------------------------------------------------------------------------------------

    def _execute(self, batch: list[_Pending]) -> tuple[list, float]:
        started = time.perf_counter()
        if len(batch) == 1:
            return [self._run_one(batch[0])], time.perf_counter() - started
        feeds = {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
        try:
            outputs = self.run(feeds)
            total = sum(p.size for p in batch)
            for name, array in outputs.items():
                if array.ndim == 0 or array.shape[0] != total:
                    raise ServingError(f"output {name} has shape {list(array.shape)}, not batch-first with "
                                       f"{total} rows: this model cannot be batched (use max_batch_size 1)")
            results, offset = [], 0
            for pending in batch:
                results.append({name: array[offset:offset + pending.size] for name, array in outputs.items()})
                offset += pending.size
        except Exception:  # isolate the failing request(s): run each alone
            results = [self._run_one(p) for p in batch]
        return results, time.perf_counter() - started

    def _run_one(self, pending: _Pending) -> dict[str, np.ndarray] | BaseException:
        try:
            return self.run(pending.feeds)
        except Exception as exc:
            return exc
