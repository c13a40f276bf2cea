"""``mpack quantize``: INT8 with ``onnxruntime.quantization``, held to an accuracy budget.

Pipeline: check the model (float, not yet quantized) → choose the mode (dynamic for MatMul-heavy graphs, static QDQ
per-channel for conv nets) → ONNX Runtime's pre-processing (shape inference + optimisation) → calibrate once
(static) and keep the ranges as a calibration cache → quantize → measure accuracy against fp32 → when the budget is
exceeded, rank nodes by how much error each adds and re-quantize with the most sensitive kept in float32 → write
the model and its manifest atomically, or nothing.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpack import manifest
from mpack._quiet import silenced
from mpack.errors import ConfigError, InputFileError, MpackError, ParityError, first_line
from mpack.inputs import load_samples, random_samples, sample_count, sha256_samples
from mpack.onnx_io import load_graph, read_facts
from mpack.parity import Tolerance, compare_arrays

MODES = ("auto", "dynamic", "static")
METHODS = ("minmax", "entropy", "percentile")
FORMATS = ("qdq", "qoperator")
QTYPES = ("qint8", "quint8")
RANDOM_CALIBRATION_SAMPLES = 32

# Weighted ops ONNX Runtime quantizes; a graph without any of them (with a float weight) has nothing to quantize.
WEIGHTED_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM", "GRU", "EmbedLayerNormalization",
                "Gather"}
# Quantized ops in QOperator graphs → the float op they replace.
QOPERATOR_NAMES = {"QLinearConv": "Conv", "ConvInteger": "Conv", "MatMulInteger": "MatMul", "QLinearMatMul": "MatMul",
                   "DynamicQuantizeMatMul": "MatMul", "MatMulIntegerToFloat": "MatMul", "QGemm": "Gemm",
                   "QAttention": "Attention", "DynamicQuantizeLSTM": "LSTM",
                   "QEmbedLayerNormalization": "EmbedLayerNormalization"}
# The contrib ops transformer fusion leaves behind; shape inference cannot type their outputs.
FUSED_OPS = {"Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu",
             "FastGelu", "Gelu", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}


@dataclass(frozen=True)
class Budget:
    """Accuracy the INT8 model must keep: cosine ≥ min_cosine on every output, and top-1 agreement ≥ min_top1 on
    classifier-like outputs (float, rank ≥ 2, last dim ≥ 2) when set."""

    min_cosine: float = 0.99
    min_top1: float | None = None

    def describe(self) -> str:
        return f"cosine ≥ {self.min_cosine:g}" + (f", top-1 ≥ {self.min_top1:.1%}" if self.min_top1 else "")


def parse_budget(values: list[str] | None) -> Budget:
    """``--max-drop cosine=0.01`` (cosine ≥ 0.99) and/or ``--max-drop top1=1%`` (agreement ≥ 99%)."""
    cosine, top1 = 0.01, None
    for text in values or []:
        key, sep, number = text.partition("=")
        try:
            value = float(number.rstrip("%")) / (100 if number.endswith("%") else 1)
        except ValueError:
            value = -1.0
        if not sep or key not in ("cosine", "top1") or not 0 <= value <= 1:
            raise ConfigError("--max-drop", text, "expected cosine=DROP or top1=DROP with DROP in [0, 1] or a %",
                              hint="e.g. --max-drop cosine=0.01 --max-drop top1=1%")
        if key == "cosine":
            cosine = value
        else:
            top1 = value
    return Budget(1 - cosine, None if top1 is None else 1 - top1)


@dataclass(frozen=True)
class QuantizeConfig:
    """What ``mpack quantize`` was asked to do.

    Args:
        model: The float ONNX model.
        output: The .onnx file to write.
        mode: "auto" (by model kind), "dynamic" or "static".
        calibration: A .npz file, a directory of samples, or "random"; required for static mode.
        method: Calibration method: "minmax", "entropy" or "percentile".
        quant_format: "qdq" or "qoperator" (static mode).
        per_channel: Per-channel weight scales. Defaults to True.
        activation_type: "qint8" or "quint8" (static mode). Defaults to "quint8".
        weight_type: "qint8" or "quint8". Defaults to "qint8" (signed weights run faster on VNNI CPUs).
        preprocess: Run ONNX Runtime's quant_pre_process first. Defaults to True.
        reduce_range: 7-bit weights. Defaults to None: on when the CPU lacks VNNI (see :func:`needs_reduce_range`).
        data: Validation samples for the accuracy figures. Defaults to the calibration set, else seeded random.
        budget: The accuracy budget.
        fallback: Keep the most sensitive nodes in float32 when the budget is exceeded. Defaults to True.
        max_excluded: Most nodes the fallback may keep in float32. Defaults to 16.
        seed: Seed of random samples.
    """

    model: Path
    output: Path
    mode: str = "auto"
    calibration: str | None = None
    method: str = "minmax"
    quant_format: str = "qdq"
    per_channel: bool = True
    activation_type: str = "quint8"
    weight_type: str = "qint8"
    preprocess: bool = True
    reduce_range: bool | None = None
    data: Path | None = None
    budget: Budget = field(default_factory=Budget)
    fallback: bool = True
    max_excluded: int = 16
    seed: int = 0


@dataclass
class OutputAccuracy:
    output: str
    max_abs: float
    cosine: float
    top1: float | None

    def to_dict(self) -> dict:
        return {"output": self.output, "max_abs": self.max_abs, "cosine": self.cosine, "top1_agreement": self.top1}


@dataclass
class Attempt:
    excluded: list[str]
    accuracy: list[OutputAccuracy]
    passed: bool


@dataclass
class QuantizeResult:
    output: Path
    manifest_path: Path
    mode: str
    mode_reason: str
    method: str | None
    quant_format: str
    per_channel: bool
    size_before: int
    size_after: int
    quantized_ops: dict[str, int]
    accuracy: list[OutputAccuracy]
    budget: Budget
    excluded: list[str]
    attempts: list[Attempt]
    samples: int
    data_source: str
    notes: list[str]
    cpu_flags: dict[str, bool]

    @property
    def ratio(self) -> float:
        return self.size_before / self.size_after if self.size_after else float("nan")

    def to_dict(self) -> dict:
        return {"output": str(self.output), "manifest": str(self.manifest_path), "mode": self.mode,
                "mode_reason": self.mode_reason, "method": self.method, "format": self.quant_format,
                "per_channel": self.per_channel, "size_before": self.size_before, "size_after": self.size_after,
                "ratio": self.ratio, "quantized_ops": self.quantized_ops,
                "accuracy": [a.to_dict() for a in self.accuracy], "budget": self.budget.describe(),
                "excluded_nodes": self.excluded, "attempts": [
                    {"excluded": a.excluded, "passed": a.passed} for a in self.attempts],
                "validation_samples": self.samples, "validation_data": self.data_source, "notes": self.notes,
                "cpu_flags": self.cpu_flags}


class BudgetError(ParityError):
    """The INT8 model misses the accuracy budget even with the fallback; nothing is written.

    ``report`` is a :class:`BudgetReport`, printed with ``--json``.
    """


@dataclass
class BudgetReport:
    budget: Budget
    attempts: list[Attempt]

    def to_dict(self) -> dict:
        return {"budget": self.budget.describe(), "attempts": [
            {"excluded": a.excluded, "passed": a.passed, "accuracy": [x.to_dict() for x in a.accuracy]}
            for a in self.attempts]}


def cpu_flags() -> dict[str, bool]:
    """The instruction-set extensions INT8 kernels depend on (results differ between them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags or "avx512vnni" in flags, "avx_vnni": "avx_vnni" in flags,
            "amx_int8": "amx_int8" in flags}


