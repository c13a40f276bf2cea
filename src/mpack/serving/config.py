"""Server configuration: frozen dataclasses, built from a deployment file, MPACK_SERVE_* variables and flags.

Precedence, lowest first: built-in defaults < deployment file (``mpack.deploy.yaml``) < environment < flags.
Everything here is pure (no sockets, no ONNX Runtime), so ``mpack serve --help`` and the config tests are quick.

Deployment file (YAML or JSON; paths are relative to the file)::

    server:   {host: 127.0.0.1, http_port: 8000, grpc_port: 8001, threads: 1, queue: "redis://127.0.0.1:6379/0",
               callback_hosts: [results.internal]}
    batching: {max_batch_size: 32, max_queue_delay_ms: 5, max_queue_size: 256}
    models:
      cnn:
        versions: {"1": cnn-v1.onnx, "2": cnn-v2.onnx, "3": cnn-v3.onnx}
        primary: "1"
        canary: {version: "2", weight: 10%, rollback: {max_error_rate: 5%, max_p99_ms: 50}}
        shadow: {version: "3", log: shadow.jsonl}
        # or, instead of canary: ab: {split: {"1": 50, "2": 50}, key_header: x-user-id}
        batching: {max_batch_size: 8}     # overrides the defaults above for this model
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from mpack.serving.errors import ServeConfigError

DEFAULT_DEPLOY_FILE = "mpack.deploy.yaml"
ENV_PREFIX = "MPACK_SERVE_"


@dataclass(frozen=True)
class BatchingSpec:
    """Dynamic batching knobs of one model (see batcher.py for the policy).

    Args:
        max_batch_size: Most samples in one ``session.run``; 1 turns batching off. Defaults to 32.
        max_queue_delay_ms: Longest a request is held back to fill a preferred batch size. Defaults to 5.
        max_queue_size: Most requests waiting; past it the server answers 503 / UNAVAILABLE. Defaults to 256.
        preferred_batch_sizes: Batch sizes worth waiting for (at most max_queue_delay_ms). Defaults to none
            (pure greedy: never wait on an idle model).
        instances: ``session.run`` calls in flight at once (threads). Defaults to 1.
    """

    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 256
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int = 1


@dataclass(frozen=True)
class RollbackSpec:
    """Automatic canary rollback: weight to 0 when, over the last ``window_s`` seconds and at least
    ``min_requests`` canary requests, the error rate or the p99 latency is above its bound."""

    max_error_rate: float | None = None
    max_p99_ms: float | None = None
    window_s: float = 60.0
    min_requests: int = 20


@dataclass(frozen=True)
class CanarySpec:
    version: str
    weight: float  # fraction of routed requests, 0..1
    rollback: RollbackSpec | None = None


@dataclass(frozen=True)
class ShadowSpec:
    version: str
    log: Path | None = None  # JSONL, one line per shadowed request


@dataclass(frozen=True)
class ABSpec:
    split: tuple[tuple[str, float], ...]  # (version, weight); weights are normalised when routing
    key_header: str = "x-user-id"


@dataclass(frozen=True)
class ModelSpec:
    """One served model name with its versions and how unversioned requests are routed among them."""

    name: str
    versions: tuple[tuple[str, Path], ...]
    primary: str
    canary: CanarySpec | None = None
    shadow: ShadowSpec | None = None
    ab: ABSpec | None = None
    batching: BatchingSpec = field(default_factory=BatchingSpec)

    def path(self, version: str) -> Path:
        return dict(self.versions)[version]


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``serve()`` needs. Build it with :func:`load_config`.

    Args:
        models: The served models.
        host: Address both listeners bind. Defaults to 127.0.0.1 (loopback only).
        http_port: REST port; 0 picks a free one. Defaults to 8000.
        grpc_port: gRPC port; 0 picks a free one, None turns gRPC off. Defaults to 8001.
        providers: ONNX Runtime providers: auto (CUDA when present, else CPU), cpu, cuda. Defaults to auto.
        threads: intra-op threads per session; 0 lets ONNX Runtime choose. Defaults to 0.
        max_request_bytes: Larger request bodies get 413 / RESOURCE_EXHAUSTED. Defaults to 64 MiB.
        access_log: One JSON line per request on stderr. Defaults to True.
        drain_timeout_s: On SIGTERM, how long in-flight requests may take before they are cut. Defaults to 30.
        drain_delay_s: On SIGTERM, how long to keep serving while reporting not-ready (lets a load balancer
            notice) before the listeners close. Defaults to 0.
        admin_token: When set, the admin endpoints need ``Authorization: Bearer <token>``; when unset they answer
            only on a loopback ``host`` (elsewhere 403). Defaults to None.
        warmup: Run every version once per warm-up batch size before reporting ready. Defaults to True.
        queue: Redis URL of the job queue behind ``POST /v2/models/{m}/jobs``; None turns the job endpoints off.
            Defaults to None.
        queue_stream: The stream a model's jobs go to, ``{model}`` standing for its name; versioned jobs
            (``/versions/{v}/jobs``) go to ``<stream>:<v>``. Defaults to "mpack:jobs:{model}".
        queue_max_jobs: Jobs waiting in a stream at which more are refused (503). Defaults to the bound
            ``mpack worker --max-queue`` stored for the stream, else 1000.
        callback_hosts: Host names (or IP addresses) a job's ``parameters.callback_url`` may point at; empty refuses
            every callback URL (400). Defaults to none.
        max_concurrency: Most requests (REST connections and tasks, gRPC RPCs) in flight at once, each listener;
            past it REST answers 503 and gRPC RESOURCE_EXHAUSTED. Defaults to 4 × the max_queue_size of every
            served version together, at least 64.
    """

    models: tuple[ModelSpec, ...]
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int | None = 8001
    providers: tuple[str, ...] = ("auto",)
    threads: int = 0
    max_request_bytes: int = 64 * 1024 * 1024
    access_log: bool = True
    drain_timeout_s: float = 30.0
    drain_delay_s: float = 0.0
    admin_token: str | None = None
    warmup: bool = True
    queue: str | None = None
    queue_stream: str = "mpack:jobs:{model}"
    queue_max_jobs: int | None = None
    callback_hosts: tuple[str, ...] = ()
    max_concurrency: int | None = None

    @property
    def concurrency_limit(self) -> int:
        """max_concurrency, else 4 × the queue places of every served version together (idle keep-alive connections
        count too, hence the floor of 64)."""
        return self.max_concurrency or max(64, 4 * sum(m.batching.max_queue_size * len(m.versions)
                                                       for m in self.models))

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def to_dict(self) -> dict:
        def conv(value):
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, tuple):
                return [conv(v) for v in value]
            if hasattr(value, "__dataclass_fields__"):
                data = {k: conv(getattr(value, k)) for k in value.__dataclass_fields__}
                if isinstance(value, ModelSpec):
                    data["versions"] = {v: str(p) for v, p in value.versions}
                if isinstance(value, ABSpec):
                    data["split"] = dict(value.split)
                return data
            return value

        return conv(self)


