"""The typed context the image templates are rendered from, and the build context folder written from it.

:func:`build_image_context` is pure: every input is an argument (no environment, clock or file reads), so the same
inputs give the same :class:`ImageContext`, and :func:`write_context` turns that into the same bytes on disk
(sorted names, fixed modes and timestamps). The models a context serves are gathered first by
:func:`gather_models`, which is where files are read and hashed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mpack.errors import ConfigError, InputFileError
from mpack.image.config import DEPLOY_SUFFIXES, ServingSpec, VariantSpec
from mpack.image.wheels import LockedWheel, lock_text

APP_DIR = "/opt/mpack"
VENV_DIR = "/opt/venv"
# Every file in a context gets this mtime (SOURCE_DATE_EPOCH style), so a tar of the folder is reproducible too.
FIXED_MTIME = 315532800  # 1980-01-01, the earliest time a zip (wheel) can hold


@dataclass(frozen=True)
class ModelFile:
    """A file copied into the image: ``source`` on the host → ``dest`` relative to the context root."""

    source: Path
    dest: str
    sha256: str


@dataclass(frozen=True)
class ServedModel:
    """One version of one served model, with the files that travel with it (its external data)."""

    name: str
    version: str
    model: ModelFile
    files: tuple[ModelFile, ...]
    origin: str  # where the model came from, per its manifest (or its file name)

    @property
    def image_path(self) -> str:
        """The model's path inside the image."""
        return f"{APP_DIR}/{self.model.dest}"


@dataclass(frozen=True)
class ImageContext:
    """Everything the templates see, as ``ctx``. Built by :func:`build_image_context`.

    Args:
        mpack_version: The mpack that rendered it (labels, header comment).
        variant: ``cpu`` or ``gpu``.
        base_image: The base image as given (``python:3.11-slim-bookworm``).
        base_ref: The base image pinned: ``NAME@sha256:DIGEST`` or an image ID ``sha256:...``; what FROM uses.
        python_version: The Python of the base image the wheels are for (``3.11``).
        server_module: The module the container runs (``python -m``).
        uid: The non-root user the server runs as.
        http_port: REST port (EXPOSE, health check).
        grpc_port: gRPC port, or None when off.
        env: Runtime environment variables, sorted.
        labels: OCI and mpack labels, sorted; ``org.opencontainers.image.created`` is a build argument instead,
            so the context stays byte-identical between builds.
        wheels: The third-party wheels, pinned.
        mpack_wheel: mpack's own wheel, pinned.
        models: The served models.
        deploy_document: The server config the image runs with (``deploy.json``).
        app_dir: Where the server config, entry point, SBOM and models live in the image.
        venv_dir: The virtual environment the packages are installed into.
    """

    mpack_version: str
    variant: str
    base_image: str
    base_ref: str
    python_version: str
    server_module: str
    uid: int
    http_port: int
    grpc_port: int | None
    env: tuple[tuple[str, str], ...]
    labels: tuple[tuple[str, str], ...]
    wheels: tuple[LockedWheel, ...]
    mpack_wheel: LockedWheel
    models: tuple[ServedModel, ...]
    deploy_document: dict = field(hash=False, compare=False)
    app_dir: str = APP_DIR
    venv_dir: str = VENV_DIR

    @property
    def python(self) -> str:
        return f"{self.venv_dir}/bin/python"

    @property
    def entrypoint(self) -> tuple[str, ...]:
        """Exec form: the Python of the venv running entrypoint.py, which starts the server in-process."""
        return (self.python, f"{self.app_dir}/entrypoint.py")

    @property
    def health_command(self) -> tuple[str, ...]:
        return (*self.entrypoint, "--health")

    @property
    def verify_command(self) -> tuple[str, ...]:
        return (*self.entrypoint, "--verify-sbom")

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.http_port,) if self.grpc_port is None else (self.http_port, self.grpc_port)

    @property
    def models_sha256(self) -> str:
        """One digest over every served model file (name, version, sha256), for the image label."""
        import hashlib

        text = "\n".join(f"{m.name}:{m.version}:{f.dest}:{f.sha256}" for m in self.models for f in m.files)
        return hashlib.sha256(text.encode()).hexdigest()

    def sbom(self) -> dict:
        """The image's bill of materials: base image and Python packages (version, wheel, sha256)."""
        return {
            "schema": 1,
            "mpack": self.mpack_version,
            "variant": self.variant,
            "base": {"image": self.base_image, "ref": self.base_ref, "python": self.python_version},
            "packages": [{"name": w.name, "version": w.version, "wheel": w.filename, "sha256": w.sha256}
                         for w in sorted((*self.wheels, self.mpack_wheel), key=lambda w: w.name)],
        }

    def models_index(self) -> dict:
        """The served models with their sha256 and origin (``models.json``, copied with the models: kept out of
        sbom.json so that a new model version leaves the SBOM's layer cached)."""
        return {"schema": 1, "sha256": self.models_sha256,
                "models": [{"name": m.name, "version": m.version, "path": m.image_path, "sha256": m.model.sha256,
                            "origin": m.origin, "files": {f.dest: f.sha256 for f in m.files}} for m in self.models]}