def needs_reduce_range(flags: dict[str, bool]) -> bool:
    """Whether INT8 weights should use 7 bits here.

    Without VNNI, x86 INT8 kernels multiply u8 activations by s8 weights with an instruction (vpmaddubsw) whose
    16-bit sums saturate; 7-bit weights keep them in range. Measured here on an AVX2-only CPU: a transformer encoder's
    dynamic INT8 output cosine went from 0.979 to 0.99995 with it. ONNX Runtime's own guidance says the same.
    """
    return bool(flags) and not (flags.get("avx512_vnni") or flags.get("avx_vnni") or flags.get("amx_int8"))


def _file_size(path: Path) -> int:
    model = load_graph(path)
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in read_facts(path, model).external_files)


def classify(model) -> tuple[str, str]:
    """Pick the mode for a graph: (mode, why)."""
    ops = Counter(n.op_type for n in model.graph.node)
    convs = ops["Conv"] + ops["ConvTranspose"]
    matmuls = ops["MatMul"] + ops["Gemm"] + ops["Attention"]
    if convs and convs >= matmuls:
        return "static", (f"conv net ({convs} Conv vs {matmuls} MatMul/Gemm): static QDQ per-channel, since dynamic "
                          "quantization leaves convolutions in float and barely shrinks a CNN")
    return "dynamic", (f"MatMul-heavy graph ({matmuls} MatMul/Gemm/Attention vs {convs} Conv): dynamic quantization, "
                       "weights INT8 and activations quantized at run time, needs no calibration data")


