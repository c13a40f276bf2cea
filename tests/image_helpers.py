"""Fixtures shared by tests/test_image_*.py (imported there, so they stay out of the shared conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO

# N.B. the tag scripts/docker-engine.sh base-image creates; keep the two in step.
BASE_IMAGE = "local/debian-py:bookworm"


@pytest.fixture(scope="session")
def image_cache() -> Path:
    """Resolved wheels, kept between tests and between runs (git-ignored): only the first build asks the index."""
    path = REPO / ".cache" / "mpack"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def mpack_wheel(tmp_path_factory) -> Path:
    """mpack's wheel, built once from the source tree: every image of the session gets the same one, so a file
    edited in the tree mid-session cannot make two builds differ (and each build saves a wheel build)."""
    from mpack import __version__
    from mpack.image.wheels import build_mpack_wheel

    return build_mpack_wheel(tmp_path_factory.mktemp("mpack-wheel"), __version__)


@pytest.fixture(autouse=True)
def _image_cache_env(image_cache, mpack_wheel, monkeypatch):
    # The CLI reads the wheel cache from MPACK_CACHE_DIR and takes a ready mpack wheel from MPACK_WHEEL.
    monkeypatch.setenv("MPACK_CACHE_DIR", str(image_cache))
    monkeypatch.setenv("MPACK_WHEEL", str(mpack_wheel))


@pytest.fixture(scope="session")
def mlp_model(tmp_path_factory) -> Path:
    """fixtures/onnx_models.mlp: x (n, 32) → MatMul → Relu → MatMul → y (n, 8), seeded."""
    from fixtures.onnx_models import mlp

    return mlp(tmp_path_factory.mktemp("image-model") / "mlp.onnx")
