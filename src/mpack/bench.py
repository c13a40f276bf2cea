"""``mpack bench``: latency and throughput per model, provider, batch size and thread count, side by side.

Models of one (provider, batch, threads) group are measured interleaved — one call of each in turn — so drift of
the machine (thermal, other load) hits all of them alike, and ratios against the first model are fair. Timing uses
``time.perf_counter_ns`` around each call after a warm-up. A saved result can serve as a baseline: rows slower
than it beyond ``max_regression`` fail, but only when the slowdown holds up under a noise guard (see
:func:`gate`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mpack import __version__, manifest
from mpack._optional import distribution_version, onnxruntime_distribution
from mpack.errors import ConfigError, InputFileError, MpackError, RegressionError, first_line
from mpack.inputs import random_feeds
from mpack.specs import TensorSpec, batch_dim_name, example_size, symbolic_dim_names

SCHEMA = 1
DEFAULT_BATCH_SIZES = (1, 8, 32)


@dataclass(frozen=True)
class BenchConfig:
    """What ``mpack bench`` was asked to measure.

    Args:
        models: ONNX files; the first is the reference for ratios.
        source: Also measure the first model's source framework model (from its manifest). Defaults to False.
        providers: ONNX Runtime providers (short names). Defaults to ("cpu",).
        batch_sizes: Defaults to (1, 8, 32).
        threads: intra-op thread counts; 0 means the runtime's default (all cores). Defaults to (0,).
        iterations: Timed calls per row. Defaults to 100.
        duration: Seconds per row instead of a count (the row stops at whichever of the two comes first when both
            are given). Defaults to None.
        warmup: Untimed calls per row first. Defaults to 10.
        concurrency: Threads calling one shared session at once (server-like load). Defaults to 1.
        seed: Seed of the inputs.
        baseline: A previous ``--json`` result to gate against.
        max_regression: Allowed slowdown of p50 and p90 against the baseline, e.g. 0.10 for 10%.
        retries: Re-measurements of a row that looks regressed before it counts as one (the noise guard).
    """

    models: tuple[Path, ...]
    source: bool = False
    providers: tuple[str, ...] = ("cpu",)
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    threads: tuple[int, ...] = (0,)
    iterations: int = 100
    duration: float | None = None
    warmup: int = 10
    concurrency: int = 1
    seed: int = 0
    baseline: Path | None = None
    max_regression: float = 0.10
    retries: int = 2


@dataclass
class Stats:
    """Latency figures of one row, in milliseconds, and throughput in samples per second."""

    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float
    std: float
    throughput: float
    calls: int
    p50_ci: tuple[float, float]

    @staticmethod
    def of(latencies_ms: list[float], batch: int, wall_s: float | None = None) -> Stats:
        """Figures of a list of call latencies; throughput from the wall time when calls overlapped."""
        a = np.sort(np.asarray(latencies_ms, dtype=np.float64))
        mean = float(a.mean())
        throughput = (batch * len(a) / wall_s) if wall_s else batch * 1000.0 / mean
        return Stats(mean=mean, p50=_pct(a, 50), p90=_pct(a, 90), p99=_pct(a, 99), min=float(a[0]),
                     max=float(a[-1]), std=float(a.std()), throughput=throughput, calls=len(a),
                     p50_ci=median_ci(a))


def _pct(sorted_ms: np.ndarray, q: float) -> float:
    return float(np.percentile(sorted_ms, q))


def median_ci(sorted_ms: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """A distribution-free 95% confidence interval of the median: the order statistics at n/2 ± z·√n/2."""
    n = len(sorted_ms)
    half = z * math.sqrt(n) / 2
    lo, hi = max(0, int(math.floor(n / 2 - half))), min(n - 1, int(math.ceil(n / 2 + half)))
    return float(sorted_ms[lo]), float(sorted_ms[hi])


@dataclass
class Row:
    model: str
    provider: str
    batch: int
    threads: int
    concurrency: int
    stats: Stats
    peak_rss_mb: float
    ratio_p50: float | None = None

    @property
    def key(self) -> tuple:
        return (self.model, self.provider, self.batch, self.threads, self.concurrency)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stats"]["p50_ci"] = list(self.stats.p50_ci)
        return d

    @staticmethod
    def from_dict(d: dict) -> Row:
        stats = dict(d["stats"])
        stats["p50_ci"] = tuple(stats.get("p50_ci", (stats["p50"], stats["p50"])))
        return Row(d["model"], d["provider"], d["batch"], d["threads"], d.get("concurrency", 1), Stats(**stats),
                   d.get("peak_rss_mb", 0.0), d.get("ratio_p50"))


@dataclass
class GateRow:
    key: tuple
    baseline_p50: float
    baseline_p90: float
    p50: float
    p90: float
    slowdown: float
    regressed: bool
    note: str = ""

    def to_dict(self) -> dict:
        return {"model": self.key[0], "provider": self.key[1], "batch": self.key[2], "threads": self.key[3],
                "concurrency": self.key[4], "baseline_p50": self.baseline_p50, "baseline_p90": self.baseline_p90,
                "p50": self.p50, "p90": self.p90, "slowdown": self.slowdown, "regressed": self.regressed,
                "note": self.note}


@dataclass
class BenchResult:
    rows: list[Row]
    environment: dict
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gate: list[GateRow] | None = None
    max_regression: float | None = None

    @property
    def passed(self) -> bool:
        return not self.gate or not any(g.regressed for g in self.gate)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "environment": self.environment, "rows": [r.to_dict() for r in self.rows],
                "skipped": self.skipped, "notes": self.notes,
                "gate": None if self.gate is None else {
                    "max_regression": self.max_regression, "passed": self.passed,
                    "rows": [g.to_dict() for g in self.gate]}}

    @staticmethod
    def load(path: Path) -> BenchResult:
        try:
            data = json.loads(path.read_text())
            return BenchResult([Row.from_dict(r) for r in data["rows"]], data.get("environment", {}))
        except FileNotFoundError:
            raise InputFileError(f"baseline {path} does not exist", hint="save one with mpack bench ... --json "
                                                                         "baseline.json") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InputFileError(f"baseline {path} is not an mpack bench result ({type(exc).__name__}: {exc})",
                                 hint="write it with mpack bench --json") from None


def environment(cfg: BenchConfig) -> dict:
    """What the figures depend on: CPU, cores, versions, providers, thread settings and threading env vars."""
    cpu = platform.processor()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = sorted(f for f in line.split(":", 1)[1].split()
                               if f.startswith(("avx", "sse4", "fma", "amx", "f16c")))
    except OSError:
        pass
    ort = onnxruntime_distribution()
    return {
        "cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": {"mpack": __version__, "onnxruntime": f"{ort[0]} {ort[1]}" if ort else None,
                     "torch": distribution_version("torch"), "tensorflow": distribution_version("tensorflow-cpu")
                     or distribution_version("tensorflow"), "numpy": distribution_version("numpy")},
        "providers": list(cfg.providers), "threads": list(cfg.threads), "concurrency": cfg.concurrency,
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("OMP_", "OPENBLAS_", "MKL_", "ORT_")) or k in ("CUDA_VISIBLE_DEVICES",)},
    }


@dataclass
class _Subject:
    label: str
    provider: str
    make: Callable[[int], Callable[[dict], object]]  # threads -> call(feed)
    specs: list[TensorSpec]


def _onnx_subject(path: Path, provider: str) -> _Subject:
    from mpack.backends.onnxruntime import session_from_onnx
    from mpack.onnx_io import read_facts

    specs = read_facts(path).inputs

    def make(threads: int):
        session = session_from_onnx(path, (provider,), threads or None)
        return lambda feed: session.run(None, feed)

    return _Subject(path.name, provider, make, specs)


def _source_subject(model: Path, notes: list[str]) -> _Subject:
    from mpack.onnx_io import read_facts
    from mpack.validate import source_runner_for

    facts = read_facts(model)
    runner, label = source_runner_for(model, manifest.load(model), facts.inputs, [o.name for o in facts.outputs],
                                      notes)

    def make(threads: int):
        if label.startswith("pytorch"):
            import torch

            torch.set_num_threads(threads or os.cpu_count() or 1)
        runner.activate()
        return runner.infer

    return _Subject(f"{label} (source)", "cpu", make, facts.inputs)


def feeds_for(specs: list[TensorSpec], batch: int, seed: int, label: str) -> dict[str, np.ndarray]:
    """Inputs at batch size ``batch``; other symbolic dims at their example sizes."""
    name = batch_dim_name(specs)
    if name is None:
        fixed = {s.shape[0] for s in specs if s.shape}
        if fixed and batch not in fixed:
            raise ConfigError("--batch-sizes", batch, f"{label} has a fixed batch dim of {sorted(fixed)[0]}",
                              hint=f"use --batch-sizes {sorted(fixed)[0]}, or convert with a dynamic batch axis")
        sizes = {}
    else:
        sizes = {d: (batch if d == name else example_size(specs, d)) for d in symbolic_dim_names(specs)}
    return random_feeds(specs, sizes, seed=seed)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time_interleaved(calls: list[Callable[[], object]], iterations: int, duration: float | None, warmup: int,
                      tick: Callable[[], None]) -> list[list[float]]:
    for _ in range(warmup):
        for call in calls:
            call()
    latencies: list[list[float]] = [[] for _ in calls]
    deadline = time.perf_counter() + duration if duration else None
    done = 0
    while (iterations == 0 or done < iterations) and (deadline is None or time.perf_counter() < deadline):
        for i, call in enumerate(calls):
            t0 = time.perf_counter_ns()
            call()
            latencies[i].append((time.perf_counter_ns() - t0) / 1e6)
        done += 1
        tick()
    return latencies


def _time_concurrent(call: Callable[[], object], concurrency: int, iterations: int, duration: float | None,
                     warmup: int, tick: Callable[[], None]) -> tuple[list[float], float]:
    """``concurrency`` threads share one session; each makes ``iterations`` calls (or runs for ``duration``)."""
    for _ in range(warmup):
        call()
    latencies: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + duration if duration else None

    def worker() -> None:
        n = 0
        while (iterations == 0 or n < iterations) and (deadline is None or time.perf_counter() < deadline):
            t0 = time.perf_counter_ns()
            call()
            elapsed = (time.perf_counter_ns() - t0) / 1e6
            with lock:
                latencies.append(elapsed)
            n += 1
            tick()

    workers = [threading.Thread(target=worker) for _ in range(concurrency)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return latencies, time.perf_counter() - start


def _check_config(cfg: BenchConfig) -> None:
    if not cfg.models:
        raise ConfigError("MODEL", None, "give at least one .onnx model")
    for model in cfg.models:
        if not Path(model).is_file():
            raise InputFileError(f"{model} does not exist", hint="give .onnx files written by mpack convert")
    if cfg.iterations < 0 or (cfg.iterations == 0 and not cfg.duration):
        raise ConfigError("--iterations", cfg.iterations, "must be positive (or give --duration)")
    if cfg.duration is not None and cfg.duration <= 0:
        raise ConfigError("--duration", cfg.duration, "must be positive")
    if cfg.warmup < 0:
        raise ConfigError("--warmup", cfg.warmup, "must be >= 0")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise ConfigError("--batch-sizes", list(cfg.batch_sizes), "must be positive integers")
    if min(cfg.threads) < 0:
        raise ConfigError("--threads", list(cfg.threads), "must be >= 0 (0: the runtime's default)")
    if cfg.concurrency < 1:
        raise ConfigError("--concurrency", cfg.concurrency, "must be >= 1")
    if not 0 <= cfg.max_regression:
        raise ConfigError("--max-regression", cfg.max_regression, "must be >= 0")


def _subjects(cfg: BenchConfig, provider: str, notes: list[str]) -> list[_Subject]:
    subjects = [_onnx_subject(Path(m), provider) for m in cfg.models]
    if cfg.source and provider == "cpu":
        subjects.insert(0, _source_subject(Path(cfg.models[0]), notes))
    names = [s.label for s in subjects]
    if len(set(names)) != len(names):  # same file name in two folders: use the paths
        for s, m in zip(subjects[-len(cfg.models):], cfg.models):
            s.label = str(m)
    return subjects


def _check_providers(cfg: BenchConfig, skipped: list[str]) -> list[str]:
    """Providers that run here; a known provider missing from this build is skipped with a note."""
    import onnxruntime as ort

    from mpack.backends.onnxruntime import PROVIDERS

    available = ort.get_available_providers()
    usable = []
    for short in cfg.providers:
        full = PROVIDERS.get(short.lower())
        if full is None:
            known = ", ".join(k for k, v in PROVIDERS.items() if v in available)
            raise ConfigError("--providers", short, "is not a provider mpack knows", hint=f"available here: {known}")
        if full not in available:
            skipped.append(f"provider {short}: not available in this ONNX Runtime build")
            continue
        usable.append(short.lower())
    if not usable:
        raise ConfigError("--providers", ",".join(cfg.providers), "none of them is available here",
                          hint="use --providers cpu")
    return usable


def measure(cfg: BenchConfig, progress: Callable[[int], Callable[[], None]] | None = None,
            only: set[tuple] | None = None, notes: list[str] | None = None) -> tuple[list[Row], list[str]]:
    """Measure every (provider, threads, batch) group; ``only`` limits it to the given row keys.

    Returns:
        The rows, and the comparisons skipped (with why).
    """
    skipped: list[str] = []
    providers = _check_providers(cfg, skipped)
    plan = []
    for provider in providers:
        subjects = _subjects(cfg, provider, notes if notes is not None else [])
        for threads in cfg.threads:
            for batch in cfg.batch_sizes:
                chosen = [s for s in subjects
                          if only is None or (s.label, provider, batch, threads, cfg.concurrency) in only]
                if chosen:
                    plan.append((provider, threads, batch, chosen))
    per_row = cfg.iterations if cfg.iterations else 1
    total = sum(len(p[3]) if cfg.concurrency > 1 else 1 for p in plan) * per_row * max(1, cfg.concurrency)
    tick = progress(total) if progress else (lambda: None)
    rows: list[Row] = []
    for provider, threads, batch, subjects in plan:
        feeds = [feeds_for(s.specs, batch, cfg.seed, s.label) for s in subjects]
        calls = []
        for s, feed in zip(subjects, feeds):
            run = s.make(threads)
            calls.append(lambda run=run, feed=feed: run(feed))
        for s, call in zip(subjects, calls):  # one untimed call each: a model that cannot run here says so
            try:
                call()
            except MpackError:
                raise
            except Exception as exc:  # ORT's own error types: the model fails on these inputs
                raise ConfigError("--batch-sizes", batch, f"{s.label} fails to run at batch {batch} on {provider}: "
                                  f"{first_line(exc, 200)}") from None
        if cfg.concurrency == 1:
            results = [(lat, None) for lat in _time_interleaved(calls, cfg.iterations, cfg.duration, cfg.warmup,
                                                                 tick)]
        else:  # shared-session load is measured one model at a time: the threads would compete otherwise
            results = [_time_concurrent(call, cfg.concurrency, cfg.iterations, cfg.duration, cfg.warmup, tick)
                       for call in calls]
        for s, (lat, wall) in zip(subjects, results):
            rows.append(Row(s.label, provider, batch, threads, cfg.concurrency, Stats.of(lat, batch, wall),
                            _peak_rss_mb()))
    _ratios(rows)
    return rows, skipped


def _ratios(rows: list[Row]) -> None:
    """p50 of each row over the first model's p50 in the same group (>1: slower than the first)."""
    first: dict[tuple, float] = {}
    for row in rows:
        group = (row.provider, row.batch, row.threads, row.concurrency)
        first.setdefault(group, row.stats.p50)
        row.ratio_p50 = row.stats.p50 / first[group] if first[group] else None