def weighted_nodes(path: Path) -> set[str]:
    """Names of the nodes ONNX Runtime can quantize that take a float weight (an initializer)."""
    return {n.name for n in _weighted(load_graph(path))}


def _weighted(model) -> list:
    float_weights = {t.name for t in model.graph.initializer if t.data_type in (1, 10, 11, 16)}
    return [n for n in model.graph.node if n.op_type in WEIGHTED_OPS and any(i in float_weights for i in n.input)]


def _check_model(model, path: Path) -> None:
    from mpack.optimize import is_quantized

    already = is_quantized(model)
    if already:
        raise ConfigError("model", str(path), f"is already quantized (has {', '.join(already)})",
                          hint="quantize the float model it came from")
    if not _weighted(model):
        raise ConfigError("model", str(path), "has no float weights in ops ONNX Runtime quantizes "
                          f"({', '.join(sorted(WEIGHTED_OPS))})", hint="nothing to quantize here")


class _Reader:
    """A calibration data reader over a list of feeds (ONNX Runtime's CalibrationDataReader protocol)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.index = 0

    def get_next(self):
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self) -> None:
        self.index = 0

    def __len__(self) -> int:
        return len(self.feeds)


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[name]


def _preprocess(src: Path, work: Path, notes: list[str]) -> Path:
    """ONNX Runtime's quant_pre_process, in our own directory: it leaves temporary files in the working directory."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dest = work / "preprocessed.onnx"
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with silenced("onnxruntime", "root"):
            quant_pre_process(str(src), str(dest), auto_merge=True, save_as_external_data=_large(src),
                              all_tensors_to_one_file=True)
        return dest
    except ImportError:
        raise
    except Exception as exc:  # symbolic shape inference fails on some graphs; quantizing without it still works
        notes.append(f"ONNX Runtime pre-processing failed ({first_line(exc, 120)}); quantized the model as it is")
        return src
    finally:
        os.chdir(cwd)


def _large(path: Path) -> bool:
    return bool(read_facts(path).external_files) or path.stat().st_size > 1 << 30


def _calibrate(model: Path, feeds: list[dict], method: str, work: Path) -> Path:
    """Collect activation ranges once and save them as a calibration cache that every quantization run reuses.

    N.B. Entropy through quantize_static's own calibrator silently equals MinMax (its default 128/128 bins leave one
    candidate threshold, and extra_options cannot reach them), so the calibrator is built here with 2048 bins.
    """
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data

    method_enum = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}[method]
    options = {"minmax": {}, "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
               "percentile": {"num_bins": 2048, "percentile": 99.999}}[method]
    with silenced("onnxruntime", "root"):
        calibrator = create_calibrator(str(model), None, augmented_model_path=str(work / "augmented.onnx"),
                                       calibrate_method=method_enum, use_external_data_format=_large(model),
                                       extra_options=options)
        calibrator.collect_data(_Reader(feeds))
        ranges = calibrator.compute_data()
    cache = work / "calibration.json"
    save_tensors_data(ranges, cache)
    return cache