def build_image_context(*, mpack_version: str, variant: VariantSpec, serving: ServingSpec, base_image: str,
                        base_ref: str, wheels: tuple[LockedWheel, ...], mpack_wheel: LockedWheel,
                        models: tuple[ServedModel, ...], deploy_document: dict, tag: str,
                        extra_labels: tuple[tuple[str, str], ...] = ()) -> ImageContext:
    """The ImageContext for these inputs. Pure: no file, environment or clock is read.

    Args:
        mpack_version: mpack's version.
        variant: The completed variant (compat.json row).
        serving: How the server is started (compat.json ``serving``).
        base_image: The base image as given.
        base_ref: The pinned base reference (digest or image ID).
        wheels: Third-party wheels, pinned.
        mpack_wheel: mpack's wheel, pinned.
        models: Served models.
        deploy_document: The in-image server config (see :func:`image_deploy_document`).
        tag: The image tag, ``NAME:VERSION`` (title and version labels).
        extra_labels: The user's ``--label`` pairs; they override mpack's.

    Returns:
        The ImageContext.
    """
    server = deploy_document.get("server", {})
    http_port = int(server.get("http_port", serving.http_port))
    grpc_port = server.get("grpc_port", serving.grpc_port)
    grpc_port = None if grpc_port in (None, False, "off", "none", "false", "") else int(grpc_port)
    name, _, version = tag.rpartition(":")
    digest = base_ref.rpartition("@")[2] if "@" in base_ref else base_ref
    origins = sorted({m.origin for m in models})
    labels = {
        "org.opencontainers.image.title": name.rpartition("/")[2],
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.base.name": base_image,
        "org.opencontainers.image.base.digest": digest,
        "org.opencontainers.image.description": "ONNX models served by mpack (Open Inference Protocol V2)",
        "io.mpack.version": mpack_version,
        "io.mpack.variant": variant.name,
        "io.mpack.models": " ".join(f"{m.name}:{m.version}=sha256:{m.model.sha256}" for m in models),
        "io.mpack.model.source": "; ".join(origins),
        "io.mpack.sbom": f"{APP_DIR}/sbom.json",
    }
    env = {
        # The server reads its whole config from here; MPACK_SERVE_* variables still override single settings.
        "MPACK_SERVE_CONFIG": f"{APP_DIR}/deploy.json",
        # Inside the container the server must listen beyond loopback to be reachable through a published port.
        "MPACK_SERVE_HOST": "0.0.0.0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "HOME": "/tmp",
        **dict(variant.env),
    }
    ctx = ImageContext(
        mpack_version=mpack_version, variant=variant.name, base_image=base_image, base_ref=base_ref,
        python_version=variant.python, server_module=serving.module, uid=serving.uid, http_port=http_port,
        grpc_port=grpc_port, env=tuple(sorted(env.items())), labels=(), wheels=tuple(wheels),
        mpack_wheel=mpack_wheel, models=tuple(models), deploy_document=deploy_document)
    labels["io.mpack.model.sha256"] = ctx.models_sha256
    labels.update(dict(extra_labels))
    return _replace(ctx, labels=tuple(sorted(labels.items())))


