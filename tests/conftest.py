"""Shared test helpers: the CLI runner, clean-error assertions, and the fixture models built once per session."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mpack.cli import app

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    # Golden files (tests/golden/*.Dockerfile): rewrite them from the current templates instead of comparing.
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/* from the current output instead of comparing")


def pytest_runtest_setup(item):
    """The docker marker: skip without a reachable engine, except under CI=true, where a missing engine fails (CI
    starts one with scripts/docker-engine.sh, so its absence is a broken set-up, not a reason to skip)."""
    if "docker" in item.keywords:
        reason = _docker_unreachable()
        if reason is not None:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"CI=true but no Docker engine is reachable ({reason}); .ci/run starts one with "
                            "scripts/docker-engine.sh and exports DOCKER_HOST", pytrace=False)
            pytest.skip(f"no Docker engine reachable ({reason}); "
                        "export DOCKER_HOST=\"$(scripts/docker-engine.sh up)\"")


@functools.lru_cache(maxsize=None)
def _docker_unreachable() -> str | None:
    """None when an engine answers at DOCKER_HOST (or the default socket), else why not."""
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
        client.close()
        return None
    except Exception as exc:  # ImportError, DockerException, connection errors
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def pytest_collection_modifyitems(config, items):
    """Gate the gpu and docker markers in one place."""
    gpu = _has_cuda()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU with onnxruntime-gpu here"))


def _has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and os.path.exists("/dev/nvidia0")


class Result:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exception = result.exception

    def __repr__(self) -> str:
        return f"<exit {self.exit_code}\nstdout: {self.stdout}\nstderr: {self.stderr}>"


def mpack(*args: str) -> Result:
    """Run the CLI in-process; returns exit code, stdout and stderr."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result)


def assert_clean_error(result: Result, code: int, *needles: str) -> None:
    """A one-line error (plus an optional hint line), the expected exit code, no traceback."""
    assert result.exit_code == code, result
    text = result.stderr
    assert "Traceback" not in text + result.stdout, result
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    error_lines = [ln for ln in lines if ln.startswith("error:")]
    assert len(error_lines) == 1, result
    for needle in needles:
        assert needle.lower() in text.lower(), (needle, result)


def assert_nothing_written(directory: Path, before: set[str] | None = None) -> None:
    """No model, manifest or temporary directory was left behind."""
    left = {p.name for p in directory.iterdir()} - (before or set())
    assert not left, left


@pytest.fixture(scope="session")
def torch_fixtures(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("torch")
    from fixtures.torch_models import make_torch_fixtures

    return make_torch_fixtures(tmp_path_factory.mktemp("torch-fixtures"))


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    # Entry points (fixtures.torch_models:make_mlp) and pickled classes resolve against the working directory.
    monkeypatch.chdir(REPO)
