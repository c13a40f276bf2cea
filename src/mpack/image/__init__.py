"""``mpack build-image``: a hash-pinned, hermetic serving image, built through the Docker Engine API and smoke-tested.

Pipeline: validate the config → gather the models → pin the base image (local engine, else a registry) → build
mpack's wheel and resolve the serving runtime's wheels for the image's platform (lock: version + sha256) → build
the :class:`~mpack.image.context.ImageContext` (a pure function) → render the templates → write the context →
``docker build --network none`` (classic builder) → inspect size → run it and check a V2 infer request per model
version against local ONNX Runtime → stop it with SIGTERM → record the image in each model's manifest.

Public API::

    from mpack.image import ImageConfig, run
    result = run(ImageConfig(source=Path("cnn.onnx"), tag="team/cnn:1.0"))
    result.image_id, result.size, result.smoke.passed
"""

from __future__ import annotations

import datetime as _dt
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mpack import __version__
from mpack.errors import DockerError, SizeBudgetError
from mpack.image.config import ImageConfig, complete, parse_label, parse_size, validate
from mpack.image.context import ImageContext, build_image_context, gather_models, image_deploy_document

__all__ = ["ImageConfig", "ImageContext", "ImageResult", "parse_label", "parse_size", "prepare_context", "run"]


@dataclass
class ImageResult:
    """What ``mpack build-image`` did.

    ``image_id``/``size``/``smoke`` are None with ``--context-only``. ``passed`` is False when the image is over
    its size budget (the smoke test and build failures raise instead).
    """

    tag: str
    variant: str
    base_image: str
    base_ref: str
    context_dir: Path | None
    packages: list[dict]
    models: list[dict]
    image_id: str | None = None
    size: int | None = None
    max_size: int | None = None
    layers: int | None = None
    cached_steps: int = 0
    total_steps: int = 0
    smoke: object = None  # docker.SmokeResult
    labels: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def over_budget(self) -> bool:
        return self.max_size is not None and self.size is not None and self.size > self.max_size

    @property
    def passed(self) -> bool:
        return not self.over_budget and (self.smoke is None or self.smoke.passed)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed, "tag": self.tag, "variant": self.variant,
            "base": {"image": self.base_image, "ref": self.base_ref},
            "context_dir": str(self.context_dir) if self.context_dir else None,
            "image_id": self.image_id, "size_bytes": self.size, "max_size_bytes": self.max_size,
            "over_budget": self.over_budget, "layers": self.layers,
            "build_steps": {"total": self.total_steps, "cached": self.cached_steps},
            "smoke": self.smoke.to_dict() if self.smoke is not None else None,
            "models": self.models, "sbom": self.packages, "labels": self.labels,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()}, "notes": self.notes,
        }


@dataclass(frozen=True)
class PreparedContext:
    """A written build context and what it was made from."""

    ctx: ImageContext
    context_dir: Path
    rendered: dict[str, str]


def prepare_context(cfg: ImageConfig, dest: Path, *, client=None,
                    progress: Callable[[str], None] | None = None) -> PreparedContext:
    """Validate, pin, lock and render: write the build context for ``cfg`` to ``dest`` (new or empty).

    Args:
        cfg: The config.
        dest: The folder to write.
        client: A connected engine, to pin a base image given by name. Defaults to None: then the base must be
            given already pinned (``NAME@sha256:...`` or an image ID), or an engine must be reachable.
        progress: Status messages.

    Returns:
        The PreparedContext.
    """
    from mpack.image import docker as engine
    from mpack.image import render, wheels
    from mpack.resources import load_json, templates_dir

    say = progress or (lambda message: None)
    validate(cfg)
    variant, serving, base = complete(cfg, load_json("compat.json"))
    say("reading the models")
    models, document = gather_models(cfg.source, cfg.name)
    say(f"pinning the base image {base}")
    # With an engine, always resolve: it also checks that a pinned base is present (or pulls it by digest).
    base_ref = engine.pin_offline(base) if client is None else None
    if base_ref is None:
        if client is None:
            try:
                client = engine.connect()
            except DockerError as exc:
                raise DockerError(f"cannot pin the base image {base} by digest: {exc.message}",
                                  hint=f"give --base {base.split('@')[0]}@sha256:DIGEST, or {engine.ENGINE_HINT}"
                                  ) from None
        base_ref = engine.resolve_base(client, base)
    cache = cfg.cache_dir or wheels.default_cache_dir()
    with tempfile.TemporaryDirectory(prefix="mpack-wheel-") as tmp:
        say("building mpack's wheel")
        mpack_path = wheels.build_mpack_wheel(Path(tmp), __version__)
        mpack_wheel = wheels.locked_wheel(mpack_path)
        requirements, constraints = wheels.runtime_requirements(
            mpack_path, serving.extra, variant.runtime_extra, variant.runtime_distribution, variant.runtime_extras)
        say(f"resolving wheels for CPython {variant.python} {variant.platforms[0]}")
        locked, wheel_dir = wheels.resolve(requirements, constraints, variant.platforms, variant.python, cache)
        ctx = build_image_context(
            mpack_version=__version__, variant=variant, serving=serving, base_image=base, base_ref=base_ref,
            wheels=locked, mpack_wheel=mpack_wheel, models=models,
            deploy_document=image_deploy_document(document, models), tag=cfg.tag, extra_labels=cfg.labels)
        say("rendering the templates")
        dirs = ((cfg.templates,) if cfg.templates else ()) + (templates_dir(),)
        rendered = render.render(ctx, dirs, variant.template)
        say(f"writing the build context to {dest}")
        from mpack.image.context import write_context

        write_context(ctx, rendered, dest, wheel_dir, mpack_path)
    return PreparedContext(ctx, dest, rendered)