def _replace(ctx: ImageContext, **changes) -> ImageContext:
    from dataclasses import replace

    return replace(ctx, **changes)


# ---- gathering the models (reads and hashes files) --------------------------------------------------------------

def _origin(model_path: Path) -> str:
    from mpack import manifest

    data = manifest.load(model_path) or {}
    source = data.get("source") or {}
    if isinstance(source, dict) and source.get("path"):
        fmt = f"{source['format']}:" if source.get("format") else ""
        return f"{fmt}{source['path']}"
    return model_path.name


def _model_files(name: str, version: str, path: Path) -> tuple[ModelFile, tuple[ModelFile, ...]]:
    from mpack import onnx_io
    from mpack.image.wheels import sha256_file

    if not path.is_file():
        raise InputFileError(f"model {name} version {version}: {path} does not exist", hint="check the path")
    graph = onnx_io.load_graph(path)
    folder = f"models/{name}/{version}"
    model = ModelFile(path, f"{folder}/{path.name}", sha256_file(path))
    files = [model]
    for location in onnx_io.external_files(graph):
        data = (path.parent / location).resolve()
        if not data.is_file() or ".." in Path(location).parts or Path(location).is_absolute():
            raise InputFileError(f"{path}: external data {location!r} is missing or outside the model's folder",
                                 hint="keep the .onnx.data file beside the model")
        files.append(ModelFile(data, f"{folder}/{location}", sha256_file(data)))
    # N.B. the manifest (model.mpack.json) stays out of the image: every build appends to it, so copying it would
    # change the model layer on each rebuild of the same model. Its provenance reaches the image as the origin.
    return model, tuple(sorted(files, key=lambda f: f.dest))


def gather_models(source: Path, name: str | None = None) -> tuple[tuple[ServedModel, ...], dict]:
    """The models to serve and the deployment document they come with.

    Args:
        source: An ``.onnx`` model or a deployment file (validated with ``mpack.serving``'s own loader).
        name: The served name of a single model. Defaults to the file stem.

    Returns:
        (served models sorted by name and version, the raw deployment document, ``{}`` for a single model).
    """
    if source.suffix.lower() in DEPLOY_SUFFIXES:
        from mpack.serving.config import load_config, read_deploy_file
        from mpack.serving.errors import ServeConfigError

        try:
            config = load_config(config_file=source, env={}, cwd=source.parent)
            document = read_deploy_file(source)
        except ServeConfigError as exc:
            raise ConfigError(f"{source.name}: {exc.field}", exc.value, exc.problem, hint=exc.hint) from None
        pairs = [(spec.name, version, path) for spec in config.models for version, path in spec.versions]
        document = _with_primaries(document, {spec.name: spec.primary for spec in config.models})
    else:
        model_name = name or source.stem
        if not model_name or not all(c.isalnum() or c in "-_." for c in model_name):
            raise ConfigError("--name", model_name, "may only use letters, digits, '-', '_' and '.'",
                              hint="pass --name NAME")
        document = {}
        pairs = [(model_name, "1", source)]
    served = []
    for model_name, version, path in sorted(pairs, key=lambda p: (p[0], p[1])):
        model, files = _model_files(model_name, version, Path(path))
        served.append(ServedModel(model_name, version, model, files, _origin(Path(path))))
    return tuple(served), document


