"""``mpack validate``: a numerical parity gate between a model's forms and the ONNX Runtime providers it runs on.

One reference run, every other (model, provider) compared with it on the same inputs:

    reference   the source model named in the first model's manifest (``source=True``), otherwise the first
                ONNX model, always on the CPU provider.
    candidates  every other ONNX model on every asked provider, and the first model on every asked provider
                other than CPU (and on CPU too when the source is the reference).

A provider mpack knows (cuda, tensorrt) that this ONNX Runtime build lacks, or that cannot start here (no GPU),
makes its comparisons *skipped* with the reason, never failed. When a comparison fails, the first diverging node
is located between the two ONNX graphs with :mod:`mpack.divergence`.

Inputs are seeded random feeds from the input specs (the manifest's, else the model's own) at each batch size and
a second size of every other symbolic dim (``inputs.parity_cases``), or one ``.npz`` file of arrays by input name.
"""

from __future__ import annotations

import os
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpack import manifest
from mpack.divergence import DEFAULT_CHUNK_SIZE, NodeDivergence
from mpack.errors import ConfigError, InputFileError, MpackError, ParityError, first_line
from mpack.inputs import DEFAULT_BATCH_SIZES, parity_cases, random_feeds, load_samples
from mpack.parity import ParityReport, Tolerances, compare_outputs
from mpack.specs import TensorSpec

# Each provider runs with the ones it falls back to for ops it lacks (data, not an if/else ladder).
PROVIDER_CHAINS: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu",),
    "cuda": ("cuda", "cpu"),
    "tensorrt": ("tensorrt", "cuda", "cpu"),
}
REFERENCE_PROVIDER = "cpu"
_DISPLAY = {"cpu": "CPU", "cuda": "CUDA", "tensorrt": "TensorRT"}


@dataclass(frozen=True)
class ValidateConfig:
    """What ``mpack validate`` was asked to do.

    Args:
        models: ONNX models; the first is the reference among them (and owns the manifest that is read and
            appended to).
        source: Include the source PyTorch/TensorFlow model named in the first model's manifest, as the
            reference. Defaults to False.
        providers: Short ONNX Runtime provider names the candidates run on. Defaults to ("cpu",).
        data: An .npz file of inputs by input name, instead of seeded random inputs. Defaults to None.
        batch_sizes: Batch sizes of the random inputs. Defaults to (1, 4).
        seed: Seed of the random inputs. Defaults to 0.
        tolerances: Global and per-output tolerances (also used for intermediate tensors).
        locate: Locate the first diverging node of a failed comparison. Defaults to True.
        chunk_size: Intermediate tensors exposed per ONNX Runtime session when locating. Defaults to 64.
        junit: Write a JUnit XML report here. Defaults to None.
        record: Append a ``validate`` step to the first model's manifest, when it has one. Defaults to True.
    """

    models: tuple[Path, ...]
    source: bool = False
    providers: tuple[str, ...] = ("cpu",)
    data: Path | None = None
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    seed: int = 0
    tolerances: Tolerances = field(default_factory=Tolerances)
    locate: bool = True
    chunk_size: int = DEFAULT_CHUNK_SIZE
    junit: Path | None = None
    record: bool = True


@dataclass
class ComparisonResult:
    """One candidate (model, provider) against the reference: a report, or the reason it was skipped."""

    reference: str
    candidate: str
    model: Path
    provider: str
    report: ParityReport | None = None
    skipped: str | None = None
    divergence: NodeDivergence | None = None
    divergence_against: str | None = None
    divergence_case: str | None = None
    divergence_note: str | None = None
    seconds: float = 0.0

    @property
    def status(self) -> str:
        if self.skipped is not None:
            return "skipped"
        return "passed" if self.report is not None and self.report.passed else "failed"

    @property
    def passed(self) -> bool:
        """Skipped comparisons do not fail."""
        return self.status != "failed"

    def to_dict(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate, "model": str(self.model),
                "provider": self.provider, "status": self.status, "skipped": self.skipped,
                "parity": self.report.to_dict() if self.report is not None else None,
                "first_divergence": ({**self.divergence.to_dict(), "against": self.divergence_against,
                                      "case": self.divergence_case} if self.divergence else None),
                "divergence_note": self.divergence_note, "seconds": round(self.seconds, 3)}