# ---- value parsers: one per kind of setting, each raising ServeConfigError naming the field -----------------------

def _int(minimum: int = 0) -> Callable[[str, Any], int]:
    def parse(name: str, value: Any) -> int:
        try:
            number = int(value)
            if isinstance(value, float) and number != value:
                raise ValueError
        except (TypeError, ValueError):
            raise ServeConfigError(name, value, "is not an integer") from None
        if number < minimum:
            raise ServeConfigError(name, value, f"must be >= {minimum}")
        return number

    return parse


def _float(minimum: float = 0.0) -> Callable[[str, Any], float]:
    def parse(name: str, value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ServeConfigError(name, value, "is not a number") from None
        if not number >= minimum:
            raise ServeConfigError(name, value, f"must be >= {minimum:g}")
        return number

    return parse


def _port(name: str, value: Any) -> int:
    port = _int(0)(name, value)
    if port > 65535:
        raise ServeConfigError(name, value, "is not a TCP port (0-65535)")
    return port


def _optional_port(name: str, value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "none", "false")):
        return None
    return _port(name, value)


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ServeConfigError(name, value, "is not a boolean", hint="use true or false")


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or any(ord(c) < 32 for c in value):
        raise ServeConfigError(name, value, "must be a non-empty single-line string")
    return value.strip()


def _optional_str(name: str, value: Any) -> str | None:
    return None if value in (None, "") else _str(name, value)


def fraction(name: str, value: Any) -> float:
    """``10%``, ``0.1`` or ``10`` (read as percent when > 1) → 0.1; must lie in [0, 1]."""
    text = str(value).strip()
    try:
        number = float(text.rstrip("%"))
    except ValueError:
        raise ServeConfigError(name, value, "is not a number or a percentage", hint="e.g. 10% or 0.1") from None
    if text.endswith("%") or number > 1:
        number /= 100
    if not 0 <= number <= 1:
        raise ServeConfigError(name, value, "must lie between 0 and 100%")
    return number