def _with_primaries(document: dict, primaries: dict[str, str]) -> dict:
    """``document`` with each model's ``primary`` written out as the server's loader chose it (the first version
    when the file names none): the image's deploy.json sorts its keys, so an implicit primary would change."""
    raw_models = document.get("models") or {}
    if isinstance(raw_models, list):
        raw_models = {str(m.get("name")): m for m in raw_models if isinstance(m, dict)}
    models: dict = {}
    for name, entry in raw_models.items():
        entry = {"versions": {"1": entry}} if isinstance(entry, str) else dict(entry)
        if str(name) in primaries:
            entry["primary"] = primaries[str(name)]
        models[name] = entry
    return {**document, "models": models}


def image_deploy_document(document: dict, models: tuple[ServedModel, ...]) -> dict:
    """The deployment document the image runs with: the user's ``server``/``batching`` sections and per-model
    routing as given, model paths rewritten to where the files are in the image. Pure."""
    raw_models = document.get("models") or {}
    if isinstance(raw_models, list):
        raw_models = {str(m.get("name")): m for m in raw_models if isinstance(m, dict)}
    out: dict = {key: document[key] for key in ("server", "batching") if document.get(key) is not None}
    out_models: dict = {}
    for model in models:
        entry = raw_models.get(model.name)
        entry = dict(entry) if isinstance(entry, dict) else {}
        entry.pop("name", None)
        shadow = entry.get("shadow")
        if isinstance(shadow, dict) and shadow.get("log"):
            # The image's files are read-only to the server's user: a shadow log goes to a writable place.
            entry["shadow"] = {**shadow, "log": f"/tmp/{model.name}-shadow.jsonl"}
        versions = dict(out_models.get(model.name, {}).get("versions", {}))
        versions[model.version] = model.image_path
        entry["versions"] = versions
        out_models[model.name] = entry
    out["models"] = out_models
    return out


# ---- writing the build context ---------------------------------------------------------------------------------

def context_files(ctx: ImageContext, rendered: dict[str, str]) -> dict[str, str]:
    """The text files of the context (rendered templates, lock files, SBOM), name → content."""
    header = (f"Rendered by mpack {ctx.mpack_version}: every package pinned by version and sha256.\n"
              f"Installed with: pip install --no-index --no-deps --require-hashes -r <this file>")
    files = dict(rendered)
    files["requirements.lock"] = lock_text(ctx.wheels, header)
    files["mpack.lock"] = lock_text((ctx.mpack_wheel,), header)
    files["sbom.json"] = json.dumps(ctx.sbom(), indent=2, sort_keys=True) + "\n"
    files["models.json"] = json.dumps(ctx.models_index(), indent=2, sort_keys=True) + "\n"
    return files


def write_context(ctx: ImageContext, rendered: dict[str, str], dest: Path, wheel_dir: Path,
                  mpack_wheel_path: Path) -> Path:
    """Write the build context: rendered files, locks, SBOM, ``wheels/`` (third-party), ``dist/`` (mpack) and
    ``models/``. ``dest`` must not exist or be empty; everything gets fixed modes and timestamps."""
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError("--context-only", str(dest), "exists and is not empty", hint="give a new folder")
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in context_files(ctx, rendered).items():
        (dest / name).write_text(text, encoding="utf-8")
    for wheel in ctx.wheels:
        _copy(wheel_dir / wheel.filename, dest / "wheels" / wheel.filename)
    _copy(mpack_wheel_path, dest / "dist" / ctx.mpack_wheel.filename)
    for model in ctx.models:
        for item in model.files:
            _copy(item.source, dest / item.dest)
    normalize_tree(dest)
    return dest


def _copy(src: Path, dst: Path) -> None:
    # A copy, never a hard link: normalize_tree() sets modes and times, which must not reach the user's files.
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def normalize_tree(root: Path) -> None:
    """Modes 0644/0755 and a fixed mtime on everything under ``root`` (files first, then folders)."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            path.chmod(0o644)
        else:
            path.chmod(0o755)
        os.utime(path, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))