@dataclass
class ValidateResult:
    reference: str
    comparisons: list[ComparisonResult]
    inputs: list[TensorSpec]
    outputs: list[str]
    cases: list[str]
    tolerances: Tolerances
    data: Path | None = None
    notes: list[str] = field(default_factory=list)
    manifest_path: Path | None = None
    junit_path: Path | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def reports(self) -> list[ParityReport]:
        return [c.report for c in self.comparisons if c.report is not None]

    @property
    def failed(self) -> list[ComparisonResult]:
        return [c for c in self.comparisons if c.status == "failed"]

    @property
    def skipped(self) -> list[ComparisonResult]:
        return [c for c in self.comparisons if c.status == "skipped"]

    def summary(self) -> dict:
        counts = {s: sum(c.status == s for c in self.comparisons) for s in ("passed", "failed", "skipped")}
        return {"passed": self.passed, "reference": self.reference, "cases": self.cases, "counts": counts}

    def to_dict(self) -> dict:
        t = self.tolerances
        return {**self.summary(), "inputs": [s.to_dict() for s in self.inputs], "outputs": self.outputs,
                "data": str(self.data) if self.data else None,
                "tolerances": {"atol": t.default.atol, "rtol": t.default.rtol,
                               "per_output": {k: {"atol": v.atol, "rtol": v.rtol} for k, v in t.per_output.items()}},
                "comparisons": [c.to_dict() for c in self.comparisons], "notes": self.notes,
                "manifest": str(self.manifest_path) if self.manifest_path else None,
                "junit": str(self.junit_path) if self.junit_path else None}


# --- the run -----------------------------------------------------------------------------------------------------


def run(cfg: ValidateConfig, progress: Callable[[str], None] | None = None) -> ValidateResult:
    """Compare every candidate with the reference; locate the first diverging node of each failure.

    A parity failure is data (``result.passed`` is False), not an exception, so the JUnit report and the manifest
    record are written either way.

    Raises:
        MpackError: bad input (exit 2): a missing or non-ONNX model, an unknown provider, models with different
            inputs, --data that does not fit, no source in the manifest; a missing extra (4); the reference model
            failing to run (3).
    """
    step = progress or (lambda message: None)
    providers = _check_config(cfg)
    graphs = [_read(path) for path in cfg.models]
    labels = _labels(cfg.models)
    record = manifest.load(cfg.models[0])
    specs = _input_specs(record, graphs[0])
    _check_same_inputs(cfg.models, graphs, specs)
    outputs = [s.name for s in graphs[0].outputs]
    notes: list[str] = []
    from mpack.optimize import provider_mismatch

    notes += [w for m in cfg.models for p in providers if (w := provider_mismatch(m, p))]

    if cfg.data is not None:
        feeds = load_samples(cfg.data, specs, "--data")
        cases = [("data" if len(feeds) == 1 else f"data[{i}]", feed) for i, feed in enumerate(feeds)]
    else:
        plan = parity_cases(specs, cfg.batch_sizes)
        cases = [(case.label, random_feeds(specs, case.sizes, seed=cfg.seed + i)) for i, case in enumerate(plan)]

    if cfg.source:
        reference_runner, reference_label = source_runner_for(cfg.models[0], record, specs, outputs, notes)
    else:
        from mpack.backends.onnxruntime import OnnxRuntimeRunner

        reference_runner = OnnxRuntimeRunner(cfg.models[0], PROVIDER_CHAINS[REFERENCE_PROVIDER])
        reference_label = f"{labels[0]}[{REFERENCE_PROVIDER}]"

    candidates = [(i, p) for i in range(len(cfg.models)) for p in providers
                  if cfg.source or i > 0 or p != REFERENCE_PROVIDER]
    if not candidates:
        raise ConfigError("models", [str(m) for m in cfg.models], "leave nothing to compare with the reference",
                          hint="give a second model (mpack validate ref.onnx cand.onnx), --source, or another "
                               "provider (--providers cpu,cuda)")
    unavailable = _unavailable_providers(providers)

    comparisons: list[ComparisonResult] = []
    reference_outputs: list[dict[str, np.ndarray]] | None = None
    for index, provider in candidates:
        model = cfg.models[index]
        candidate_label = f"{labels[index]}[{provider}]"
        comparison = ComparisonResult(reference_label, candidate_label, model, provider)
        comparisons.append(comparison)
        if provider in unavailable:
            comparison.skipped = unavailable[provider]
            continue
        if reference_outputs is None:
            step(f"running the reference {reference_label}")
            reference_outputs = _run_reference(reference_runner, reference_label, cases)
        step(f"comparing {candidate_label} with {reference_label}")
        t0 = time.perf_counter()
        _compare(comparison, cases, reference_outputs, cfg.tolerances)
        if comparison.status == "failed" and cfg.locate:
            step(f"locating the first diverging node of {candidate_label}")
            _locate(comparison, cfg, index, labels, cases)
        comparison.seconds = time.perf_counter() - t0

    result = ValidateResult(reference_label, comparisons, specs, outputs, [label for label, _ in cases],
                            cfg.tolerances, cfg.data, notes)
    if cfg.junit is not None:
        write_junit(result, cfg.junit)
        result.junit_path = cfg.junit
    if cfg.record:
        result.manifest_path = _record(cfg, result, record is not None)
    return result


