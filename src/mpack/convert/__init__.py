"""``mpack convert``: a PyTorch or TensorFlow model → a checked ONNX file, a manifest and a parity report.

Pipeline: detect the source format → export into a private temporary directory beside the output → full
``onnx.checker`` + shape inference → parity against the source on seeded inputs at two batch sizes (and two sizes
of every other symbolic dim) → manifest → rename everything into place. Nothing is written when a step fails.
"""

from __future__ import annotations

import platform
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mpack import __version__, manifest
from mpack._optional import distribution_version
from mpack.convert.base import ExportedModel, ExportRequest
from mpack.errors import ConfigError, InputFileError, MpackError, ParityError, first_line
from mpack.inputs import DEFAULT_BATCH_SIZES, parity_cases, random_feeds
from mpack.onnx_io import OnnxFacts, finalize
from mpack.parity import ParityReport, Tolerances, compare_outputs
from mpack.specs import TensorSpec

# torch 2.13's dynamo exporter targets opset 18 natively, and tf2onnx 1.17 supports up to 18.
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 13, 18
EXPORTERS = ("auto", "dynamo", "torchscript")

_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
TORCH_SUFFIXES = {".pt", ".pth", ".pkl", ".bin", ".ts", ".torchscript", ".jit"}
FORMATS = {  # kind -> framework
    "torchscript": "pytorch", "export-program": "pytorch", "pickled-module": "pytorch", "entry-point": "pytorch",
    "savedmodel": "tensorflow", "keras": "tensorflow", "h5": "tensorflow", "tflite": "tensorflow",
}


@dataclass(frozen=True)
class ConvertConfig:
    """What ``mpack convert`` was asked to do.

    Args:
        source: File, SavedModel directory or ``package.module:factory``.
        output: The .onnx file to write; its manifest goes beside it.
        inputs: Input specs, or None to use the model's signature.
        opset: ONNX opset. Defaults to 18.
        exporter: "auto" (dynamo, TorchScript-based as fallback), "dynamo" or "torchscript".
        weights: state_dict for an entry point's module.
        dynamic_batch: Make axis 0 symbolic. Defaults to True.
        verify: Run the parity check. Defaults to True.
        tolerances: Parity tolerances.
        batch_sizes: Batch sizes the parity check runs at. Defaults to (1, 4).
        seed: Seed of the parity inputs. Defaults to 0.
        external_data: "auto", "always" or "never".
    """

    source: str
    output: Path
    inputs: tuple[TensorSpec, ...] | None = None
    opset: int = DEFAULT_OPSET
    exporter: str = "auto"
    weights: Path | None = None
    dynamic_batch: bool = True
    verify: bool = True
    tolerances: Tolerances = field(default_factory=Tolerances)
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    seed: int = 0
    external_data: str = "auto"


@dataclass
class ConvertResult:
    output: Path
    manifest_path: Path
    kind: str
    framework: str
    framework_version: str
    exporter: str
    opset: int
    facts: OnnxFacts
    parity: ParityReport | None
    notes: list[str]
    seconds: dict[str, float]

    @property
    def passed(self) -> bool:
        return self.parity is None or self.parity.passed

    def to_dict(self) -> dict:
        return {"output": str(self.output), "manifest": str(self.manifest_path), "kind": self.kind,
                "framework": self.framework, "framework_version": self.framework_version,
                "exporter": self.exporter, "opset": self.opset,
                "inputs": [s.to_dict() for s in self.facts.inputs],
                "outputs": [s.to_dict() for s in self.facts.outputs],
                "external_data": self.facts.external_files,
                "parity": self.parity.to_dict() if self.parity else None,
                "notes": self.notes, "seconds": self.seconds}


