"""Deployment patterns for unversioned requests: canary (weighted, with automatic rollback), A/B (sticky per key)
and shadow (mirrored, compared, never answered).

Pure logic and small state only; the engine does the I/O.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpack.serving.config import ModelSpec, RollbackSpec

log = logging.getLogger("mpack.serving")


def sticky_bucket(key: str) -> float:
    """A stable number in [0, 1) for a routing key: the same user lands on the same variant across requests,
    processes and restarts (Python's own hash() is salted per process, so it cannot be used)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


@dataclass
class RoutingState:
    """The live, admin-changeable part of a model's routing."""

    primary: str
    canary_version: str | None = None
    canary_weight: float = 0.0
    rolled_back: str | None = None  # why the canary was rolled back, if it was
    ab_split: tuple[tuple[str, float], ...] = ()
    ab_key_header: str = "x-user-id"
    shadow_version: str | None = None


class Router:
    """Chooses the version for an unversioned request.

    Canary: each request goes to the canary with probability ``canary_weight`` (not sticky: a canary is a sample
    of traffic). A/B: the ``key_header`` value (``x-user-id`` by default) picks the variant by a stable hash, so a
    user keeps seeing one variant; requests without the header are split at random.
    """

    def __init__(self, spec: ModelSpec, rng: random.Random | None = None) -> None:
        self.state = RoutingState(
            primary=spec.primary,
            canary_version=spec.canary.version if spec.canary else None,
            canary_weight=spec.canary.weight if spec.canary else 0.0,
            ab_split=spec.ab.split if spec.ab else (),
            ab_key_header=spec.ab.key_header if spec.ab else "x-user-id",
            shadow_version=spec.shadow.version if spec.shadow else None)
        self.guard = RollbackGuard(spec.canary.rollback) if spec.canary and spec.canary.rollback else None
        self._random = (rng or random.Random()).random

    def choose(self, key: str | None) -> tuple[str, str]:
        """Returns (version, route) with route one of primary, canary, ab."""
        state = self.state
        if state.ab_split:
            point = (sticky_bucket(key) if key else self._random()) * sum(w for _, w in state.ab_split)
            for version, weight in state.ab_split:
                if point < weight:
                    return version, "ab"
                point -= weight
            return state.ab_split[-1][0], "ab"
        if state.canary_version is not None and state.canary_weight > 0 and self._random() < state.canary_weight:
            return state.canary_version, "canary"
        return state.primary, "primary"

    def describe(self) -> dict:
        state = self.state
        result: dict = {"primary": state.primary}
        if state.canary_version is not None:
            result["canary"] = {"version": state.canary_version, "weight": state.canary_weight,
                                "rolled_back": state.rolled_back}
            if self.guard is not None:
                result["canary"]["rollback"] = self.guard.describe()
        if state.ab_split:
            result["ab"] = {"split": dict(state.ab_split), "key_header": state.ab_key_header}
        if state.shadow_version is not None:
            result["shadow"] = {"version": state.shadow_version}
        return result


class RollbackGuard:
    """Watches the canary's outcomes over a sliding time window and trips once a bound is exceeded."""

    # The p99 is a percentile over the whole window (up to 100k latencies): recomputing it on every canary request
    # cost more than the request. It is re-evaluated at most once a P99_INTERVAL_S, or after P99_EVERY new outcomes.
    P99_INTERVAL_S = 1.0
    P99_EVERY = 100

    def __init__(self, spec: RollbackSpec) -> None:
        self.spec = spec
        self.window: deque[tuple[float, bool, float]] = deque()  # (time, ok, latency_s)
        self.errors = 0
        self._p99_at: float | None = None  # when the p99 was last evaluated
        self._since_p99 = 0  # outcomes recorded since

    def record(self, ok: bool, latency_s: float, now: float | None = None) -> str | None:
        """Add one canary outcome; returns the reason when the canary must be rolled back, else None."""
        now = time.monotonic() if now is None else now
        self.window.append((now, ok, latency_s))
        self.errors += not ok
        horizon = now - self.spec.window_s
        while self.window and self.window[0][0] < horizon:
            self.errors -= not self.window.popleft()[1]
        while len(self.window) > 100_000:  # bound the memory on very busy canaries
            self.errors -= not self.window.popleft()[1]
        count = len(self.window)
        if count < self.spec.min_requests:
            return None
        if self.spec.max_error_rate is not None and self.errors / count > self.spec.max_error_rate:
            return (f"error rate {self.errors / count:.1%} over the last {count} canary requests exceeds "
                    f"{self.spec.max_error_rate:.1%}")
        self._since_p99 += 1
        if self.spec.max_p99_ms is not None and (
                self._p99_at is None or now - self._p99_at >= self.P99_INTERVAL_S or self._since_p99 >= self.P99_EVERY):
            self._p99_at, self._since_p99 = now, 0
            p99 = self._p99_ms()
            if p99 > self.spec.max_p99_ms:
                return f"p99 {p99:.1f} ms over the last {count} canary requests exceeds {self.spec.max_p99_ms:g} ms"
        return None

    def _p99_ms(self) -> float:
        return float(np.percentile([w[2] for w in self.window], 99)) * 1000

    def reset(self) -> None:
        self.window.clear()
        self.errors = 0
        self._p99_at, self._since_p99 = None, 0

    def describe(self) -> dict:
        return {"max_error_rate": self.spec.max_error_rate, "max_p99_ms": self.spec.max_p99_ms,
                "window_s": self.spec.window_s, "min_requests": self.spec.min_requests,
                "window_requests": len(self.window), "window_errors": self.errors}


def compare_outputs(primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray]) -> dict:
    """Shadow vs primary, per output: max abs difference, cosine similarity, top-1 agreement (argmax over the last
    axis, for outputs with a class axis). Returns {"outputs": {name: {...}}, "max_abs", "cosine", "top1_agree",
    "top1_samples"} with the worst values across outputs."""
    report: dict = {"outputs": {}, "max_abs": 0.0, "cosine": 1.0, "top1_agree": 0, "top1_samples": 0}
    for name, reference in primary.items():
        candidate = shadow.get(name)
        if candidate is None or candidate.shape != reference.shape:
            report["outputs"][name] = {"error": "missing" if candidate is None else
                                       f"shape {list(candidate.shape)} vs {list(reference.shape)}"}
            report["max_abs"], report["cosine"] = float("inf"), float("nan")
            continue
        a = reference.astype(np.float64, copy=False).ravel()
        b = candidate.astype(np.float64, copy=False).ravel()
        max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
        norm = float(np.linalg.norm(a) * np.linalg.norm(b))
        cosine = float(np.dot(a, b) / norm) if norm > 0 else (1.0 if max_abs == 0 else 0.0)
        entry = {"max_abs": max_abs, "cosine": cosine}
        if reference.ndim >= 2 and reference.shape[-1] > 1:
            agree = int(np.sum(np.argmax(reference, axis=-1) == np.argmax(candidate, axis=-1)))
            samples = int(np.prod(reference.shape[:-1]))
            entry["top1_agreement"] = agree / samples if samples else 1.0
            report["top1_agree"] += agree
            report["top1_samples"] += samples
        report["outputs"][name] = entry
        report["max_abs"] = max(report["max_abs"], max_abs)
        report["cosine"] = min(report["cosine"], cosine)
    return report


class JsonlLog:
    """Appends JSON lines from a background thread, so the event loop never waits on the disk. When the writer
    falls behind by ``max_pending`` lines, new lines are dropped and counted, never queued without bound."""

    def __init__(self, path: Path, max_pending: int = 10_000) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue = queue.Queue(max_pending)
        self.dropped = 0
        self._thread = threading.Thread(target=self._write, name="mpack-shadow-log", daemon=True)
        self._thread.start()

    def append(self, record: dict) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _write(self) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            while True:
                record = self._queue.get()
                if record is None:
                    break
                try:
                    handle.write(json.dumps(record, default=str) + "\n")
                    if self._queue.empty():
                        handle.flush()
                except Exception:  # logging never raises into the server
                    log.exception("shadow log write failed")