def _check_config(cfg: ValidateConfig) -> tuple[str, ...]:
    """Check the options that need no model; return the providers, deduplicated, in the given order."""
    if not cfg.models:
        raise ConfigError("models", [], "none given", hint="mpack validate model.onnx [other.onnx ...]")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise ConfigError("--batch-sizes", list(cfg.batch_sizes), "must be positive integers", hint="e.g. 1,4")
    if cfg.chunk_size < 1:
        raise ConfigError("--chunk-size", cfg.chunk_size, "must be at least 1")
    providers = tuple(dict.fromkeys(p.strip().lower() for p in cfg.providers if p.strip()))
    if not providers:
        raise ConfigError("--providers", ",".join(cfg.providers), "names no provider", hint="e.g. --providers cpu,cuda")
    for name in providers:
        if name not in PROVIDER_CHAINS:
            raise ConfigError("--providers", name, "is not an ONNX Runtime provider mpack knows",
                              hint=f"available here: {', '.join(_available_providers())} "
                                   f"(known: {', '.join(PROVIDER_CHAINS)})")
    if cfg.junit is not None:
        if cfg.junit.is_dir():
            raise ConfigError("--junit", str(cfg.junit), "is a directory", hint="name the .xml file to write")
        if not cfg.junit.parent.is_dir():
            raise ConfigError("--junit", str(cfg.junit), f"directory {cfg.junit.parent} does not exist",
                              hint=f"create it first: mkdir -p {cfg.junit.parent}")
    return providers


def _available_providers() -> list[str]:
    import onnxruntime as ort

    from mpack.backends.onnxruntime import PROVIDERS

    available = ort.get_available_providers()
    return [short for short, full in PROVIDERS.items() if full in available]


def _unavailable_providers(providers: tuple[str, ...]) -> dict[str, str]:
    """Providers whose chain this ONNX Runtime build lacks, with the reason their comparisons are skipped."""
    import onnxruntime as ort

    from mpack._optional import onnxruntime_distribution

    available = _available_providers()
    dist = onnxruntime_distribution()
    build = f"{dist[0]} {dist[1]}" if dist else f"onnxruntime {ort.__version__}"
    reasons = {}
    for name in providers:
        missing = [p for p in PROVIDER_CHAINS[name] if p not in available]
        if missing:
            reasons[name] = (f"{_DISPLAY[name]} is not available in this ONNX Runtime "
                             f"({build}, providers: {', '.join(available)}); install mpack[gpu] on a machine "
                             "with an NVIDIA GPU to run it")
    return reasons


