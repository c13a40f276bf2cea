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


@pytest.fixture(autouse=True)
def _image_cache_env(image_cache, monkeypatch):
    # The CLI reads the wheel cache from MPACK_CACHE_DIR.
    monkeypatch.setenv("MPACK_CACHE_DIR", str(image_cache))


@pytest.fixture(scope="session")
def mlp_model(tmp_path_factory) -> Path:
    """fixtures/onnx_models.mlp: x (n, 32) → MatMul → Relu → MatMul → y (n, 8), seeded."""
    from fixtures.onnx_models import mlp

    return mlp(tmp_path_factory.mktemp("image-model") / "mlp.onnx")