def detect(source: str) -> str:
    """The source format of ``source``, from its path, its contents and its suffix.

    Raises:
        InputFileError: when the path is missing or is no format mpack reads.
    """
    path = Path(source)
    if not path.exists():
        if _ENTRY_POINT.match(source) and not source.startswith(("/", ".")):
            return "entry-point"
        raise InputFileError(f"{source} does not exist",
                             hint="give a model file, a SavedModel directory or package.module:factory")
    if path.is_dir():
        if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
            return "savedmodel"
        raise InputFileError(f"{source} is a directory but not a TensorFlow SavedModel (no saved_model.pb)",
                             hint="point at the SavedModel directory itself, or at a model file")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return "keras"
    if suffix in (".h5", ".hdf5"):
        return "h5"
    if suffix == ".tflite":
        return "tflite"
    if suffix == ".onnx":
        raise InputFileError(f"{source} is already an ONNX model", hint="use mpack inspect or mpack validate on it")
    if suffix == ".pt2":
        return "export-program"
    if suffix in TORCH_SUFFIXES:
        return _torch_kind(path)
    raise InputFileError(f"{source}: unknown model format '{suffix or path.name}'",
                         hint="mpack reads .pt/.pth (TorchScript or torch.save), .pt2, SavedModel dirs, .keras, "
                              ".h5 and .tflite")


def _torch_kind(path: Path) -> str:
    """torch.jit.save, torch.export.save and torch.save all write zip archives; their members tell them apart."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        # Legacy (pre-1.6) torch.save files are plain pickles; torch.load tells whether it really is one.
        return "pickled-module"
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("archive_format") or "/models/" in n and n.endswith(".json") for n in names):
        return "export-program"
    return "pickled-module"


def _check_config(cfg: ConvertConfig) -> None:
    manifest.check_output(cfg.output, "model.onnx")
    if not MIN_OPSET <= cfg.opset <= MAX_OPSET:
        raise ConfigError("--opset", cfg.opset, f"is outside the supported range {MIN_OPSET}..{MAX_OPSET}")
    if cfg.exporter not in EXPORTERS:
        raise ConfigError("--exporter", cfg.exporter, f"is not one of {', '.join(EXPORTERS)}")
    if cfg.external_data not in ("auto", "always", "never"):
        raise ConfigError("--external-data", cfg.external_data, "is not one of auto, always, never")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise ConfigError("--batch-sizes", list(cfg.batch_sizes), "must be positive integers")
    if cfg.weights is not None and not cfg.weights.is_file():
        raise InputFileError(f"weights file {cfg.weights} does not exist")
    names = [s.name for s in cfg.inputs or ()]
    if len(set(names)) != len(names):
        raise ConfigError("--input", names, "names an input twice")


def export(req: ExportRequest) -> ExportedModel:
    """Dispatch to the framework's exporter (imported only now, so the CLI stays light)."""
    if FORMATS[req.kind] == "pytorch":
        from mpack.convert.torch import export_torch

        return export_torch(req)
    if req.exporter != "auto":
        raise ConfigError("--exporter", req.exporter, "applies to PyTorch models only",
                          hint="TensorFlow models always go through tf2onnx")
    if req.weights is not None:
        raise ConfigError("--weights", str(req.weights), "applies to PyTorch entry points only")
    from mpack.convert.tensorflow import export_tensorflow

    return export_tensorflow(req)


def check_parity(exported: ExportedModel, onnx_path: Path, tolerances: Tolerances,
                 batch_sizes: tuple[int, ...], seed: int) -> ParityReport:
    """Run the source model and the ONNX model (ORT, CPU) on the same seeded inputs for each size case."""
    from mpack.backends.onnxruntime import OnnxRuntimeRunner

    report = ParityReport(reference=exported.framework, candidate="onnxruntime[cpu]")
    cases = parity_cases(exported.input_specs, batch_sizes)
    with OnnxRuntimeRunner(onnx_path) as ort_runner, exported.source_runner as source:
        for i, case in enumerate(cases):
            feeds = random_feeds(exported.input_specs, case.sizes, seed=seed + i)
            try:
                reference = source.infer(feeds)
            except MpackError:
                raise
            except Exception as exc:  # the user's model rejects this size: a finding, not a crash
                report.errors.append(f"{case.label}: the {exported.framework} model itself failed: "
                                     f"{type(exc).__name__}: {first_line(exc, 200)}")
                continue
            try:
                candidate = ort_runner.infer(feeds)
            except Exception as exc:  # ORT run failures (e.g. a frozen reshape) are parity failures, not crashes
                report.errors.append(f"{case.label}: onnxruntime failed: {str(exc).splitlines()[0][:200]}")
                continue
            compare_outputs(report, case.label, reference, candidate, tolerances)
    return report