def _read(path: Path):
    """The graph facts of one model (no weights loaded); a missing or non-ONNX file is a one-line error."""
    from mpack.onnx_io import load_graph, read_facts

    model = load_graph(path)
    if not model.graph.output:
        raise InputFileError(f"{path} is not an ONNX model (it has no graph outputs)",
                             hint="give an .onnx file written by an exporter or by mpack convert")
    return read_facts(path, model)


def _labels(models: tuple[Path, ...]) -> list[str]:
    """Short, distinct names: the file name, the path where names clash, ``#N`` for a model given twice."""
    labels: list[str] = []
    for i, model in enumerate(models):
        clash = any(m.name == model.name and m.resolve() != model.resolve() for m in models)
        label = str(model) if clash else model.name
        if label in labels:
            label = f"{label} #{i + 1}"
        labels.append(label)
    return labels


def _input_specs(record: dict | None, facts) -> list[TensorSpec]:
    """The manifest's input specs (the names the user gave the dims), else the ONNX model's own."""
    if record and record.get("inputs"):
        return [TensorSpec(i["name"], tuple(i["shape"]), i.get("dtype", "float32")) for i in record["inputs"]]
    return list(facts.inputs)


def _check_same_inputs(models: tuple[Path, ...], graphs: list, specs: list[TensorSpec]) -> None:
    want = {s.name: s.dtype for s in specs}
    for model, facts in zip(models, graphs):
        have = {s.name: s.dtype for s in facts.inputs}
        if sorted(have) != sorted(want):
            raise InputFileError(f"{model} has inputs {sorted(have)} but {models[0]} has {sorted(want)}",
                                 hint="validate models of the same network, with the same input names")
        for name, dtype in have.items():
            if dtype != want[name]:
                raise InputFileError(f"{model} input {name} is {dtype} but {models[0]}'s is {want[name]}",
                                     hint="validate models that take the same input dtypes")


def source_runner_for(model: Path, record: dict | None, specs: list[TensorSpec], outputs: list[str],
                      notes: list[str]):
    """A runner for the source named in ``model``'s manifest, and its label (also used by ``mpack bench``).

    Args:
        model: The ONNX model whose manifest names the source.
        record: That manifest (``manifest.load(model)``), or None when there is none.
        specs: The inputs the runner takes.
        outputs: The ONNX model's output names, which the runner's outputs carry.
        notes: Collects notes for the user (e.g. the source changed since conversion).

    Returns:
        (runner, label), e.g. label "pytorch (encoder.pt2)".

    Raises:
        ConfigError: no manifest, or one that names no source.
        InputFileError: the source (or its weights file) named in the manifest is missing.
    """
    from mpack.convert import FORMATS

    source = (record or {}).get("source") or {}
    kind, path = source.get("format"), source.get("path")
    if record is None or kind not in FORMATS or not path:
        where = manifest.manifest_path_for(model)
        raise ConfigError("--source", str(model), f"needs a manifest naming the source model ({where} "
                          f"{'names none' if record else 'does not exist'})",
                          hint="run without --source, or write the model with mpack convert")
    framework = FORMATS[kind]
    if kind != "entry-point":
        if not Path(path).exists():
            raise InputFileError(f"the source model {path} named in {manifest.manifest_path_for(model)} does not "
                                 "exist", hint="run without --source, or restore the source model")
        if source.get("sha256") and manifest.sha256_path(Path(path)) != source["sha256"]:
            notes.append(f"the source model {path} has changed since it was converted (its sha256 differs from "
                         "the manifest's)")
    label = f"{framework} ({path if kind == 'entry-point' else Path(path).name})"
    if framework == "pytorch":
        from mpack.convert.torch import source_runner

        weights = (source.get("weights") or {}).get("path")
        if weights and not Path(weights).is_file():
            raise InputFileError(f"the weights file {weights} named in {manifest.manifest_path_for(model)} does not "
                                 "exist", hint="run mpack validate from the directory mpack convert ran in")
        return source_runner(path, kind, specs, outputs, Path(weights) if weights else None), label
    from mpack.convert.tensorflow import source_runner

    return source_runner(path, kind, specs, outputs), label


