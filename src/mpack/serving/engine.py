"""The protocol-free core that REST and gRPC share: loaded versions, routing, batching, shadowing, metrics, health."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mpack.serving.batcher import Batcher, BatchStats, QueueFullError
from mpack.serving.config import ModelSpec, ServeConfig
from mpack.serving.errors import (
    ForbiddenError, InvalidInputError, ModelNotFoundError, ModelRunError, ServeConfigError, ServingError,
    UnavailableError)
from mpack.serving.metrics import ServingMetrics
from mpack.serving.model import ModelVersion, OrtRunner, RunnerFactory
from mpack.serving.protocol import InferRequest, InferResponse
from mpack.serving.routing import JsonlLog, Router, compare_outputs

log = logging.getLogger("mpack.serving")

SHADOW_QUEUE_SIZE = 64  # most mirrored requests waiting for the shadow's own thread; more are dropped (counted)


class Health(enum.Enum):
    """The server's state, as /v2/health/* and the mpack_health metric report it.

    STARTING: listening, models loading or warming up (live, not ready). READY: serving. BUSY: serving, but a
    queue is full, so some requests get 503 (still ready: taking a busy replica out of rotation shifts its load to
    the others and makes them busy too). DRAINING: SIGTERM received, finishing in-flight requests (live, not
    ready). FAILED: a model could not be loaded (not live).
    """

    STARTING = "STARTING"
    READY = "READY"
    BUSY = "BUSY"
    DRAINING = "DRAINING"
    FAILED = "FAILED"


@dataclass
class LoadedVersion:
    model: ModelVersion
    batcher: Batcher


@dataclass
class LoadedModel:
    spec: ModelSpec
    versions: dict[str, LoadedVersion]
    router: Router
    shadow_log: JsonlLog | None = None
    shadow_batcher: Batcher | None = None  # mirrored traffic's own queue and thread, apart from the version's


def default_runner_factory(path: Path, providers: tuple[str, ...], threads: int) -> OrtRunner:
    return OrtRunner(path, providers, threads)


class Engine:
    """Loads the configured models and answers inference requests.

    Args:
        config: The server configuration.
        runner_factory: Builds a runner per (path, providers, threads). Defaults to ONNX Runtime sessions; tests
            pass wrappers (a runner that sleeps or raises).
    """

    def __init__(self, config: ServeConfig, runner_factory: RunnerFactory | None = None) -> None:
        self.config = config
        self.runner_factory = runner_factory or default_runner_factory
        self.metrics = ServingMetrics()
        self.models: dict[str, LoadedModel] = {}
        self.state = Health.STARTING
        self.failure: str | None = None
        self._shadow_tasks: set[asyncio.Task] = set()
        self.metrics.queue_depth.collect = self._queue_depths
        self.metrics.health.collect = lambda: [((s.value,), float(self.health is s)) for s in Health]

    # ---- life cycle ---------------------------------------------------------------------------------------------

    async def load(self) -> None:
        """Load and warm up every version (in a thread: ONNX Runtime blocks), then report READY.

        Raises:
            ServeConfigError: a model cannot be loaded or fails its warm-up; the state is then FAILED.
        """
        try:
            for spec in self.config.models:
                self.models[spec.name] = await asyncio.to_thread(self._load_model, spec)
            await asyncio.to_thread(self._check_routed_versions)
        except ServeConfigError as exc:
            self.state, self.failure = Health.FAILED, exc.message
            raise
        self.state = Health.READY

    def _load_model(self, spec: ModelSpec) -> LoadedModel:
        versions = {}
        for version, path in spec.versions:
            started = time.perf_counter()
            runner = self.runner_factory(path, self.config.providers, self.config.threads)
            model = ModelVersion(spec.name, version, runner, spec.batching.max_batch_size)
            if self.config.warmup:
                for size in sorted({1, model.max_batch_size}):
                    try:
                        model.run(model.warmup_feeds(size))
                    except ServingError as exc:
                        raise ServeConfigError(f"model {spec.name} version {version}", str(path),
                                               f"fails its warm-up run (batch {size} of zeros): {exc.message}",
                                               hint="check the model with mpack validate") from None
            b = spec.batching
            labels = (spec.name, version)
            batcher = Batcher(model.run, max_batch_size=model.max_batch_size, max_queue_delay_ms=b.max_queue_delay_ms,
                              max_queue_size=b.max_queue_size, preferred_batch_sizes=b.preferred_batch_sizes,
                              instances=b.instances, batchable=model.batchable,
                              on_batch=lambda stats, labels=labels: self._on_batch(labels, stats),
                              name=f"{spec.name}-{version}")
            versions[version] = LoadedVersion(model, batcher)
            log.info("loaded model", extra={"fields": {
                "model": spec.name, "version": version, "path": str(path), "providers": list(runner.providers),
                "max_batch_size": model.max_batch_size, "load_ms": round((time.perf_counter() - started) * 1e3, 1)}})
        loaded = LoadedModel(spec, versions, Router(spec))
        if spec.shadow is not None:
            # Its own small queue and worker thread on the shadow version's session: mirrored traffic never takes
            # a place in the queue of requests addressed to that version (/versions/{v}), nor waits behind them.
            model = versions[spec.shadow.version].model
            loaded.shadow_batcher = Batcher(
                model.run, max_batch_size=model.max_batch_size, max_queue_delay_ms=spec.batching.max_queue_delay_ms,
                max_queue_size=min(spec.batching.max_queue_size, SHADOW_QUEUE_SIZE), instances=1,
                batchable=model.batchable, name=f"{spec.name}-{spec.shadow.version}-shadow")
        if spec.shadow is not None and spec.shadow.log is not None:
            loaded.shadow_log = JsonlLog(spec.shadow.log)
        if spec.canary is not None:
            self.metrics.canary_weight.set((spec.name, spec.canary.version), spec.canary.weight)
        return loaded

    def _check_routed_versions(self) -> None:
        """Versions that share routed traffic must take the same inputs, or a request valid for one fails on the
        other depending on the dice."""
        for loaded in self.models.values():
            state = loaded.router.state
            routed = {state.primary, state.canary_version, state.shadow_version, *(v for v, _ in state.ab_split)}
            routed.discard(None)
            reference = loaded.versions[state.primary].model.inputs
            for version in routed:
                inputs = loaded.versions[version].model.inputs
                if [(t.name, t.datatype) for t in inputs] != [(t.name, t.datatype) for t in reference]:
                    raise ServeConfigError(f"model {loaded.spec.name} version {version}", loaded.spec.path(version),
                                           f"takes inputs {[t.name for t in inputs]}, the primary "
                                           f"{[t.name for t in reference]}: routed versions must take the same")

    async def drain(self, timeout: float) -> None:
        """Finish queued work and mirrored shadow requests (at most ``timeout`` seconds), then close the logs."""
        try:
            await asyncio.wait_for(asyncio.gather(
                *(v.batcher.drain() for m in self.models.values() for v in m.versions.values()),
                *list(self._shadow_tasks),
                *(m.shadow_batcher.drain() for m in self.models.values() if m.shadow_batcher is not None)), timeout)
        except asyncio.TimeoutError:
            log.warning("drain timed out", extra={"fields": {"timeout_s": timeout}})
        for loaded in self.models.values():
            if loaded.shadow_log is not None:
                await asyncio.to_thread(loaded.shadow_log.close)

    @property
    def health(self) -> Health:
        if self.state is Health.READY and any(v.batcher.full for m in self.models.values()
                                              for v in m.versions.values()):
            return Health.BUSY
        return self.state

    @property
    def live(self) -> bool:
        return self.state is not Health.FAILED

    @property
    def ready(self) -> bool:
        return self.health in (Health.READY, Health.BUSY)

    # ---- lookups ------------------------------------------------------------------------------------------------

    def find(self, name: str, version: str | None = None) -> tuple[LoadedModel, LoadedVersion]:
        """The model and the version a metadata request names (the primary when no version is given)."""
        loaded = self.models.get(name)
        if loaded is None:
            if self.state is Health.STARTING:
                raise UnavailableError(f"model {name} is not loaded yet: the server is starting")
            raise ModelNotFoundError(f"unknown model {name!r}", hint=f"served: {', '.join(self.models) or 'none'}")
        key = version or loaded.router.state.primary
        if key not in loaded.versions:
            raise ModelNotFoundError(f"model {name} has no version {version!r}",
                                     hint=f"versions: {', '.join(loaded.versions)}")
        return loaded, loaded.versions[key]

    def model_ready(self, name: str, version: str | None = None) -> bool:
        try:
            self.find(name, version)
        except ServingError:
            return False
        return self.ready

    def metadata(self, name: str, version: str | None = None) -> dict:
        loaded, target = self.find(name, version)
        return target.model.metadata(list(loaded.versions))

    def model_config(self, name: str, version: str | None = None) -> dict:
        loaded, target = self.find(name, version)
        b = loaded.spec.batching
        return target.model.model_config(b.preferred_batch_sizes, b.max_queue_delay_ms)

    def key_header(self, name: str) -> str | None:
        """The header (gRPC: metadata key) whose value makes A/B routing sticky, for a model with a split."""
        loaded = self.models.get(name)
        return loaded.router.state.ab_key_header if loaded is not None and loaded.router.state.ab_split else None

    def output_types(self, name: str, version: str) -> dict[str, str]:
        return {t.name: t.datatype for t in self.models[name].versions[version].model.outputs}

    # ---- inference ----------------------------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        """Route, check, queue and run one request; mirror it to the shadow version if there is one.

        Raises:
            ServingError: with its HTTP status / gRPC code; the request is counted as an error.
        """
        if self.state is not Health.READY:
            if self.state is Health.STARTING:
                raise UnavailableError("the server is starting: models are loading")
            if self.state is Health.FAILED:
                raise UnavailableError(f"the server failed: {self.failure}")
        loaded = self.models.get(request.model)
        if loaded is None:
            raise ModelNotFoundError(f"unknown model {request.model!r}",
                                     hint=f"served: {', '.join(self.models) or 'none'}")
        if request.version:
            if request.version not in loaded.versions:
                raise ModelNotFoundError(f"model {request.model} has no version {request.version!r}",
                                         hint=f"versions: {', '.join(loaded.versions)}")
            version, route = request.version, "direct"
        else:
            version, route = loaded.router.choose(request.routing_key)
        target = loaded.versions[version]
        labels = (request.model, version, route)
        started = time.perf_counter()
        try:
            _check_outputs(request, target)
            size, key = target.model.check(request.inputs)
            outputs = await target.batcher.submit(request.inputs, size, key)
        except ServingError as exc:
            self._count(labels, started, exc)
            if isinstance(exc, QueueFullError):
                self.metrics.rejected.inc((request.model, version))
            elif route == "canary" and (isinstance(exc, ModelRunError) or exc.http_status >= 500):
                # only the candidate's own failures count: a client's bad request or a full queue is no fault of it
                self._canary_outcome(loaded, False, time.perf_counter() - started)
            raise
        latency = time.perf_counter() - started
        self._count(labels, started, None)
        if route == "canary":
            self._canary_outcome(loaded, True, latency)
        shadow = loaded.router.state.shadow_version
        if shadow is not None and route != "direct" and shadow != version:
            self._mirror(loaded, shadow, request, outputs, version, latency)
        if request.outputs is not None:
            outputs = {name: outputs[name] for name in request.outputs}
        return InferResponse(request.model, version, outputs, request.id, route)

    def check(self, request: InferRequest) -> str:
        """What :meth:`infer` checks before queueing (state, model, version, outputs, input names, dtypes, shapes,
        batch size), without running: for requests answered later (the job endpoints). Not counted as inference.

        Returns:
            The version checked against: the request's, else the primary's (routing is not applied).

        Raises:
            ServingError: the error infer would answer.
        """
        if self.state is Health.STARTING:
            raise UnavailableError("the server is starting: models are loading")
        if self.state is Health.FAILED:
            raise UnavailableError(f"the server failed: {self.failure}")
        _, target = self.find(request.model, request.version)
        _check_outputs(request, target)
        target.model.check(request.inputs)
        return target.model.version

    def _count(self, labels: tuple, started: float, error: ServingError | None) -> None:
        m = self.metrics
        m.requests.inc(labels)
        m.latency.observe(labels, time.perf_counter() - started)
        if error is not None:
            m.errors.inc((*labels, str(error.http_status)))

    def _on_batch(self, labels: tuple, stats: BatchStats) -> None:
        m = self.metrics
        m.batch_size.observe(labels, stats.samples)
        m.batch_requests.observe(labels, stats.requests)
        m.compute.observe(labels, stats.compute_s)
        m.queue_wait.observe(labels, stats.queue_s)

    def _queue_depths(self):
        return [((name, version), float(v.batcher.queue_depth))
                for name, m in self.models.items() for version, v in m.versions.items()]

    # ---- canary -------------------------------------------------------------------------------------------------

    def _canary_outcome(self, loaded: LoadedModel, ok: bool, latency: float) -> None:
        router = loaded.router
        if router.guard is None or router.state.canary_weight == 0:
            return
        reason = router.guard.record(ok, latency)
        if reason is not None:
            version = router.state.canary_version
            router.state.canary_weight = 0.0
            router.state.rolled_back = reason
            self.metrics.rollbacks.inc((loaded.spec.name, version))
            self.metrics.canary_weight.set((loaded.spec.name, version), 0.0)
            log.warning("canary rolled back", extra={"fields": {"model": loaded.spec.name, "version": version,
                                                                "reason": reason}})

    def check_admin(self, token: str | None) -> None:
        """Raises ForbiddenError when an admin token is configured and ``token`` is not it, or when none is
        configured and the server listens beyond loopback (anyone who can reach it could reroute traffic)."""
        import hmac

        expected = self.config.admin_token
        if expected is None and not _is_loopback(self.config.host):
            raise ForbiddenError(f"admin endpoints are off on a server listening on {self.config.host} without an "
                                 "admin token: set --admin-token (MPACK_SERVE_ADMIN_TOKEN)")
        if expected is not None and not hmac.compare_digest((token or "").encode(), expected.encode()):
            raise ForbiddenError("admin endpoints need Authorization: Bearer <admin token>")

    def routing(self, name: str) -> dict:
        loaded, _ = self.find(name)
        return loaded.router.describe()

    def update_routing(self, name: str, change: dict, *, token: str | None = None) -> dict:
        """Apply an admin change: ``{"canary_weight": 0.25}``, ``{"ab_split": {"1": 30, "2": 70}}`` or
        ``{"primary": "2"}`` (promote). Setting a canary weight clears an earlier rollback.

        Raises:
            ForbiddenError: an admin token is configured and ``token`` differs.
            InvalidInputError: an unknown key or a bad value.
        """
        self.check_admin(token)
        from mpack.serving.config import fraction

        loaded, _ = self.find(name)
        state = loaded.router.state
        if not isinstance(change, dict) or not change:
            raise InvalidInputError("expected a JSON object with canary_weight, ab_split or primary")
        unknown = set(change) - {"canary_weight", "ab_split", "primary"}
        if unknown:
            raise InvalidInputError(f"unknown routing key(s) {', '.join(sorted(unknown))}",
                                    hint="keys are canary_weight, ab_split and primary")
        updates = {}
        try:
            if "primary" in change:
                primary = str(change["primary"])
                if primary not in loaded.versions:
                    raise InvalidInputError(f"model {name} has no version {primary!r}")
                updates["primary"] = primary
            if "canary_weight" in change:
                if state.canary_version is None:
                    raise InvalidInputError(f"model {name} has no canary version")
                updates["canary_weight"] = fraction("canary_weight", change["canary_weight"])
            if "ab_split" in change:
                split = change["ab_split"]
                if not state.ab_split or not isinstance(split, dict):
                    raise InvalidInputError(f"model {name} has no A/B split, or ab_split is not an object")
                parsed = tuple((str(v), float(w)) for v, w in split.items())
                if any(v not in loaded.versions for v, _ in parsed) or any(w < 0 for _, w in parsed) or \
                        sum(w for _, w in parsed) <= 0:
                    raise InvalidInputError(f"ab_split {split!r} must name versions of {name} with weights >= 0 "
                                            "and a positive total")
                updates["ab_split"] = parsed
        except ServeConfigError as exc:
            raise InvalidInputError(exc.message) from None
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"bad routing value: {exc}") from None
        for key, value in updates.items():
            setattr(state, key, value)
        if "canary_weight" in updates:
            state.rolled_back = None
            if loaded.router.guard is not None:
                loaded.router.guard.reset()
            self.metrics.canary_weight.set((name, state.canary_version), state.canary_weight)
        log.info("routing changed", extra={"fields": {"model": name, "change": change}})
        return loaded.router.describe()

    # ---- shadow -------------------------------------------------------------------------------------------------

    def _mirror(self, loaded: LoadedModel, version: str, request: InferRequest, outputs: dict, primary_version: str,
                primary_latency: float) -> None:
        # Started after the primary answered, so on a small machine the shadow never competes with this request
        # for the cores; its own queue and worker thread keep a slow shadow from holding anything of the primary's.
        task = asyncio.get_running_loop().create_task(
            self._shadow(loaded, version, request, outputs, primary_version, primary_latency))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, loaded: LoadedModel, version: str, request: InferRequest, primary_outputs: dict,
                      primary_version: str, primary_latency: float) -> None:
        labels = (loaded.spec.name, version)
        m = self.metrics
        record = {"ts": round(time.time(), 6), "model": loaded.spec.name, "primary_version": primary_version,
                  "shadow_version": version, "id": request.id, "primary_ms": round(primary_latency * 1e3, 3)}
        started = time.perf_counter()
        try:
            target = loaded.versions[version]
            size, key = target.model.check(request.inputs)
            batcher = loaded.shadow_batcher or target.batcher
            outputs = await batcher.submit(request.inputs, size, key)
        except QueueFullError:
            m.shadow_dropped.inc(labels)
            return
        except Exception as exc:  # noqa: BLE001 - nothing a shadow does may escape into the server
            m.shadow_requests.inc(labels)
            m.shadow_errors.inc(labels)
            record.update(shadow_ms=round((time.perf_counter() - started) * 1e3, 3),
                          error=getattr(exc, "message", None) or str(exc) or type(exc).__name__)
            self._shadow_record(loaded, record)
            return
        latency = time.perf_counter() - started
        try:
            report = await asyncio.to_thread(compare_outputs, primary_outputs, outputs)  # off the loop: big outputs
        except Exception as exc:  # noqa: BLE001
            m.shadow_requests.inc(labels)
            m.shadow_latency.observe(labels, latency)
            m.shadow_errors.inc(labels)
            record.update(shadow_ms=round(latency * 1e3, 3), error=f"comparison failed: {exc}")
            self._shadow_record(loaded, record)
            return
        m.shadow_latency.observe(labels, latency)
        m.shadow_max_abs.observe(labels, report["max_abs"])
        m.shadow_top1_agree.inc(labels, report["top1_agree"])
        m.shadow_top1_samples.inc(labels, report["top1_samples"])
        m.shadow_requests.inc(labels)  # N.B. last: whoever sees the request counted sees its comparison too
        record.update(shadow_ms=round(latency * 1e3, 3), max_abs=report["max_abs"], cosine=report["cosine"],
                      top1_agreement=(report["top1_agree"] / report["top1_samples"]
                                      if report["top1_samples"] else None),
                      outputs=report["outputs"])
        self._shadow_record(loaded, record)

    @staticmethod
    def _shadow_record(loaded: LoadedModel, record: dict) -> None:
        if loaded.shadow_log is not None:
            loaded.shadow_log.append(record)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_outputs(request: InferRequest, target: LoadedVersion) -> None:
    if request.outputs is not None:
        unknown = [n for n in request.outputs if n not in target.model.output_names]
        if unknown:
            raise InvalidInputError(f"unknown output(s) {', '.join(unknown)}; model {request.model} "
                                    f"has {', '.join(target.model.output_names)}")
