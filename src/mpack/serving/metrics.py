"""Prometheus metrics, written by hand in the text exposition format (no client library in the image).

Metrics are updated on the event loop thread only, so they need no locks.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Callable, Iterable

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DIFF_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _escape(value: str) -> str:
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = labels

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[tuple, float] = {}

    def inc(self, labels: tuple = (), amount: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def get(self, labels: tuple = ()) -> float:
        return self.values.get(labels, 0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}"
                                for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    """A gauge set directly, or read at scrape time from ``collect`` (label values → value)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 collect: Callable[[], Iterable[tuple[tuple, float]]] | None = None) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[tuple, float] = {}
        self.collect = collect

    def set(self, labels: tuple, value: float) -> None:
        self.values[labels] = value

    def render(self) -> list[str]:
        items = dict(self.values)
        if self.collect is not None:
            items.update(self.collect())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}"
                                for k, v in sorted(items.items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(buckets)
        self.series: dict[tuple, list] = {}  # labels → [per-bucket counts..., +Inf count, sum]

    def observe(self, labels: tuple, value: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0] * (len(self.buckets) + 1) + [0.0]
        series[bisect_left(self.buckets, value)] += 1
        series[-1] += value

    def count(self, labels: tuple) -> int:
        series = self.series.get(labels)
        return sum(series[:-1]) if series else 0

    def bucket_counts(self, labels: tuple) -> dict[float, int]:
        """Non-cumulative counts per upper bound (inf for the last), for tests and summaries."""
        series = self.series.get(labels) or [0] * (len(self.buckets) + 2)
        return dict(zip((*self.buckets, float("inf")), series[:-1]))

    def render(self) -> list[str]:
        lines = self.header()
        for labels, series in sorted(self.series.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, float("inf")), series[:-1]):
                cumulative += count
                le = 'le="' + ("+Inf" if bound == float("inf") else _number(bound)) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, labels, le)} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_number(series[-1])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, labels)} {cumulative}")
        return lines


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric):
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class ServingMetrics:
    """Every metric the server exports. Labels: model, version, and route (how an unversioned request reached the
    version: primary, canary, ab, or direct for a versioned URL)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        mvr = ("model", "version", "route")
        self.requests = r.add(Counter("mpack_requests_total", "Inference requests answered, errors included.", mvr))
        self.errors = r.add(Counter("mpack_request_errors_total", "Inference requests answered with an error.",
                                    (*mvr, "code")))
        self.latency = r.add(Histogram("mpack_request_duration_seconds",
                                       "Inference latency in the server: queue, batch and run.", mvr))
        self.batch_size = r.add(Histogram("mpack_batch_size", "Samples per session.run.", ("model", "version"),
                                          BATCH_BUCKETS))
        self.batch_requests = r.add(Histogram("mpack_batch_requests", "Requests merged per session.run.",
                                              ("model", "version"), BATCH_BUCKETS))
        self.compute = r.add(Histogram("mpack_compute_duration_seconds", "Time of one batched session.run.",
                                       ("model", "version")))
        self.queue_wait = r.add(Histogram("mpack_queue_duration_seconds",
                                          "Time the oldest request of a batch waited.", ("model", "version")))
        self.rejected = r.add(Counter("mpack_queue_rejected_total", "Requests refused because the queue was full.",
                                      ("model", "version")))
        self.queue_depth = r.add(Gauge("mpack_queue_depth", "Requests waiting.", ("model", "version")))
        self.canary_weight = r.add(Gauge("mpack_canary_weight", "Fraction of routed traffic sent to the canary.",
                                         ("model", "version")))
        self.rollbacks = r.add(Counter("mpack_canary_rollbacks_total", "Automatic canary rollbacks.",
                                       ("model", "version")))
        self.shadow_requests = r.add(Counter("mpack_shadow_requests_total", "Requests mirrored to a shadow version.",
                                             ("model", "version")))
        self.shadow_errors = r.add(Counter("mpack_shadow_errors_total", "Shadow runs that failed.",
                                           ("model", "version")))
        self.shadow_dropped = r.add(Counter("mpack_shadow_dropped_total",
                                            "Mirrored requests dropped because the shadow's queue was full.",
                                            ("model", "version")))
        self.shadow_latency = r.add(Histogram("mpack_shadow_duration_seconds", "Shadow version latency.",
                                              ("model", "version")))
        self.shadow_max_abs = r.add(Histogram("mpack_shadow_max_abs_diff",
                                              "Max absolute difference shadow vs primary, per request.",
                                              ("model", "version"), DIFF_BUCKETS))
        self.shadow_top1_agree = r.add(Counter("mpack_shadow_top1_agree_total",
                                               "Samples whose top-1 class equals the primary's.", ("model", "version")))
        self.shadow_top1_samples = r.add(Counter("mpack_shadow_top1_samples_total",
                                                 "Samples compared for top-1 agreement.", ("model", "version")))
        self.jobs_submitted = r.add(Counter("mpack_jobs_submitted_total", "Jobs accepted onto the queue (202).",
                                            ("model", "version")))
        self.jobs_rejected = r.add(Counter("mpack_jobs_rejected_total",
                                           "Jobs refused: reason invalid (400), full (503) or unavailable (Redis).",
                                           ("model", "reason")))
        self.jobs_completed = r.add(Counter("mpack_jobs_completed_total",
                                            "Jobs this server accepted and then saw finish: status done or failed.",
                                            ("model", "version", "status")))
        self.jobs_pending = r.add(Gauge("mpack_jobs_pending", "Jobs this server accepted that have not finished."))
        self.job_callbacks = r.add(Counter("mpack_job_callbacks_total",
                                           "Callback POSTs: outcome delivered or failed (after the retries).",
                                           ("outcome",)))
        self.health = r.add(Gauge("mpack_health", "1 for the server's current health state.", ("state",)))
        self.http = r.add(Counter("mpack_http_responses_total", "HTTP responses by status code (all endpoints).",
                                  ("code",)))

    def render(self) -> str:
        return self.registry.render()