def _run_reference(runner, label: str, cases) -> list[dict[str, np.ndarray]]:
    results = []
    with runner:
        for case, feeds in cases:
            try:
                results.append(runner.infer(feeds))
            except MpackError:
                raise
            except Exception as exc:  # the reference itself cannot run these inputs: nothing can be compared
                raise ParityError(f"the reference {label} fails at {case}: {first_line(exc)}",
                                  hint="check the model with `mpack inspect`, or give inputs it accepts "
                                       "(--data, --batch-sizes)") from None
    return results


def _compare(comparison: ComparisonResult, cases, reference_outputs, tolerances: Tolerances) -> None:
    from mpack.backends.onnxruntime import OnnxRuntimeRunner

    report = ParityReport(comparison.reference, comparison.candidate)
    runner = OnnxRuntimeRunner(comparison.model, PROVIDER_CHAINS[comparison.provider])
    try:
        runner.activate()
    except ConfigError as exc:  # the provider is in this build but cannot start (e.g. onnxruntime-gpu, no GPU)
        comparison.skipped = exc.message + (f" ({exc.hint})" if exc.hint else "")
        return
    except InputFileError as exc:  # ORT cannot load the candidate: a failure of this comparison
        report.errors.append(exc.message)
        comparison.report = report
        return
    try:
        for (case, feeds), reference in zip(cases, reference_outputs):
            try:
                candidate = runner.infer(feeds)
            except MpackError:
                raise
            except Exception as exc:  # ORT run failures are parity failures, not crashes (as in convert)
                report.errors.append(f"{case}: onnxruntime failed: {first_line(exc, 200)}")
                continue
            compare_outputs(report, case, reference, candidate, tolerances)
    finally:
        runner.deactivate()
    comparison.report = report


def _locate(comparison: ComparisonResult, cfg: ValidateConfig, index: int, labels: list[str], cases) -> None:
    """Find the first diverging node between the first ONNX model on CPU and the failed candidate."""
    from mpack.divergence import first_divergence

    if index == 0 and comparison.provider == REFERENCE_PROVIDER:
        comparison.divergence_note = ("the reference is the source model, which has no ONNX graph to compare node "
                                      "by node")
        return
    report = comparison.report
    failing = next((c.case for c in report.comparisons if not c.passed), None)
    if failing is None:
        comparison.divergence_note = "not located: the candidate failed to run or lacks outputs"
        return
    feeds = dict(cases)[failing]
    against = f"{labels[0]}[{REFERENCE_PROVIDER}]"
    try:
        found = first_divergence(cfg.models[0], comparison.model, feeds, cfg.tolerances, cfg.chunk_size,
                                 PROVIDER_CHAINS[REFERENCE_PROVIDER], PROVIDER_CHAINS[comparison.provider])
    except MpackError as exc:
        comparison.divergence_note = f"not located: {exc.message}"
        return
    comparison.divergence_against = against
    comparison.divergence_case = failing
    if found is None:
        comparison.divergence_note = (f"every intermediate tensor shared with {against} is within tolerance at "
                                      f"{failing}")
    comparison.divergence = found


def _record(cfg: ValidateConfig, result: ValidateResult, has_manifest: bool) -> Path | None:
    """Append a ``validate`` step to the first model's manifest; a model without one gets none written."""
    if not has_manifest:
        result.notes.append(f"{cfg.models[0]} has no manifest: the result was not recorded")
        return None
    step = {**result.summary(), "providers": list(dict.fromkeys(cfg.providers)),
            "data": str(cfg.data) if cfg.data else None,
            "comparisons": [{"candidate": c.candidate, "status": c.status, "skipped": c.skipped,
                             "outputs": c.report.summary()["outputs"] if c.report is not None else {},
                             "first_divergence": ({"node": c.divergence.node, "op_type": c.divergence.op_type,
                                                   "tensor": c.divergence.tensor}
                                                  if c.divergence else None)}
                            for c in result.comparisons]}
    try:
        manifest.append_step(cfg.models[0], "validate", step)
    except OSError as exc:
        result.notes.append(f"could not record the result in {manifest.manifest_path_for(cfg.models[0])}: "
                            f"{first_line(exc)}")
        return None
    return manifest.manifest_path_for(cfg.models[0])


