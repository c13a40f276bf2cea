"""``mpack build-image`` configuration: parse → validate → complete (cog's config → validate → complete).

Everything here is pure: no engine, no network, no file writes. :func:`validate` rejects what could break out of a
Dockerfile line (control characters, newlines) before anything is rendered; :func:`complete` fills in the base
image, Python version, wheel platforms and runtime from ``resources/compat.json``, with no if/else ladder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mpack.errors import ConfigError

# Docker's reference grammar (distribution/reference), kept to what a tag and a base image may be.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:localhost|{_LABEL}(?:\.{_LABEL})+)(?::[0-9]+)?"
_NAME = rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"sha256:[0-9a-f]{64}"
TAG_RE = re.compile(rf"^(?P<name>{_NAME}):(?P<tag>{_TAG})$")
BASE_RE = re.compile(rf"^(?:(?P<id>{_DIGEST})|(?P<name>{_NAME})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?)$")
LABEL_KEY_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?$")
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MODEL_SUFFIXES = (".onnx",)
DEPLOY_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class ImageConfig:
    """What ``mpack build-image`` was asked for.

    Args:
        source: An ``.onnx`` model (served as version 1 under its file stem or ``name``) or a deployment file
            (``mpack.deploy.yaml``/``.json``, the format ``mpack serve --config`` reads).
        tag: ``NAME:VERSION`` of the image, e.g. ``registry.example.com/team/cnn:1.2``.
        base: The base image; it must provide python3 with venv of the variant's Python version. Defaults to the
            variant's base in compat.json.
        gpu: Render the CUDA variant (onnxruntime-gpu). Defaults to False.
        context_only: Write the build context to this directory and build nothing. Defaults to None.
        max_size: Fail (exit 8) when the built image is larger, in bytes. Defaults to None (no budget).
        smoke: Run the built image and check one inference against local ONNX Runtime. Defaults to True.
        name: Model name for a single ``.onnx`` source. Defaults to the file stem.
        labels: Extra OCI labels, ``(key, value)`` pairs. Defaults to none.
        cache_dir: Where resolved wheels are kept between builds. Defaults to ``$MPACK_CACHE_DIR`` or
            ``~/.cache/mpack``.
        templates: A folder searched before the built-in templates: a ``Dockerfile.cpu.j2`` there replaces the
            built-in one and may ``{% extends "Dockerfile.j2" %}`` to override single blocks. Defaults to None.
        build_timeout_s: Longest the engine may take to build. Defaults to 900.
        smoke_timeout_s: Longest the container may take to become ready. Defaults to 120.
    """

    source: Path
    tag: str
    base: str | None = None
    gpu: bool = False
    context_only: Path | None = None
    max_size: int | None = None
    smoke: bool = True
    name: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    cache_dir: Path | None = None
    templates: Path | None = None
    build_timeout_s: float = 900.0
    smoke_timeout_s: float = 120.0


@dataclass(frozen=True)
class VariantSpec:
    """One row of compat.json ``variants``, completed: what the image is built from and runs."""

    name: str
    template: str
    base: str
    python: str
    platforms: tuple[str, ...]
    runtime_extra: str
    runtime_distribution: str
    runtime_extras: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ServingSpec:
    """compat.json ``serving``: how the image starts the server."""

    module: str
    extra: str
    http_port: int
    grpc_port: int
    uid: int


def check_text(field_name: str, value: str) -> str:
    """Reject control characters (newline, CR, tab, NUL, ESC, DEL): one would end a Dockerfile instruction and
    start another. Everything rendered into a Dockerfile passes through here first."""
    if not isinstance(value, str) or not value:
        raise ConfigError(field_name, value, "must be a non-empty string")
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ConfigError(field_name, value, f"contains a control character ({bad!r})",
                          hint="image names, tags and labels must be single-line text")
    return value


def validate_tag(tag: str) -> str:
    check_text("--tag", tag)
    if not TAG_RE.match(tag) or len(tag) > 255:
        raise ConfigError("--tag", tag, "is not a valid image tag NAME:VERSION",
                          hint="lowercase name with an explicit version, e.g. team/cnn:1.0 or "
                               "registry.example.com:5000/cnn:2024-05")
    return tag


def validate_base(base: str) -> str:
    check_text("--base", base)
    match = BASE_RE.match(base)
    if not match or match.group("name") == "sha256":  # `sha256:abc` is a malformed ID, not an image named sha256
        raise ConfigError("--base", base, "is not a valid image reference",
                          hint="NAME[:TAG][@sha256:DIGEST] or an image ID sha256:..., e.g. python:3.11-slim-bookworm")
    return base


def validate_label(key: str, value: str) -> tuple[str, str]:
    check_text("--label", key)
    check_text("--label", value)
    if not LABEL_KEY_RE.match(key):
        raise ConfigError("--label", key, "is not a valid label key",
                          hint="lowercase letters, digits, '.', '-', '_', e.g. org.example.team")
    return key, value


def parse_label(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` → (key, value)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError("--label", text, "expected KEY=VALUE", hint="e.g. org.example.team=vision")
    return validate_label(key.strip(), value)


def parse_size(text: str) -> int:
    """``500MB``, ``1.5GB``, ``300MiB`` or a byte count → bytes (MB = 10**6, as ``docker images`` counts)."""
    match = _SIZE_RE.match(text or "")
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError("--max-size", text, "is not a size", hint="e.g. 500MB, 1.5GB or 300MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def validate(cfg: ImageConfig) -> ImageConfig:
    """Check every user-given value; raises ConfigError naming the field and the value."""
    validate_tag(cfg.tag)
    if cfg.base is not None:
        validate_base(cfg.base)
    for key, value in cfg.labels:
        validate_label(key, value)
    if cfg.name is not None:
        check_text("--name", cfg.name)
        if not all(c.isalnum() or c in "-_." for c in cfg.name):
            raise ConfigError("--name", cfg.name, "may only use letters, digits, '-', '_' and '.'")
    if cfg.context_only is not None and cfg.context_only.exists() and (
            not cfg.context_only.is_dir() or any(cfg.context_only.iterdir())):
        raise ConfigError("--context-only", str(cfg.context_only), "exists and is not an empty folder",
                          hint="give a new folder")
    if cfg.templates is not None and not cfg.templates.is_dir():
        raise ConfigError("--templates", str(cfg.templates), "is not a folder")
    if cfg.max_size is not None and cfg.max_size <= 0:
        raise ConfigError("--max-size", cfg.max_size, "must be positive")
    suffix = cfg.source.suffix.lower()
    if suffix not in MODEL_SUFFIXES + DEPLOY_SUFFIXES:
        raise ConfigError("MODEL", str(cfg.source), "is neither an .onnx model nor a deployment file",
                          hint="give model.onnx or mpack.deploy.yaml (.yml/.json)")
    if not cfg.source.is_file():
        raise ConfigError("MODEL", str(cfg.source), "no such file")
    if cfg.name is not None and suffix not in MODEL_SUFFIXES:
        raise ConfigError("--name", cfg.name, "applies to a single .onnx model only",
                          hint="a deployment file names its models itself")
    return cfg


def manylinux_platforms(glibc: str, arch: str) -> tuple[str, ...]:
    """Every manylinux tag a system with this glibc accepts, newest first: pip does not expand ``--platform``."""
    major, minor = (int(part) for part in glibc.split("."))
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for m, name in legacy.items() if m <= minor]
    return tuple(tags)


def variant_spec(compat: dict, gpu: bool) -> VariantSpec:
    """The compat.json row of the variant, as a VariantSpec."""
    name = "gpu" if gpu else "cpu"
    row = compat["variants"][name]
    return VariantSpec(
        name=name, template=row["template"], base=row["base"], python=row["python"],
        platforms=manylinux_platforms(row["glibc"], row["arch"]), runtime_extra=row["runtime_extra"],
        runtime_distribution=row["runtime_distribution"], runtime_extras=tuple(row["runtime_extras"]),
        env=tuple(sorted(row["env"].items())))


def serving_spec(compat: dict) -> ServingSpec:
    row = compat["serving"]
    return ServingSpec(module=row["module"], extra=row["extra"], http_port=int(row["http_port"]),
                       grpc_port=int(row["grpc_port"]), uid=int(row["uid"]))


def complete(cfg: ImageConfig, compat: dict) -> tuple[VariantSpec, ServingSpec, str]:
    """Fill in what the user left out from the compatibility table: (variant, serving, base image)."""
    variant = variant_spec(compat, cfg.gpu)
    return variant, serving_spec(compat), cfg.base or variant.base