def _providers(name: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = tuple(str(p).strip().lower() for p in items if str(p).strip())
    known = ("auto", "cpu", "cuda", "tensorrt")
    for provider in names:
        if provider not in known:
            raise ServeConfigError(name, value, f"unknown provider {provider!r}", hint=f"one of {', '.join(known)}")
    if not names:
        raise ServeConfigError(name, value, "names no provider", hint="e.g. cpu or cuda,cpu")
    return names


def _optional_int(minimum: int) -> Callable[[str, Any], int | None]:
    def parse(name: str, value: Any) -> int | None:
        return None if value in (None, "") else _int(minimum)(name, value)

    return parse


def _redis_url(name: str, value: Any) -> str | None:
    url = _optional_str(name, value)
    if url is not None and url.split("://", 1)[0].lower() not in ("redis", "rediss", "unix"):
        raise ServeConfigError(name, value, "is not a Redis URL", hint="e.g. redis://127.0.0.1:6379/0")
    return url


def _hosts(name: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    hosts = []
    for item in items:
        host = str(item).strip().lower().strip("[]")
        if not host:
            continue
        if any(c in host for c in "/:@ ") and not all(c in "0123456789abcdef:." for c in host):
            raise ServeConfigError(name, value, f"{item!r} is not a host name", hint="e.g. results.internal")
        if host not in hosts:
            hosts.append(host)
    return tuple(hosts)


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
    return tuple(sorted({_int(1)(name, v) for v in items}))


# Server settings and batching defaults, as data: key → parser. File sections `server:` and `batching:`, the
# MPACK_SERVE_<KEY> variables and the flags all land in these flat keys. N.B. keep README's table in step.
SERVER_SETTINGS: dict[str, Callable[[str, Any], Any]] = {
    "host": _str,
    "http_port": _port,
    "grpc_port": _optional_port,
    "providers": _providers,
    "threads": _int(0),
    "max_request_bytes": _int(1024),
    "access_log": _bool,
    "drain_timeout_s": _float(0),
    "drain_delay_s": _float(0),
    "admin_token": _optional_str,
    "warmup": _bool,
    "queue": _redis_url,
    "queue_stream": _str,
    "queue_max_jobs": _optional_int(1),
    "callback_hosts": _hosts,
    "max_concurrency": _optional_int(1),
}
BATCHING_SETTINGS: dict[str, Callable[[str, Any], Any]] = {
    "max_batch_size": _int(1),
    "max_queue_delay_ms": _float(0),
    "max_queue_size": _int(1),
    "preferred_batch_sizes": _int_tuple,
    "instances": _int(1),
}


def load_config(
    models: tuple[str, ...] = (),
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    canary: tuple[str, ...] = (),
    shadow: tuple[str, ...] = (),
    ab: tuple[str, ...] = (),
    cwd: Path | None = None,
) -> ServeConfig:
    """Merge defaults, the deployment file, MPACK_SERVE_* variables and flags into a validated ServeConfig.

    Args:
        models: Model flags: ``PATH``, ``NAME=PATH`` or ``NAME:VERSION=PATH`` (repeat a name for more versions;
            its first version is the primary).
        config_file: A deployment file. Defaults to MPACK_SERVE_CONFIG, else ``./mpack.deploy.yaml`` when present
            and no model flag is given.
        env: Environment variables. Defaults to ``os.environ``.
        overrides: Server and batching settings from flags (keys of SERVER_SETTINGS / BATCHING_SETTINGS); None
            values are ignored.
        canary: ``NAME:VERSION=WEIGHT`` flags (``cnn:2=10%``).
        shadow: ``NAME:VERSION`` flags.
        ab: ``NAME:V1=W1,V2=W2`` flags (``cnn:1=50,2=50``).
        cwd: Base for relative model paths given as flags. Defaults to the current directory.

    Returns:
        The ServeConfig.

    Raises:
        ServeConfigError: naming the field and the value.
    """
    env = dict(os.environ if env is None else env)
    cwd = cwd or Path.cwd()
    if config_file is None and env.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(env[ENV_PREFIX + "CONFIG"])
    if not models and env.get(ENV_PREFIX + "MODELS"):
        models = tuple(env[ENV_PREFIX + "MODELS"].replace(",", " ").split())
    if config_file is None and not models and (cwd / DEFAULT_DEPLOY_FILE).is_file():
        config_file = cwd / DEFAULT_DEPLOY_FILE

    document: dict = read_deploy_file(config_file) if config_file is not None else {}
    base = config_file.resolve().parent if config_file is not None else cwd

    # 1. flat settings: file < env < flags
    settings: dict[str, Any] = {}
    for section, table in (("server", SERVER_SETTINGS), ("batching", BATCHING_SETTINGS)):
        values = document.get(section) or {}
        if not isinstance(values, dict):
            raise ServeConfigError(section, values, "must be a mapping")
        for key, value in values.items():
            if key not in table:
                raise ServeConfigError(f"{section}.{key}", value, "is not a known setting",
                                       hint=f"known: {', '.join(table)}")
            settings[key] = table[key](f"{section}.{key}", value)
    table = {**SERVER_SETTINGS, **BATCHING_SETTINGS}
    for key, parse in table.items():
        name = ENV_PREFIX + key.upper()
        if name in env and env[name] != "":
            settings[key] = parse(name, env[name])
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in table:
            raise ServeConfigError(key, value, "is not a known setting")
        settings[key] = table[key]("--" + key.replace("_", "-"), value)

    batching_keys = set(BATCHING_SETTINGS)
    defaults = BatchingSpec(**{k: v for k, v in settings.items() if k in batching_keys})
    server = {k: v for k, v in settings.items() if k not in batching_keys}

    # 2. models: the file's, then flags (a flag naming a model of the file adds a version to it)
    specs: dict[str, dict] = {}
    file_models = document.get("models") or {}
    if isinstance(file_models, list):  # also accept a list of {name: ..., ...}
        file_models = {str(m.get("name")): m for m in file_models if isinstance(m, dict)}
    if not isinstance(file_models, dict):
        raise ServeConfigError("models", file_models, "must be a mapping of model name to its versions")
    for name, entry in file_models.items():
        specs[str(name)] = _model_from_file(str(name), entry, base)
    for text in models:
        name, version, path = parse_model_arg(text, cwd)
        entry = specs.setdefault(name, {"versions": {}, "primary": None})
        if version in entry["versions"]:
            raise ServeConfigError("MODEL", text, f"version {version} of {name} is given twice")
        entry["versions"][version] = path
    for text in canary:
        name, version, weight = _split_versioned(text, "--canary", "NAME:VERSION=WEIGHT, e.g. cnn:2=10%")
        _entry(specs, name, "--canary", text)["canary"] = CanarySpec(version, fraction("--canary", weight))
    for text in shadow:
        name, version, rest = _split_versioned(text, "--shadow", "NAME:VERSION, e.g. cnn:2", value=False)
        _entry(specs, name, "--shadow", text)["shadow"] = ShadowSpec(version, Path(rest) if rest else None)
    for text in ab:
        name, _, split = text.partition(":")
        if not split:
            raise ServeConfigError("--ab", text, "expected NAME:V1=W1,V2=W2", hint="e.g. cnn:1=50,2=50")
        _entry(specs, name, "--ab", text)["ab"] = ABSpec(_parse_split("--ab", text, split))
    if not specs:
        raise ServeConfigError("MODEL", "", "no model to serve",
                               hint="give NAME=PATH.onnx or a deployment file with --config")

    built = tuple(_build_model(name, entry, defaults) for name, entry in specs.items())
    stream = server.get("queue_stream", ServeConfig.queue_stream)
    if server.get("queue") and "{model}" not in stream and len(built) > 1:
        raise ServeConfigError("queue_stream", stream, f"would carry the jobs of {len(built)} models in one stream",
                               hint="put {model} in it, e.g. mpack:jobs:{model}")
    return ServeConfig(models=built, **server)


def read_deploy_file(path: Path) -> dict:
    """Parse a YAML (.yaml/.yml; needs PyYAML) or JSON deployment file into a mapping."""
    if not path.is_file():
        raise ServeConfigError("--config", str(path), "no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ServeConfigError("--config", str(path), "YAML needs PyYAML",
                                       hint="install mpack[serve], or write the file as JSON") from None
            document = yaml.safe_load(text)
        else:
            document = json.loads(text)
    except ServeConfigError:
        raise
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: report the parser's first line
        raise ServeConfigError("--config", str(path), "is not valid: " + str(exc).splitlines()[0]) from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ServeConfigError("--config", str(path), "must hold a mapping with a models: section")
    unknown = set(document) - {"server", "batching", "models"}
    if unknown:
        raise ServeConfigError("--config", str(path), f"unknown section(s) {', '.join(sorted(unknown))}",
                               hint="sections are server, batching and models")
    return document


def parse_model_arg(text: str, cwd: Path) -> tuple[str, str, Path]:
    """``PATH`` | ``NAME=PATH`` | ``NAME:VERSION=PATH`` → (name, version, path); the name defaults to the file stem
    and the version to 1."""
    name_part, sep, path_text = text.partition("=")
    if not sep:
        path_text, name_part = text, Path(text).stem
    name, _, version = name_part.partition(":")
    version = version or "1"
    _check_name("MODEL", text, name)
    _check_name("MODEL", text, version)
    path = Path(path_text)
    return name, version, path if path.is_absolute() else cwd / path


def _check_name(field_name: str, text: str, name: str) -> None:
    # Names go into URL paths, metric labels and log lines: keep them to a safe alphabet.
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ServeConfigError(field_name, text, f"name {name!r} may only use letters, digits, '-', '_' and '.'")


def _split_versioned(text: str, flag: str, usage: str, value: bool = True) -> tuple[str, str, str]:
    head, sep, rest = text.partition("=")
    name, _, version = head.partition(":")
    if not name or not version or (value and not sep):
        raise ServeConfigError(flag, text, f"expected {usage}")
    return name, version, rest


def _entry(specs: dict, name: str, flag: str, text: str) -> dict:
    if name not in specs:
        raise ServeConfigError(flag, text, f"names model {name!r}, which is not served",
                               hint=f"served: {', '.join(specs) or 'none'}")
    return specs[name]


def _parse_split(flag: str, text: str, split: Any) -> tuple[tuple[str, float], ...]:
    if isinstance(split, dict):
        items = [(str(k), v) for k, v in split.items()]
    else:
        items = []
        for part in str(split).split(","):
            version, sep, weight = part.partition("=")
            if not sep:
                raise ServeConfigError(flag, text, "expected VERSION=WEIGHT pairs", hint="e.g. 1=50,2=50")
            items.append((version.strip(), weight))
    parsed = tuple((version, _float(0)(flag, str(weight).rstrip("%"))) for version, weight in items)
    if len(parsed) < 2 or sum(w for _, w in parsed) <= 0:
        raise ServeConfigError(flag, text, "an A/B split needs two or more versions with a positive total weight")
    return parsed


def _model_from_file(name: str, entry: Any, base: Path) -> dict:
    where = f"models.{name}"
    _check_name(where, name, name)
    if isinstance(entry, str):  # `cnn: cnn.onnx` shorthand
        entry = {"versions": {"1": entry}}
    if not isinstance(entry, dict) or not isinstance(entry.get("versions"), dict) or not entry["versions"]:
        raise ServeConfigError(where, entry, "needs versions: {VERSION: PATH, ...}")
    unknown = set(entry) - {"versions", "primary", "canary", "shadow", "ab", "batching"}
    if unknown:
        raise ServeConfigError(where, sorted(unknown), "unknown key(s)",
                               hint="keys are versions, primary, canary, shadow, ab, batching")
    versions = {}
    for version, path in entry["versions"].items():
        _check_name(f"{where}.versions", version, str(version))
        path = Path(str(path))
        versions[str(version)] = path if path.is_absolute() else base / path
    result: dict = {"versions": versions, "primary": str(entry["primary"]) if entry.get("primary") else None}
    if entry.get("canary") is not None:
        canary = entry["canary"]
        if not isinstance(canary, dict) or "version" not in canary:
            raise ServeConfigError(f"{where}.canary", canary, "needs version: and weight:")
        rollback = None
        if canary.get("rollback") is not None:
            rb = canary["rollback"]
            if not isinstance(rb, dict):
                raise ServeConfigError(f"{where}.canary.rollback", rb, "must be a mapping")
            unknown = set(rb) - {"max_error_rate", "max_p99_ms", "window_s", "min_requests"}
            if unknown:
                raise ServeConfigError(f"{where}.canary.rollback", sorted(unknown), "unknown key(s)")
            rollback = RollbackSpec(
                max_error_rate=fraction(f"{where}.canary.rollback.max_error_rate", rb["max_error_rate"])
                if rb.get("max_error_rate") is not None else None,
                max_p99_ms=_float(0)(f"{where}.canary.rollback.max_p99_ms", rb["max_p99_ms"])
                if rb.get("max_p99_ms") is not None else None,
                window_s=_float(0.001)(f"{where}.canary.rollback.window_s", rb.get("window_s", 60)),
                min_requests=_int(1)(f"{where}.canary.rollback.min_requests", rb.get("min_requests", 20)))
        result["canary"] = CanarySpec(str(canary["version"]),
                                      fraction(f"{where}.canary.weight", canary.get("weight", 0)), rollback)
    if entry.get("shadow") is not None:
        shadow = entry["shadow"]
        if isinstance(shadow, (str, int)):
            shadow = {"version": shadow}
        if not isinstance(shadow, dict) or "version" not in shadow:
            raise ServeConfigError(f"{where}.shadow", shadow, "needs version:")
        log = Path(str(shadow["log"])) if shadow.get("log") else None
        result["shadow"] = ShadowSpec(str(shadow["version"]), log if log is None or log.is_absolute() else base / log)
    if entry.get("ab") is not None:
        ab = entry["ab"]
        if not isinstance(ab, dict) or "split" not in ab:
            raise ServeConfigError(f"{where}.ab", ab, "needs split: {VERSION: WEIGHT, ...}")
        result["ab"] = ABSpec(_parse_split(f"{where}.ab.split", str(ab["split"]), ab["split"]),
                              _str(f"{where}.ab.key_header", ab.get("key_header", "x-user-id")).lower())
    if entry.get("batching") is not None:
        values = entry["batching"]
        if not isinstance(values, dict):
            raise ServeConfigError(f"{where}.batching", values, "must be a mapping")
        for key in values:
            if key not in BATCHING_SETTINGS:
                raise ServeConfigError(f"{where}.batching.{key}", values[key], "is not a known setting")
        result["batching"] = {k: BATCHING_SETTINGS[k](f"{where}.batching.{k}", v) for k, v in values.items()}
    return result


def _build_model(name: str, entry: dict, defaults: BatchingSpec) -> ModelSpec:
    versions = entry["versions"]
    if not versions:
        raise ServeConfigError("MODEL", name, "has no version with a path")
    for version, path in versions.items():
        if not path.is_file():
            raise ServeConfigError(f"model {name} version {version}", str(path), "no such file")
    primary = entry.get("primary") or next(iter(versions))
    where = f"model {name}"
    if primary not in versions:
        raise ServeConfigError(f"{where} primary", primary, "is not one of its versions",
                               hint=f"versions: {', '.join(versions)}")
    canary, shadow, ab = entry.get("canary"), entry.get("shadow"), entry.get("ab")
    for role, version in (("canary", canary and canary.version), ("shadow", shadow and shadow.version)):
        if version is not None and version not in versions:
            raise ServeConfigError(f"{where} {role}", version, "is not one of its versions",
                                   hint=f"versions: {', '.join(versions)}")
        if version is not None and version == primary:
            raise ServeConfigError(f"{where} {role}", version, "is the primary version itself")
    if ab is not None:
        for version, _ in ab.split:
            if version not in versions:
                raise ServeConfigError(f"{where} ab", version, "is not one of its versions",
                                       hint=f"versions: {', '.join(versions)}")
    if canary is not None and ab is not None:
        raise ServeConfigError(f"{where}", "canary+ab", "takes a canary or an A/B split, not both",
                               hint="an A/B split with a small weight is a canary")
    if shadow is not None and ((canary is not None and shadow.version == canary.version) or
                               (ab is not None and shadow.version in dict(ab.split))):
        raise ServeConfigError(f"{where} shadow", shadow.version, "also takes live traffic (canary or A/B split)",
                               hint="shadow a version that is neither the canary nor in the A/B split")
    batching = replace(defaults, **entry.get("batching", {}))
    if batching.preferred_batch_sizes and max(batching.preferred_batch_sizes) > batching.max_batch_size:
        raise ServeConfigError(f"{where} preferred_batch_sizes", list(batching.preferred_batch_sizes),
                               f"exceed max_batch_size {batching.max_batch_size}")
    return ModelSpec(name=name, versions=tuple(versions.items()), primary=primary, canary=canary, shadow=shadow,
                     ab=ab, batching=batching)