# --- JUnit -------------------------------------------------------------------------------------------------------


def junit_xml(result: ValidateResult) -> str:
    """A JUnit XML report: one testcase per comparison × output; skipped comparisons as ``<skipped/>``."""
    suite = ET.Element("testsuite", name="mpack validate")
    ET.SubElement(ET.SubElement(suite, "properties"), "property", name="reference", value=result.reference)
    counts = {"tests": 0, "failures": 0, "skipped": 0}
    total = 0.0
    for comparison in result.comparisons:
        per_output = comparison.seconds / max(1, len(result.outputs))
        total += comparison.seconds
        for output in result.outputs:
            case = ET.SubElement(suite, "testcase", classname="mpack.validate",
                                 name=f"{comparison.candidate} vs {comparison.reference}: {output}",
                                 time=f"{per_output:.3f}")
            counts["tests"] += 1
            if comparison.skipped is not None:
                ET.SubElement(case, "skipped", message=comparison.skipped)
                counts["skipped"] += 1
                continue
            failure = _output_failure(comparison, output, len(result.cases))
            if failure is not None:
                message, text = failure
                ET.SubElement(case, "failure", message=message, type="ParityFailure").text = text
                counts["failures"] += 1
    suite.set("tests", str(counts["tests"]))
    suite.set("failures", str(counts["failures"]))
    suite.set("errors", "0")
    suite.set("skipped", str(counts["skipped"]))
    suite.set("time", f"{total:.3f}")
    root = ET.Element("testsuites", name="mpack validate", tests=str(counts["tests"]),
                      failures=str(counts["failures"]), errors="0", skipped=str(counts["skipped"]),
                      time=f"{total:.3f}")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _output_failure(comparison: ComparisonResult, output: str, n_cases: int) -> tuple[str, str] | None:
    report = comparison.report
    if output in report.missing_outputs:
        return f"output {output} is missing from {comparison.candidate}", ""
    mine = [c for c in report.comparisons if c.output == output]
    bad = [c for c in mine if not c.passed]
    if not bad and len(mine) >= n_cases:
        return None
    if not bad:
        return "; ".join(report.errors) or f"output {output} was not compared", "\n".join(report.errors)
    worst = report.worst_per_output()[output]
    message = (f"{worst.case}: {worst.problem}: max_abs {worst.max_abs:.3g} (atol {worst.atol:g}, rtol "
               f"{worst.rtol:g}), max_rel {worst.max_rel:.3g}, cosine {worst.cosine:.6f}")
    lines = [f"{c.case}: {c.problem}; max_abs {c.max_abs:.3g}, mean_abs {c.mean_abs:.3g}, max_rel {c.max_rel:.3g}, "
             f"cosine {c.cosine:.6f}, NaN {c.nan_out}/{c.nan_ref}, Inf {c.inf_out}/{c.inf_ref}" for c in bad]
    d = comparison.divergence
    if d is not None:
        lines.append(f"first diverging node: {d.label} ({d.op_type}) output {d.tensor}: max_abs {d.max_abs:.3g}, "
                     f"max_rel {d.max_rel:.3g}, cosine {d.cosine:.6f} (against {comparison.divergence_against} at "
                     f"{comparison.divergence_case})")
    elif comparison.divergence_note:
        lines.append(comparison.divergence_note)
    return message, "\n".join(lines)


def write_junit(result: ValidateResult, path: Path) -> None:
    """Write :func:`junit_xml` atomically: a temporary file beside ``path``, renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(junit_xml(result))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
