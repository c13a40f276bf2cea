"""Talking to the Docker Engine (the ``docker`` SDK): connect, pin the base image, build, inspect, smoke-test.

Builds go through the Engine API's classic builder (``POST /build``), which every engine has; the Dockerfile uses
nothing BuildKit-only. The build runs with ``network_mode=none``: the context holds every wheel.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mpack.errors import DockerError, first_line

_STEP_RE = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
ENGINE_HINT = ("start one (sudo systemctl start docker) and set DOCKER_HOST if it is not the default socket; "
               "in a source checkout: export DOCKER_HOST=\"$(scripts/docker-engine.sh up)\"")


@dataclass(frozen=True)
class BuildStep:
    """One Dockerfile instruction of a build, as the classic builder reported it."""

    index: int
    instruction: str
    cached: bool
    layer: str | None  # the intermediate image ID the step produced


@dataclass
class BuildEvent:
    """What a build progress display gets: the current step (``index`` of ``total``) or a log line."""

    index: int = 0
    total: int = 0
    instruction: str = ""
    line: str = ""
    cached: bool = False


@dataclass(frozen=True)
class BuildOutcome:
    image_id: str
    steps: tuple[BuildStep, ...]
    log: tuple[str, ...]
    seconds: float


@dataclass(frozen=True)
class ModelCheck:
    """One V2 infer request against the running image, compared with local ONNX Runtime."""

    model: str
    version: str
    outputs: tuple[str, ...]
    max_abs_diff: float
    passed: bool
    problem: str | None = None

    def to_dict(self) -> dict:
        return {"model": self.model, "version": self.version, "outputs": list(self.outputs),
                "max_abs_diff": self.max_abs_diff, "passed": self.passed, "problem": self.problem}


@dataclass(frozen=True)
class SmokeResult:
    """The image ran, became ready, answered a V2 infer request per model version like local ORT, and stopped on
    SIGTERM."""

    ready_s: float
    checks: tuple[ModelCheck, ...]
    stop_s: float
    exit_code: int | None
    health: str | None = None
    logs_tail: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and self.exit_code == 0

    def to_dict(self) -> dict:
        return {"passed": self.passed, "ready_s": round(self.ready_s, 3), "stop_s": round(self.stop_s, 3),
                "exit_code": self.exit_code, "health": self.health, "checks": [c.to_dict() for c in self.checks]}


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def connect(timeout: float = 60.0):
    """A client for the engine at DOCKER_HOST (or the default socket), checked with a ping."""
    from mpack._optional import require

    docker = require("docker")
    try:
        client = docker.from_env(timeout=int(timeout))
        client.ping()
        return client
    except Exception as exc:  # docker.errors.DockerException, requests' ConnectionError, ...
        raise DockerError(f"no Docker engine reachable at {docker_host()} ({first_line(exc, 160)})",
                          hint=ENGINE_HINT) from None


def _local_image(client, reference: str):
    import docker.errors

    try:
        return client.images.get(reference)
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.APIError as exc:  # e.g. an invalid reference the engine refuses
        raise DockerError(f"the engine refused the image reference {reference!r}: {first_line(exc, 200)}") from None


def resolve_base(client, base: str) -> str:
    """Pin ``base``: ``NAME@sha256:DIGEST`` (from the local image's repo digest, or the registry's), or the local
    image ID when the image was built or imported here and has no registry digest. The pinned image is made
    present locally, so the build itself pulls nothing."""
    import docker.errors

    name = base.split("@")[0]
    repo = re.sub(r":[^/:]+$", "", name)
    image = _local_image(client, base)
    if image is not None:
        if "@" in base or base.startswith("sha256:"):
            return base
        for repo_digest in image.attrs.get("RepoDigests") or []:
            if repo_digest.split("@")[0] == repo:
                return f"{repo}@{repo_digest.split('@')[1]}"
        return image.id  # built or imported locally: its ID (sha256 of its config) pins it exactly
    if base.startswith("sha256:"):
        raise DockerError(f"base image {base} is not in the local engine",
                          hint="an image ID only names a local image: load it first (docker load / docker import)")
    try:
        digest = base.split("@")[1] if "@" in base else client.images.get_registry_data(base).id
        client.images.pull(repo, tag=digest)
    except (docker.errors.APIError, docker.errors.DockerException) as exc:
        reason = getattr(exc, "explanation", None) or first_line(exc, 160)
        raise DockerError(
            f"base image {base} is not in the local engine and no registry answers ({str(reason)[:200]})",
            hint="pull or load it where a registry is reachable (docker pull / docker load), or use a local base: "
                 "scripts/docker-engine.sh base-image, then --base local/debian-py:bookworm") from None
    return f"{repo}@{digest}"


def pin_offline(base: str) -> str | None:
    """A base that is already pinned (``@sha256:`` or an image ID) needs no engine to resolve."""
    return base if re.search(r"(^|@)sha256:[0-9a-f]{64}$", base) else None


def context_tar(root: Path, dest: Path) -> Path:
    """A reproducible tar of the build context: sorted names, fixed owner, modes and mtimes."""
    from mpack.image.context import FIXED_MTIME

    def norm(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = FIXED_MTIME
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=path.relative_to(root).as_posix(), recursive=False, filter=norm)
    return dest


def build(client, context_dir: Path, tag: str, *, created: str, timeout: float,
          on_event: Callable[[BuildEvent], None] | None = None) -> BuildOutcome:
    """Build ``context_dir`` with the classic builder, no network, streaming the log to ``on_event``.

    Raises:
        DockerError: the build failed; the message names the failing step and ``details`` holds its last lines.
    """
    import tempfile

    import docker.errors

    started = time.perf_counter()
    steps: list[BuildStep] = []
    log: list[str] = []
    current: dict = {}
    image_id = None
    with tempfile.TemporaryDirectory(prefix="mpack-context-") as tmp:
        tar_path = context_tar(context_dir, Path(tmp) / "context.tar")
        with open(tar_path, "rb") as fh:
            try:
                stream = client.api.build(
                    fileobj=fh, custom_context=True, tag=tag, rm=True, forcerm=True, pull=False,
                    network_mode="none", buildargs={"CREATED": created}, decode=True, timeout=int(timeout))
                for chunk in stream:
                    if "stream" in chunk:
                        for line in chunk["stream"].splitlines():
                            if not line.strip():
                                continue
                            log.append(line)
                            match = _STEP_RE.match(line)
                            if match:
                                if current:
                                    steps.append(BuildStep(**current))
                                current = {"index": int(match[1]), "instruction": match[3], "cached": False,
                                           "layer": None}
                                event = BuildEvent(int(match[1]), int(match[2]), match[3])
                            else:
                                if line.strip() == "---> Using cache" and current:
                                    current["cached"] = True
                                layer = re.match(r"^ ---> ([0-9a-f]{12,})$", line)
                                if layer and current:
                                    current["layer"] = layer[1]
                                event = BuildEvent(line=line, cached=bool(current.get("cached")))
                            if on_event:
                                on_event(event)
                    if "aux" in chunk and isinstance(chunk["aux"], dict) and chunk["aux"].get("ID"):
                        image_id = chunk["aux"]["ID"]
                    if "error" in chunk or "errorDetail" in chunk:
                        message = chunk.get("error") or chunk["errorDetail"].get("message", "")
                        raise _build_failure(message, current, log)
            except docker.errors.APIError as exc:
                raise _build_failure(first_line(exc, 300), current, log) from None
            except (OSError, docker.errors.DockerException) as exc:
                raise DockerError(f"the build of {tag} stopped: {first_line(exc, 200)}", hint=ENGINE_HINT) from None
    if current:
        steps.append(BuildStep(**current))
    if image_id is None:
        match = next((re.match(r"^Successfully built ([0-9a-f]+)$", ln) for ln in reversed(log)
                      if ln.startswith("Successfully built")), None)
        if match is None:
            raise _build_failure("the engine reported no image ID", current, log)
        image_id = client.images.get(match[1]).id
    return BuildOutcome(image_id, tuple(steps), tuple(log), time.perf_counter() - started)


def _build_failure(message: str, current: dict, log: list[str]) -> DockerError:
    step = f"step {current['index']} ({current['instruction'][:80]})" if current else "before the first step"
    # The failing step's own output (from its "Step N/M" line), its last lines; no colour codes.
    start = max((i for i, line in enumerate(log) if _STEP_RE.match(line)), default=0)
    lines = [_ANSI_RE.sub("", line) for line in log[start:]]
    tail = tuple(line for line in lines if line.strip() and not line.startswith("Removing intermediate"))[-15:]
    return DockerError(f"docker build failed at {step}: {first_line(Exception(message), 240)}",
                       hint="the lines above are the failing step's last output", details=tail)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _post_json(url: str, body: dict, timeout: float = 30.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError) as exc:
        return 0, {"error": first_line(exc, 200)}


_V2_DTYPES = {"float32": "FP32", "float64": "FP64", "float16": "FP16", "int64": "INT64", "int32": "INT32",
              "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
              "uint64": "UINT64", "bool": "BOOL"}


def v2_request(feeds: dict) -> dict:
    """A V2 (Open Inference Protocol) REST infer request body for numpy feeds."""
    return {"inputs": [{"name": name, "shape": list(array.shape), "datatype": _V2_DTYPES[str(array.dtype)],
                        "data": array.reshape(-1).tolist()} for name, array in feeds.items()]}


def check_model(base_url: str, model_path: Path, name: str, version: str, seed: int = 0) -> ModelCheck:
    """Send seeded inputs to ``/v2/models/{name}/versions/{version}/infer`` and compare each output with ONNX
    Runtime run here on the same model (atol 1e-4 + rtol 1e-3, mpack's default parity tolerance)."""
    import numpy as np

    from mpack.backends.onnxruntime import OnnxRuntimeRunner
    from mpack.inputs import parity_cases, random_feeds

    with OnnxRuntimeRunner(model_path) as runner:
        specs = runner.input_specs()
        feeds = random_feeds(specs, parity_cases(specs, (2,))[0].sizes, seed=seed)
        expected = runner.infer(feeds)
    status, answer = _post_json(f"{base_url}/v2/models/{name}/versions/{version}/infer", v2_request(feeds))
    if status != 200:
        return ModelCheck(name, version, (), float("nan"), False,
                          f"HTTP {status}: {answer.get('error', answer) if isinstance(answer, dict) else answer}")
    outputs = {o.get("name"): o for o in answer.get("outputs", [])}
    worst, problems = 0.0, []
    for out_name, reference in expected.items():
        got = outputs.get(out_name)
        if got is None:
            problems.append(f"output {out_name} missing")
            continue
        value = np.asarray(got.get("data"), dtype=reference.dtype).reshape(got.get("shape"))
        if value.shape != reference.shape:
            problems.append(f"output {out_name} has shape {list(value.shape)}, expected {list(reference.shape)}")
            continue
        diff = float(np.max(np.abs(value.astype(np.float64) - reference.astype(np.float64)))) if value.size else 0.0
        worst = max(worst, diff)
        if not np.allclose(value, reference, atol=1e-4, rtol=1e-3):
            problems.append(f"output {out_name} differs from local ONNX Runtime by up to {diff:.3g}")
    return ModelCheck(name, version, tuple(expected), worst, not problems, "; ".join(problems) or None)


def smoke_test(client, image_id: str, models: tuple[tuple[str, str, Path], ...], timeout: float,
               on_event: Callable[[str], None] | None = None,
               health_command: tuple[str, ...] = ()) -> SmokeResult:
    """Run the image (host network, free ports, loopback only), wait for readiness, check one V2 infer request
    per model version against local ONNX Runtime, then stop it with SIGTERM and expect exit code 0.

    Args:
        client: The engine.
        image_id: The built image.
        models: (name, version, host path of the .onnx) per served version.
        timeout: Seconds the server may take to become ready.
        on_event: Progress messages.
        health_command: The image's HEALTHCHECK command, run once the server is ready. Defaults to none.

    Raises:
        DockerError: it exited, never became ready, answered wrongly or did not stop on SIGTERM, with the
            container's log tail as ``details``.
    """
    import docker.errors

    http_port, grpc_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{http_port}"
    say = on_event or (lambda message: None)
    # Host network: these machines have no bridge, and publishing ports needs one. Binding 127.0.0.1 keeps the
    # server off the host's other interfaces.
    container = client.containers.run(
        image_id, detach=True, network_mode="host", stop_signal="SIGTERM",
        environment={"MPACK_SERVE_HOST": "127.0.0.1", "MPACK_SERVE_HTTP_PORT": str(http_port),
                     "MPACK_SERVE_GRPC_PORT": str(grpc_port)})
    started = time.perf_counter()
    try:
        say(f"waiting for {base_url}/v2/health/ready")
        while True:
            if _get(f"{base_url}/v2/health/ready") == 200:
                break
            container.reload()
            if container.status in ("exited", "dead"):
                raise _smoke_failure(container, f"the container exited with code "
                                                f"{container.attrs['State'].get('ExitCode')} before it was ready")
            if time.perf_counter() - started > timeout:
                raise _smoke_failure(container, f"the server was not ready after {timeout:.0f} s")
            time.sleep(0.25)
        ready_s = time.perf_counter() - started
        checks = []
        for name, version, path in models:
            say(f"V2 infer {name} version {version}")
            checks.append(check_model(base_url, path, name, version))
        failed = [c for c in checks if not c.passed]
        if failed:
            raise _smoke_failure(container, f"model {failed[0].model} version {failed[0].version}: "
                                            f"{failed[0].problem}")
        if health_command:
            # The HEALTHCHECK's own command, run now rather than after its interval: it must pass on a ready server.
            say("running the image's health check")
            code, output = container.exec_run(list(health_command))
            if code != 0:
                raise _smoke_failure(container, f"the image's health check exited with {code}: "
                                                f"{output.decode('utf-8', 'replace').strip()[:200]}")
            health = "healthy"
        else:
            container.reload()
            health = (container.attrs.get("State", {}).get("Health") or {}).get("Status")
        say("stopping (SIGTERM)")
        stop_started = time.perf_counter()
        container.stop(timeout=30)
        stop_s = time.perf_counter() - stop_started
        container.reload()
        exit_code = container.attrs["State"].get("ExitCode")
        if exit_code != 0:
            raise _smoke_failure(container, f"the server exited with code {exit_code} on SIGTERM "
                                            f"(after {stop_s:.1f} s), expected 0")
        return SmokeResult(ready_s, tuple(checks), stop_s, exit_code, health, _logs_tail(container))
    finally:
        try:
            container.remove(force=True)
        except docker.errors.DockerException:
            pass


def _logs_tail(container, lines: int = 20) -> tuple[str, ...]:
    try:
        text = container.logs(tail=lines).decode("utf-8", "replace")
    except Exception:  # the container may be gone already
        return ()
    return tuple(line for line in text.splitlines() if line.strip())


def _smoke_failure(container, message: str) -> DockerError:
    tail = _logs_tail(container)
    return DockerError(f"smoke test failed: {message}", hint="the lines above are the container's last log lines",
                       details=tail)


def image_facts(client, image_id: str) -> dict:
    """Size (bytes), layer digests and labels of a built image."""
    image = client.images.get(image_id)
    return {"id": image.id, "size": int(image.attrs.get("Size") or 0),
            "layers": list((image.attrs.get("RootFS") or {}).get("Layers") or []),
            "labels": dict((image.attrs.get("Config") or {}).get("Labels") or {})}
