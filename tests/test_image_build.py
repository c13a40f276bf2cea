"""`mpack build-image` against a real Docker engine: build with no network, run, V2 infer vs local ONNX Runtime,
SIGTERM, layer reuse, size budget, SBOM, and each failure as one clean line.

Needs an engine (docker marker): export DOCKER_HOST="$(scripts/docker-engine.sh up)", which also makes the local
base image local/debian-py:bookworm (no registry is needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_clean_error, mpack
from tests.image_helpers import (  # noqa: F401 (fixtures)
    BASE_IMAGE, _image_cache_env, image_cache, mlp_model, mpack_wheel)

pytest.importorskip("docker")
pytestmark = pytest.mark.docker

TAG = "mpack-test/mlp:1"
# A label that would run a command or expand a variable if it were not quoted: it must come back verbatim.
TRICKY_LABEL = ("org.example.note", 'a "quoted" $(touch /pwned) ${HOME} `id` \\ value')
SUITE_LABEL = "org.example.suite=mpack-tests"  # on every test image, so the clean-up touches nothing else


@pytest.fixture(scope="session")
def client():
    import docker

    engine = docker.from_env(timeout=120)
    engine.images.get(BASE_IMAGE)  # made by scripts/docker-engine.sh base-image
    yield engine
    # Keep TAG (its layers are the next run's build cache); drop the other test images and the ones earlier runs
    # left untagged, recognised by the test label so nothing else on a shared engine is touched.
    stale = [i for i in engine.images.list(name="mpack-test/*") if TAG not in i.tags]
    stale += engine.images.list(filters={"dangling": True, "label": SUITE_LABEL})
    for image in stale:
        try:
            engine.images.remove(image.id, force=True)
        except docker.errors.APIError:
            pass
    engine.close()


def build(*args) -> tuple:
    result = mpack("build-image", *args, "--label", SUITE_LABEL, "--json")
    data = json.loads(result.stdout) if result.stdout.strip().startswith("{") else None
    return result, data


@pytest.fixture(scope="session")
def built(client, mlp_model, image_cache):
    """The image of the mlp fixture, built once per session (the other builds reuse its cached layers)."""
    result, data = build(mlp_model, "--tag", TAG, "--base", BASE_IMAGE, "--max-size", "1GB",
                         "--label", "=".join(TRICKY_LABEL))
    assert result.exit_code == 0, result
    return data


def fresh_model(path: Path, hidden: int) -> Path:
    """An mlp whose bytes differ on every call (a random doc string), so no build of an earlier run is a cache hit."""
    import uuid

    import onnx
    from fixtures.onnx_models import mlp

    model = onnx.load(str(mlp(path, hidden=hidden)))
    model.doc_string = uuid.uuid4().hex
    onnx.save(model, str(path))
    return path


def run_in_image(client, *command: str, user: str | None = None) -> str:
    output = client.containers.run(TAG, entrypoint=list(command), remove=True, network_mode="none", user=user)
    return output.decode()


def test_build_run_infer_and_stop(built, mlp_model, client):
    assert built["passed"] and built["tag"] == TAG
    smoke = built["smoke"]
    assert smoke["passed"] and smoke["exit_code"] == 0  # stopped by SIGTERM, cleanly
    assert smoke["stop_s"] < 10  # the server handled SIGTERM: no 10 s wait for SIGKILL
    assert smoke["health"] == "healthy"  # the HEALTHCHECK command, run in the container, passed
    (check,) = smoke["checks"]
    assert check["model"] == "mlp" and check["version"] == "1" and check["outputs"] == ["y"]
    assert check["passed"] and check["max_abs_diff"] <= 1e-4
    # base pinned: a locally imported image has no registry digest, so its image ID pins it
    image = client.images.get(TAG)
    assert built["base"]["ref"] == client.images.get(BASE_IMAGE).id == image.labels[
        "org.opencontainers.image.base.digest"]
    assert built["image_id"] == image.id and built["size_bytes"] == image.attrs["Size"]
    assert not built["over_budget"] and built["max_size_bytes"] == 10**9


def test_labels_and_image_config(built, client, mlp_model):
    import hashlib

    image = client.images.get(TAG)
    labels = image.labels
    assert labels["io.mpack.version"] == "0.1.0" and labels["io.mpack.variant"] == "cpu"
    model_sha = hashlib.sha256(mlp_model.read_bytes()).hexdigest()
    assert labels["io.mpack.models"] == f"mlp:1=sha256:{model_sha}"
    assert len(labels["io.mpack.model.sha256"]) == 64 and labels["io.mpack.model.source"] == "mlp.onnx"
    assert labels["org.opencontainers.image.created"].startswith("20")
    assert labels[TRICKY_LABEL[0]] == TRICKY_LABEL[1]  # verbatim: nothing expanded, nothing run
    config = image.attrs["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/opt/venv/bin/python", "/opt/mpack/entrypoint.py"]
    assert config["Healthcheck"]["Test"] == ["CMD", "/opt/venv/bin/python", "/opt/mpack/entrypoint.py", "--health"]
    assert config["StopSignal"] == "SIGTERM"


def test_sbom_in_the_image_and_the_manifest(built, client, mlp_model):
    sbom = json.loads(run_in_image(client, "cat", "/opt/mpack/sbom.json"))
    names = {p["name"] for p in sbom["packages"]}
    assert {"mpack", "onnxruntime", "numpy"} <= names
    assert not names & {"torch", "tensorflow", "tensorflow-cpu", "onnx", "typer", "rich", "pip", "setuptools"}
    assert all(len(p["sha256"]) == 64 for p in sbom["packages"])
    assert {(p["name"], p["version"]) for p in sbom["packages"]} == {(p["name"], p["version"]) for p in built["sbom"]}
    # exactly these are installed (the build checked it; check the runtime user sees the same and has no pip)
    out = run_in_image(client, "/opt/venv/bin/python", "/opt/mpack/entrypoint.py", "--verify-sbom", user="10001")
    assert out == ""
    assert "id=10001" in "id=" + run_in_image(client, "id", "-u").strip()
    manifest = json.loads(mlp_model.with_name("mlp.mpack.json").read_text())
    entry = [h for h in manifest["history"] if h["step"] == "build-image" and h["image_id"] == built["image_id"]][-1]
    assert entry["size_bytes"] == built["size_bytes"] and entry["smoke"]["passed"]
    assert {p["name"] for p in entry["sbom"]} == names


def test_new_model_version_rebuilds_only_the_model_layers(built, client, tmp_path):
    other = fresh_model(tmp_path / "mlp.onnx", hidden=16)  # same name, new weights
    result, data = build(other, "--tag", "mpack-test/mlp:2", "--base", BASE_IMAGE, "--label", "=".join(TRICKY_LABEL))
    assert result.exit_code == 0, result
    assert data["smoke"]["passed"]
    first, second = client.images.get(TAG), client.images.get("mpack-test/mlp:2")
    layers1, layers2 = first.attrs["RootFS"]["Layers"], second.attrs["RootFS"]["Layers"]
    # base, venv (dependencies + mpack), sbom/entrypoint are shared; only the two model layers are new
    assert len(layers1) == len(layers2) == 5
    assert layers1[:3] == layers2[:3] and layers1[3] != layers2[3] and layers1[4] != layers2[4]
    assert data["build_steps"]["cached"] >= data["build_steps"]["total"] - 12


def test_build_log_marks_cached_steps(built, mlp_model, client, tmp_path):
    """Through the library: each step up to the model is 'Using cache', the model COPY is not."""
    from mpack.image import ImageConfig, docker as engine, prepare_context

    other = fresh_model(tmp_path / "mlp.onnx", hidden=24)
    cfg = ImageConfig(source=other, tag="mpack-test/mlp:3", base=BASE_IMAGE,
                      labels=(tuple(SUITE_LABEL.split("=")), TRICKY_LABEL))
    prepared = prepare_context(cfg, tmp_path / "ctx", client=client)
    events = []
    outcome = engine.build(client, prepared.context_dir, "mpack-test/mlp:3", created="2026-01-01T00:00:00+00:00",
                           timeout=600, on_event=events.append)
    steps = {s.instruction: s for s in outcome.steps}
    copy_models = next(s for s in outcome.steps if s.instruction.startswith("COPY deploy.json"))
    assert not copy_models.cached
    before = [s for s in outcome.steps if s.index < copy_models.index and not s.instruction.startswith("FROM")]
    assert before and all(s.cached for s in before), [(s.index, s.instruction, s.cached) for s in before]
    assert any(s.instruction.startswith("RUN /opt/pip-tool/bin/pip") for s in before)
    assert any(e.total for e in events) and steps


def test_size_budget_exceeded_exits_8_and_is_recorded(built, mlp_model):
    result, data = build(mlp_model, "--tag", TAG, "--base", BASE_IMAGE, "--max-size", "1MB", "--no-smoke",
                         "--label", "=".join(TRICKY_LABEL))
    assert_clean_error(result, 8, "over its budget of 1.0 MB")
    assert data is not None and data["over_budget"] and not data["passed"] and data["size_bytes"] > 10**6
    # the same model again (its manifest has grown since): every step is cached but the two FROMs and the LABEL
    # carrying the build time
    assert data["build_steps"]["total"] - data["build_steps"]["cached"] == 3
    manifest = json.loads(mlp_model.with_name("mlp.mpack.json").read_text())
    assert manifest["history"][-1]["over_budget"] is True


def test_deployment_file_with_two_versions(built, tmp_path):
    from fixtures.onnx_models import mlp

    mlp(tmp_path / "v1.onnx")
    mlp(tmp_path / "v2.onnx", hidden=16)
    deploy = tmp_path / "mpack.deploy.json"
    deploy.write_text(json.dumps({"server": {"http_port": 8123, "grpc_port": 8124},
                                  "models": {"mlp": {"versions": {"1": "v1.onnx", "2": "v2.onnx"},
                                                     "canary": {"version": "2", "weight": "10%"}}}}))
    result, data = build(deploy, "--tag", "mpack-test/deploy:1", "--base", BASE_IMAGE)
    assert result.exit_code == 0, result
    assert [(c["model"], c["version"], c["passed"]) for c in data["smoke"]["checks"]] == [
        ("mlp", "1", True), ("mlp", "2", True)]


def test_build_failure_shows_the_failing_step(built, mlp_model, tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "Dockerfile.cpu.j2").write_text(
        '{% extends "Dockerfile.j2" %}\n{% block model_layers %}{{ super() }}'
        'RUN echo "marker-before-failure" && exit 3\n{% endblock %}\n')
    result, _ = build(mlp_model, "--tag", "mpack-test/broken:1", "--base", BASE_IMAGE, "--templates", tmp_path / "t")
    assert_clean_error(result, 7, "docker build failed at step", "exit 3", "marker-before-failure")


def test_smoke_failure_shows_the_container_log(built, mlp_model, tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "Dockerfile.cpu.j2").write_text(
        '{% extends "Dockerfile.j2" %}\n{% block entrypoint %}ENTRYPOINT ["/opt/venv/bin/python", "-c", '
        '"import sys; print(\'marker-from-the-container\'); sys.exit(4)"]\n{% endblock %}\n')
    result, _ = build(mlp_model, "--tag", "mpack-test/broken:2", "--base", BASE_IMAGE, "--templates", tmp_path / "t")
    assert_clean_error(result, 7, "smoke test failed", "exited with code 4", "marker-from-the-container")


def test_base_image_absent_and_no_registry(mlp_model, client):
    result, _ = build(mlp_model, "--tag", "mpack-test/x:1", "--base", "registry.invalid/nothing/here:1")
    assert_clean_error(result, 7, "not in the local engine and no registry answers", "docker-engine.sh base-image")
    result, _ = build(mlp_model, "--tag", "mpack-test/x:1", "--base", "sha256:" + "0" * 64)
    assert_clean_error(result, 7, "is not in the local engine")