def run(cfg: ImageConfig, progress: Callable[[str], None] | None = None,
        on_build_event: Callable | None = None) -> ImageResult:
    """Build (or, with ``context_only``, only write the context of) the serving image for ``cfg``.

    Args:
        cfg: The config.
        progress: Status messages.
        on_build_event: Receives each :class:`~mpack.image.docker.BuildEvent` of the build log.

    Returns:
        The ImageResult (also recorded in each model's manifest when an image was built).

    Raises:
        ConfigError: a bad tag, base, label, size or model (exit 2).
        DockerError: no engine, an unresolvable base image, a failed build or smoke test (exit 7).
        SizeBudgetError: the image is larger than ``max_size`` (exit 8), after it was built and recorded.
    """
    from mpack.image import docker as engine

    say = progress or (lambda message: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    validate(cfg)
    if cfg.context_only is not None:
        prepared = prepare_context(cfg, cfg.context_only, progress=say)
        timings["context"] = time.perf_counter() - started
        return _result(cfg, prepared, timings)

    client = engine.connect()
    with tempfile.TemporaryDirectory(prefix="mpack-image-") as tmp:
        prepared = prepare_context(cfg, Path(tmp) / "context", client=client, progress=say)
        timings["context"] = time.perf_counter() - started
        say(f"building {cfg.tag}")
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        outcome = engine.build(client, prepared.context_dir, cfg.tag, created=created,
                               timeout=cfg.build_timeout_s, on_event=on_build_event)
        timings["build"] = outcome.seconds
    result = _result(cfg, prepared, timings)
    facts = engine.image_facts(client, outcome.image_id)
    result.context_dir = None
    result.image_id, result.size, result.layers, result.labels = (
        facts["id"], facts["size"], len(facts["layers"]), facts["labels"])
    result.total_steps = len(outcome.steps)
    result.cached_steps = sum(1 for s in outcome.steps if s.cached)
    if cfg.smoke:
        smoke_started = time.perf_counter()
        versions = tuple((m.name, m.version, m.model.source) for m in prepared.ctx.models)
        result.smoke = engine.smoke_test(client, result.image_id, versions, cfg.smoke_timeout_s, on_event=say,
                                         health_command=prepared.ctx.health_command)
        timings["smoke"] = time.perf_counter() - smoke_started
    else:
        result.notes.append("smoke test skipped (--no-smoke)")
    timings["total"] = time.perf_counter() - started
    _record(prepared.ctx, result)
    if result.over_budget:
        raise SizeBudgetError(result, f"image {cfg.tag} is {_mb(result.size)}, over its budget of "
                                      f"{_mb(result.max_size)}",
                              hint="look at the largest packages in the SBOM, or raise --max-size")
    return result


def _mb(size: int | None) -> str:
    return "?" if size is None else f"{size / 1e6:.1f} MB"


def _result(cfg: ImageConfig, prepared: PreparedContext, timings: dict) -> ImageResult:
    ctx = prepared.ctx
    return ImageResult(
        tag=cfg.tag, variant=ctx.variant, base_image=ctx.base_image, base_ref=ctx.base_ref,
        context_dir=prepared.context_dir, packages=ctx.sbom()["packages"],
        models=[{"name": m.name, "version": m.version, "sha256": m.model.sha256, "path": m.image_path}
                for m in ctx.models],
        max_size=cfg.max_size, labels=dict(ctx.labels), seconds=timings)


def _record(ctx: ImageContext, result: ImageResult) -> None:
    """A ``build-image`` entry in the manifest of every served model file."""
    from mpack import manifest

    record = {"image": result.tag, "image_id": result.image_id, "size_bytes": result.size,
              "max_size_bytes": result.max_size, "over_budget": result.over_budget, "variant": result.variant,
              "base": {"image": ctx.base_image, "ref": ctx.base_ref}, "mpack": ctx.mpack_version,
              "smoke": result.smoke.to_dict() if result.smoke is not None else None,
              "sbom": result.packages}
    for model in ctx.models:
        manifest.append_step(model.model.source, "build-image",
                             {**record, "served_as": {"name": model.name, "version": model.version}})