def calibration_ranges(cache: Path) -> dict[str, tuple[float, float]]:
    """The (low, high) range per tensor in a calibration cache."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    data = load_tensors_data(cache)
    return {name: (float(np.min(t.range_value[0])), float(np.max(t.range_value[1])))
            for name, t in data.data.items()}


def _quantize_once(cfg: QuantizeConfig, mode: str, src: Path, dest: Path, cache: Path | None,
                   exclude: list[str], fused: bool, reduce_range: bool) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_dynamic, quantize_static

    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT} if fused else {}
    with silenced("onnxruntime", "root"):
        if mode == "dynamic":
            # Only ops with a weight: activation x activation MatMuls (attention scores) have nothing to shrink, and
            # quantizing both their inputs at run time costs most of the accuracy on transformers.
            quantize_dynamic(str(src), str(dest), per_channel=cfg.per_channel, reduce_range=reduce_range,
                             weight_type=_qtype(cfg.weight_type),
                             nodes_to_quantize=sorted(weighted_nodes(src)), nodes_to_exclude=exclude,
                             use_external_data_format=_large(src), extra_options=extra)
        else:
            method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                      "percentile": CalibrationMethod.Percentile}[cfg.method]
            quantize_static(str(src), str(dest), None,
                            quant_format=QuantFormat.QDQ if cfg.quant_format == "qdq" else QuantFormat.QOperator,
                            per_channel=cfg.per_channel, reduce_range=reduce_range,
                            activation_type=_qtype(cfg.activation_type),
                            weight_type=_qtype(cfg.weight_type), nodes_to_exclude=exclude,
                            use_external_data_format=_large(src), calibrate_method=method,
                            calibration_cache_path=cache, extra_options=extra)


def quantized_op_counts(model) -> dict[str, int]:
    """Which float op types the quantized graph runs in INT8, and how many nodes of each."""
    producers = {o: n for n in model.graph.node for o in n.output}
    counts: Counter = Counter()
    for node in model.graph.node:
        if node.op_type in QOPERATOR_NAMES:
            counts[QOPERATOR_NAMES[node.op_type]] += 1
        elif node.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(
                producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input):
            counts[node.op_type] += 1
    return dict(counts.most_common())


def measure(reference: Path, candidate: Path, feeds: list[dict[str, np.ndarray]]) -> list[OutputAccuracy]:
    """Accuracy of ``candidate`` against ``reference`` over all feeds: worst max abs, lowest cosine, and top-1
    agreement for classifier-like outputs."""
    from mpack.backends.onnxruntime import OnnxRuntimeRunner

    per_output: dict[str, list] = {}
    with OnnxRuntimeRunner(reference) as ref, OnnxRuntimeRunner(candidate) as cand:
        for feed in feeds:
            expected, got = ref.infer(feed), cand.infer(feed)
            for name, value in expected.items():
                per_output.setdefault(name, []).append((value, got[name]))
    results = []
    for name, pairs in per_output.items():
        comparisons = [compare_arrays("", name, a, b, Tolerance(np.inf, np.inf)) for a, b in pairs]
        top1 = None
        first = pairs[0][0]
        if first.dtype.kind == "f" and first.ndim >= 2 and first.shape[-1] >= 2:
            agree = [np.argmax(a, -1) == np.argmax(b, -1) for a, b in pairs]
            top1 = float(np.mean(np.concatenate([x.ravel() for x in agree])))
        results.append(OutputAccuracy(name, max(c.max_abs for c in comparisons),
                                      min(c.cosine for c in comparisons), top1))
    return results


def within(budget: Budget, accuracy: list[OutputAccuracy]) -> bool:
    return all(a.cosine >= budget.min_cosine and (budget.min_top1 is None or a.top1 is None or a.top1 >= budget.min_top1)
               for a in accuracy)


def sensitivity_ranking(reference: Path, candidate: Path, feeds: list[dict[str, np.ndarray]],
                        candidates: set[str]) -> list[str]:
    """Nodes of ``reference`` ranked by the error each adds in ``candidate``: the drop in cosine similarity of its
    output beyond the worst drop among its inputs. Only nodes in ``candidates`` (quantizable ones) are ranked."""
    from mpack.divergence import compare_intermediates
    from mpack.parity import Tolerances

    rows = compare_intermediates(reference, candidate, feeds[0], Tolerances())
    error = {r.tensor: 1.0 - (r.cosine if np.isfinite(r.cosine) else 0.0) for r in rows}
    model = load_graph(reference)
    added = {}
    for node in model.graph.node:
        if node.name not in candidates:
            continue
        out_err = max((error.get(o, 0.0) for o in node.output), default=0.0)
        in_err = max((error.get(i, 0.0) for i in node.input), default=0.0)
        added[node.name] = out_err - in_err
    return [name for name, gain in sorted(added.items(), key=lambda kv: -kv[1]) if gain > 0]


def run(cfg: QuantizeConfig, progress: Callable[[str], None] | None = None) -> QuantizeResult:
    """Quantize one model within its accuracy budget; see the module docstring for the steps.

    Raises:
        MpackError: bad input (exit 2), a missing extra (4), or the budget missed (3; nothing is written).
    """
    step = progress or (lambda message: None)
    _check_config(cfg)
    model = load_graph(cfg.model)
    _check_model(model, cfg.model)
    facts = read_facts(cfg.model, model)
    specs = facts.inputs
    notes: list[str] = []
    fused = bool({n.op_type for n in model.graph.node} & FUSED_OPS)
    if cfg.mode == "auto":
        mode, reason = classify(model)
    else:
        mode, reason = cfg.mode, f"--mode {cfg.mode}"
    del model
    flags = cpu_flags()
    reduce_range = needs_reduce_range(flags) if cfg.reduce_range is None else cfg.reduce_range
    if reduce_range and cfg.reduce_range is None:
        notes.append("this CPU has no VNNI: weights use 7 bits (reduce_range) so INT8 sums cannot saturate")

    calibration: list[dict] = []
    if mode == "static":
        if cfg.calibration is None:
            raise ConfigError("--calibration", None, "static quantization needs calibration data",
                              hint="pass --calibration data.npz (or a directory of samples); --calibration random "
                                   "only for a smoke test")
        if cfg.calibration == "random":
            calibration = random_samples(specs, RANDOM_CALIBRATION_SAMPLES, seed=cfg.seed)
            notes.append(f"calibrated on {RANDOM_CALIBRATION_SAMPLES} seeded RANDOM samples: the activation ranges "
                         "say nothing about real data; use real samples for a model you ship")
        else:
            calibration = load_samples(Path(cfg.calibration), specs, "--calibration")
    if cfg.data is not None:
        validation, data_source = load_samples(cfg.data, specs, "--data"), str(cfg.data)
    elif calibration:
        validation, data_source = calibration, "calibration set"
    else:
        validation, data_source = random_samples(specs, 8, batch=4, seed=cfg.seed), "seeded random inputs"
        notes.append("accuracy measured on seeded random inputs: pass --data for figures on real data")

    work = manifest.private_dir(cfg.output)
    try:
        source = cfg.model
        if cfg.preprocess:
            step("pre-processing (shape inference + optimisation)")
            source = _preprocess(cfg.model, work, notes)
        cache = None
        if mode == "static":
            step(f"calibrating ({cfg.method}, {sample_count(calibration)} samples)")
            try:
                cache = _calibrate(source, calibration, cfg.method, work)
            except MpackError:
                raise
            except Exception as exc:  # ORT raises plain errors for data that does not run
                raise ConfigError("--calibration", cfg.calibration, f"does not run through the model: "
                                  f"{first_line(exc, 160)}") from None
        final_dir = work / "final"
        final_dir.mkdir()
        dest = final_dir / cfg.output.name

        attempts: list[Attempt] = []
        excluded: list[str] = []
        ranking: list[str] | None = None
        while True:
            step(f"quantizing ({mode}" + (f", {len(excluded)} nodes kept in float32)" if excluded else ")"))
            for stale in final_dir.iterdir():
                stale.unlink()
            _quantize_once(cfg, mode, source, dest, cache, excluded, fused, reduce_range)
            step("measuring accuracy against fp32")
            accuracy = measure(cfg.model, dest, validation)
            attempts.append(Attempt(list(excluded), accuracy, within(cfg.budget, accuracy)))
            if attempts[-1].passed or not cfg.fallback:
                break
            if ranking is None:
                step("ranking nodes by sensitivity")
                # Dynamic mode quantizes weighted ops only: keeping anything else in float32 would change nothing.
                quantizable = weighted_nodes(source) if mode == "dynamic" else _quantizable_nodes(source)
                ranking = sensitivity_ranking(source, dest, validation, quantizable)
            more = _next_exclusion(excluded, ranking, cfg.max_excluded)
            if more is None:
                break
            excluded = more
        if not attempts[-1].passed:
            raise BudgetError(
                f"INT8 accuracy misses the budget ({cfg.budget.describe()}): " + ", ".join(
                    f"{a.output} cosine {a.cosine:.4f}" + (f" top-1 {a.top1:.1%}" if a.top1 is not None else "")
                    for a in attempts[-1].accuracy)
                + (f", even with {len(excluded)} nodes kept in float32" if excluded else ""),
                report=BudgetReport(cfg.budget, attempts),
                hint="loosen --max-drop, calibrate on representative --calibration data, try --method entropy, "
                     "or raise --max-excluded" if cfg.fallback else "drop --no-fallback to let mpack keep the most "
                                                                     "sensitive nodes in float32")
        result_size = _file_size(dest)
        import onnx

        qmodel = onnx.load(str(dest), load_external_data=False)
        counts = quantized_op_counts(qmodel)
        del qmodel
        record = {
            "mode": mode, "mode_reason": reason, "method": cfg.method if mode == "static" else None,
            "format": cfg.quant_format if mode == "static" else "qoperator (dynamic)",
            "per_channel": cfg.per_channel, "reduce_range": reduce_range, "activation_type": cfg.activation_type if mode == "static" else "dynamic",
            "weight_type": cfg.weight_type, "preprocessed": source != cfg.model,
            "calibration": ({"source": cfg.calibration, "count": sample_count(calibration),
                             "feeds": len(calibration),
                             "sha256": sha256_samples(calibration)} if calibration else None),
            "excluded_nodes": excluded, "quantized_ops": counts,
            "accuracy": [a.to_dict() for a in attempts[-1].accuracy], "budget": cfg.budget.describe(),
            "validation": {"source": data_source, "count": sample_count(validation)},
            "size_before": _file_size(cfg.model), "size_after": result_size, "cpu_flags": flags,
        }
        _write_manifest(cfg, dest, record)
        manifest.publish(final_dir, cfg.output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return QuantizeResult(cfg.output, manifest.manifest_path_for(cfg.output), mode, reason, record["method"],
                          record["format"], cfg.per_channel, record["size_before"], result_size, counts,
                          attempts[-1].accuracy, cfg.budget, excluded, attempts, sample_count(validation), data_source, notes,
                          record["cpu_flags"])


def _check_config(cfg: QuantizeConfig) -> None:
    for name, value, allowed in (("--mode", cfg.mode, MODES), ("--method", cfg.method, METHODS),
                                 ("--format", cfg.quant_format, FORMATS),
                                 ("--activation-type", cfg.activation_type, QTYPES),
                                 ("--weight-type", cfg.weight_type, QTYPES)):
        if value not in allowed:
            raise ConfigError(name, value, f"is not one of {', '.join(allowed)}")
    if not cfg.model.is_file():
        raise InputFileError(f"{cfg.model} does not exist", hint="give the float .onnx model to quantize")
    manifest.check_output(cfg.output, "model.int8.onnx", cfg.model)
    if cfg.max_excluded < 0:
        raise ConfigError("--max-excluded", cfg.max_excluded, "must be >= 0")


def _quantizable_nodes(path: Path) -> set[str]:
    model = load_graph(path)
    return {n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS | {"Add", "Mul", "Relu", "Concat"}}


def _next_exclusion(excluded: list[str], ranking: list[str], limit: int) -> list[str] | None:
    """Double the number of float32 nodes each round (1, 2, 4, ...), most sensitive first, up to ``limit``."""
    want = min(max(1, 2 * len(excluded)), limit, len(ranking))
    if want <= len(excluded):
        return None
    return ranking[:want]


def _write_manifest(cfg: QuantizeConfig, dest: Path, record: dict) -> None:
    data = manifest.load(cfg.model) or {"schema": manifest.SCHEMA, "history": []}
    data = dict(data)
    data["model"] = {"path": cfg.output.name, "sha256": manifest.sha256_path(dest), "size_bytes": record["size_after"],
                     "external_data": [{"path": f, "sha256": manifest.sha256_path(dest.parent / f)}
                                       for f in read_facts(dest).external_files]}
    data["quantization"] = record
    data.setdefault("history", []).append({"step": "quantize", "at": manifest.now(),
                                           "from": {"path": str(cfg.model), "sha256": manifest.sha256_path(cfg.model)},
                                           **{k: record[k] for k in ("mode", "method", "format", "excluded_nodes")}})
    manifest.write_atomic(dest.parent / manifest.manifest_path_for(cfg.output).name, data)