def run(cfg: ConvertConfig, progress: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert, check and verify one model; see the module docstring for the steps.

    Raises:
        MpackError: for bad input (exit 2), a missing extra (4), an export failure (5) or a parity failure (3).
    """
    step = progress or (lambda message: None)
    _check_config(cfg)
    kind = detect(cfg.source)
    if cfg.weights is not None and kind != "entry-point":
        raise ConfigError("--weights", str(cfg.weights), "applies to package.module:factory entry points only")
    seconds: dict[str, float] = {}
    work = manifest.private_dir(cfg.output)
    try:
        step(f"exporting {kind} model")
        t0 = time.perf_counter()
        exported = export(ExportRequest(cfg.source, kind, list(cfg.inputs) if cfg.inputs else None, cfg.opset,
                                        cfg.dynamic_batch, work, cfg.exporter, cfg.weights))
        seconds["export"] = time.perf_counter() - t0
        step("checking the ONNX model (onnx.checker, shape inference)")
        t0 = time.perf_counter()
        final_dir = work / "final"
        final_dir.mkdir()
        facts = finalize(exported.onnx_path, final_dir / cfg.output.name, cfg.external_data,
                         specs=exported.input_specs)
        seconds["check"] = time.perf_counter() - t0
        report = None
        if cfg.verify:
            step("checking parity against the source model")
            t0 = time.perf_counter()
            report = check_parity(exported, facts.path, cfg.tolerances, cfg.batch_sizes, cfg.seed)
            seconds["parity"] = time.perf_counter() - t0
            if not report.passed:
                raise ParityError(f"parity check failed: the ONNX model differs from the {exported.framework} "
                                  "model beyond tolerance", report=report,
                                  hint=_parity_hint(exported))
        record = _manifest(cfg, kind, exported, facts, report)
        manifest.write_atomic(final_dir / manifest.manifest_path_for(cfg.output).name, record)
        manifest.publish(final_dir, cfg.output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    facts.path = cfg.output
    return ConvertResult(cfg.output, manifest.manifest_path_for(cfg.output), kind, exported.framework,
                         exported.framework_version, exported.exporter, cfg.opset, facts, report,
                         exported.notes, seconds)


def _parity_hint(exported: ExportedModel) -> str:
    if "torchscript" in exported.exporter:
        return "the TorchScript-based exporter can freeze dynamic sizes: try --exporter dynamo, or loosen --atol"
    return "loosen --atol/--rtol if the differences are acceptable, or skip with --no-verify"


def _source_record(cfg: ConvertConfig, kind: str) -> dict:
    record: dict = {"path": cfg.source, "format": kind}
    if kind == "entry-point":
        import importlib.util

        spec = importlib.util.find_spec(cfg.source.partition(":")[0])
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            record["module_file"] = spec.origin
            record["sha256"] = manifest.sha256_path(Path(spec.origin))
        if cfg.weights is not None:
            record["weights"] = {"path": str(cfg.weights), "sha256": manifest.sha256_path(cfg.weights)}
    else:
        record["path"] = str(Path(cfg.source).resolve())
        record["sha256"] = manifest.sha256_path(Path(cfg.source))
    return record


def _manifest(cfg: ConvertConfig, kind: str, exported: ExportedModel, facts: OnnxFacts,
              report: ParityReport | None) -> dict:
    model_file = facts.path
    created = manifest.now()
    return {
        "schema": manifest.SCHEMA,
        "created_at": created,
        "mpack_version": __version__,
        "model": {"path": cfg.output.name, "sha256": manifest.sha256_path(model_file),
                  "size_bytes": model_file.stat().st_size + sum(
                      (model_file.parent / f).stat().st_size for f in facts.external_files),
                  "external_data": [{"path": f, "sha256": manifest.sha256_path(model_file.parent / f)}
                                    for f in facts.external_files]},
        "source": _source_record(cfg, kind),
        "framework": {"name": exported.framework, "version": exported.framework_version},
        "exporter": exported.exporter,
        "opset": cfg.opset,
        "opsets": facts.opsets,
        "inputs": [s.to_dict() for s in facts.inputs],
        "outputs": [s.to_dict() for s in facts.outputs],
        "versions": {"mpack": __version__, "onnx": distribution_version("onnx"),
                     "onnxruntime": distribution_version("onnxruntime") or distribution_version("onnxruntime-gpu"),
                     "python": platform.python_version()},
        "parity": report.summary() if report else {"skipped": True},
        "notes": exported.notes,
        "history": [{"step": "convert", "at": created}],
    }