def gate(rows: list[Row], baseline: list[Row], bound: float) -> list[GateRow]:
    """Compare rows with the baseline's rows of the same key.

    A row regresses when both its p50 and its p90 exceed the baseline's by more than ``bound``, and the lower end
    of its p50's 95% confidence interval does too — so a few slow calls do not fail it.
    """
    base = {r.key: r for r in baseline}
    out = []
    for row in rows:
        b = base.get(row.key)
        if b is None:
            continue
        limit50, limit90 = b.stats.p50 * (1 + bound), b.stats.p90 * (1 + bound)
        regressed = row.stats.p50 > limit50 and row.stats.p90 > limit90 and row.stats.p50_ci[0] > limit50
        out.append(GateRow(row.key, b.stats.p50, b.stats.p90, row.stats.p50, row.stats.p90,
                           row.stats.p50 / b.stats.p50 - 1 if b.stats.p50 else float("inf"), regressed))
    return out


def run(cfg: BenchConfig, progress: Callable[[int], Callable[[], None]] | None = None) -> BenchResult:
    """Measure, compare with the baseline (re-measuring suspect rows), and record a summary in each manifest.

    Raises:
        RegressionError: rows slower than the baseline beyond the bound after the noise guard (exit 6).
    """
    _check_config(cfg)
    baseline = BenchResult.load(cfg.baseline) if cfg.baseline else None
    notes: list[str] = []
    rows, skipped = measure(cfg, progress, notes=notes)
    result = BenchResult(rows, environment(cfg), skipped, notes)
    _warn_provider_mismatch(cfg, result)
    if baseline is not None:
        result.max_regression = cfg.max_regression
        result.gate = gate(rows, baseline.rows, cfg.max_regression)
        if not result.gate:
            result.notes.append("no row matches the baseline (model, provider, batch, threads, concurrency): "
                                "nothing to gate")
        for attempt in range(cfg.retries):
            suspects = {g.key for g in result.gate if g.regressed}
            if not suspects:
                break
            again, _ = measure(cfg, None, only=suspects)
            retried = {r.key: r for r in again}
            for g in result.gate:
                r = retried.get(g.key)
                if g.regressed and r is not None:
                    [fresh] = gate([r], baseline.rows, cfg.max_regression)
                    fresh.note = f"re-measured {attempt + 1}x"
                    result.gate[result.gate.index(g)] = fresh
                    # The rows report what the gate judged, so a saved --json makes a fair next baseline.
                    result.rows = [r if row.key == r.key else row for row in result.rows]
        _ratios(result.rows)
    _record(cfg, result)
    if not result.passed:
        slow = [g for g in result.gate if g.regressed]
        raise RegressionError(
            result, f"{len(slow)} row(s) slower than the baseline by more than {cfg.max_regression:.0%}: " + "; ".join(
                f"{g.key[0]} batch {g.key[2]} p50 {g.p50:.3f} ms vs {g.baseline_p50:.3f} ms (+{g.slowdown:.0%})"
                for g in slow[:3]), hint="look at the rows above; re-run on a quiet machine to confirm")
    return result


def _warn_provider_mismatch(cfg: BenchConfig, result: BenchResult) -> None:
    from mpack.optimize import provider_mismatch

    for model in cfg.models:
        for provider in cfg.providers:
            warning = provider_mismatch(model, provider)
            if warning:
                result.notes.append(warning)


def _record(cfg: BenchConfig, result: BenchResult) -> None:
    for model in cfg.models:
        path = Path(model)
        if manifest.load(path) is None:
            continue
        rows = [{"provider": r.provider, "batch": r.batch, "threads": r.threads, "concurrency": r.concurrency,
                 "p50_ms": r.stats.p50, "p90_ms": r.stats.p90, "throughput": r.stats.throughput}
                for r in result.rows if r.model in (path.name, str(path))]
        manifest.append_step(path, "bench", {"rows": rows, "cpu": result.environment["cpu"],
                                             "onnxruntime": result.environment["versions"]["onnxruntime"]})
