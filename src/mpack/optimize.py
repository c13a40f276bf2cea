"""``mpack optimize``: ONNX Runtime graph optimization and transformer fusions, checked against the fp32 model.

Pipeline: check the input (an ONNX float model, not quantized, not optimized for another provider) → pick the
model type and detect ``num_heads``/``hidden_size`` → [ORT basic pass → transformer fusions] → [float16] → ORT
offline optimization at ``--level`` for ``--provider`` (``SessionOptions.optimized_model_filepath``) → metadata
→ parity of the optimized model against the input on seeded inputs at two batch sizes and sequence lengths →
manifest → rename into place. Everything happens in a private directory beside the output; nothing is written
when a step fails.

Fusions come from two places. ``onnxruntime.transformers.optimizer`` (the successor of the obsolete
``onnxruntime-tools`` package) matches the TorchScript-based exporter's graph of eager attention with a mask and
finds no attention in dynamo exports; onnxscript's ORT fusions (``onnxscript.rewriter.ort_fusions``) match the
dynamo exporter's graph. ``--fuser auto`` runs the first, then the second when the first fused no attention.
N.B. ORT's ``optimize_model()`` runs its offline pass through ``optimize_by_onnxruntime()``, which imports torch;
mpack runs that pass itself and calls ``optimize_by_fusion()``, so ``mpack[cpu]`` without torch can optimize.

Levels: ``basic`` (constant folding, redundant-node removal) gives a graph any provider runs. ``extended`` and
``all`` apply provider-specific rewrites (CPU-only ``FusedGemm``, NCHWc layouts bound to this CPU's vector width),
so those graphs record their provider in the model's ``metadata_props`` (:data:`OPTIMIZED_FOR_KEY`); call
:func:`optimized_for` or :func:`provider_mismatch` before running or benchmarking one elsewhere.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mpack import __version__, manifest
from mpack._optional import distribution_version, require
from mpack._quiet import silenced
from mpack.errors import ConfigError, InputFileError, MissingDependencyError, MpackError, ParityError, first_line
from mpack.inputs import DEFAULT_BATCH_SIZES, SizeCase, parity_cases, random_feeds
from mpack.onnx_io import EXTERNAL_DATA_THRESHOLD, OnnxFacts, external_files, initializer_bytes, load_graph, read_facts
from mpack.parity import ParityReport, Tolerance, Tolerances, compare_outputs
from mpack.specs import TensorSpec

LEVELS = ("basic", "extended", "all")
DEFAULT_LEVEL = "basic"
# Levels whose output graph is bound to the provider (and, for "all", the CPU) it was optimized for.
PROVIDER_SPECIFIC_LEVELS = ("extended", "all")
PROVIDERS = ("auto", "cpu", "cuda")
_ORT_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

# metadata_props keys written into the optimized model. N.B. other commands read OPTIMIZED_FOR_KEY through
# optimized_for()/provider_mismatch(); keep the key stable.
OPTIMIZED_FOR_KEY = "mpack.optimized_for"
RECORD_KEY = "mpack.optimize"

# Model types that are not ONNX Runtime's: "auto" detects one from the graph, "none" skips the fusions.
AUTO, NONE = "auto", "none"
# Who fuses: ONNX Runtime's transformer optimizer matches the TorchScript-based exporter's graphs; onnxscript's
# ORT fusions (onnxscript.rewriter.ort_fusions) match the dynamo exporter's. "auto" runs ORT's, then onnxscript's
# when ORT's fused no attention.
FUSERS = ("auto", "ort", "onnxscript")
ENGINES = {"ort": "onnxruntime.transformers.optimizer", "onnxscript": "onnxscript.rewriter.ort_fusions"}

# Ops that mark a model as quantized (exact names, then prefixes); optimize the float model, then quantize.
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                 "MatMulIntegerToFloat", "QAttention", "QGemm", "QEmbedLayerNormalization", "MatMulNBits"}
QUANTIZED_PREFIXES = ("QLinear", "DynamicQuantize", "QOrdered")
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                 "PackedMultiHeadAttention")
# Standard-domain ops a fusion can produce from decomposed subgraphs; contrib (com.microsoft) ops always count.
_STANDARD_FUSED = {"LayerNormalization", "Gelu"}
_CONTRIB = "com.microsoft"

# float16: inputs/outputs stay float32 unless asked, and ops whose float16 results overflow or lose too much
# (powers, exponentials, reductions, the pieces of a decomposed LayerNorm) stay float32. The fused contrib ops
# (Attention, SkipLayerNormalization, ...) accumulate in float32 inside their CUDA kernels, so they convert.
FP16_KEEP_FLOAT32 = ("Pow", "Exp", "Log", "Sqrt", "Reciprocal", "ReduceMean", "ReduceSum", "ReduceSumSquare",
                     "ReduceL2", "ReduceLogSumExp", "ReduceProd", "CumSum", "Range")
# float16 has 11 significant bits: parity against fp32 needs looser tolerances than an fp32 rewrite does.
FP16_TOLERANCE = Tolerance(atol=1e-2, rtol=1e-2)

# The quick latency figure of the parity run: at most this many rounds, stopping early past the time budget.
TIMING_WARMUP, TIMING_ITERATIONS, TIMING_BUDGET_S = 3, 20, 5.0


@dataclass(frozen=True)
class OptimizeConfig:
    """What ``mpack optimize`` was asked to do.

    Args:
        model: The ONNX model to optimize (float32, not quantized).
        output: The .onnx file to write; its manifest goes beside it.
        level: ONNX Runtime graph optimization level: "basic", "extended" or "all". Defaults to "basic".
        provider: The execution provider the graph is optimized (and verified) for: "cpu", "cuda" or "auto" (cpu;
            cuda with ``float16`` when a CUDA device works here). Defaults to "auto".
        model_type: ONNX Runtime transformer model type ("bert", "gpt2", ...), "auto" (detected from the graph)
            or "none" (no fusions). Defaults to "auto".
        fuser: "ort" (ONNX Runtime's transformer optimizer), "onnxscript" (onnxscript's ORT fusions, which match
            dynamo exports) or "auto" (ORT's, then onnxscript's when ORT's fused no attention). Defaults to "auto".
        num_heads: Attention heads. Defaults to None (detected from the graph).
        hidden_size: Hidden size. Defaults to None (detected from the graph).
        float16: Convert weights and compute to float16 (for GPUs). Defaults to False.
        float16_io: With ``float16``, make inputs and outputs float16 too. Defaults to False (they stay float32).
        verify: Run the parity check of the optimized model against the input. Defaults to True.
        tolerances: Parity tolerances. Defaults to None: 1e-4/1e-3 (atol/rtol), or 1e-2/1e-2 with ``float16``.
        batch_sizes: Batch sizes the parity check runs at. Defaults to (1, 4).
        seed: Seed of the parity inputs. Defaults to 0.
    """

    model: Path
    output: Path
    level: str = DEFAULT_LEVEL
    provider: str = "auto"
    model_type: str = AUTO
    fuser: str = "auto"
    num_heads: int | None = None
    hidden_size: int | None = None
    float16: bool = False
    float16_io: bool = False
    verify: bool = True
    tolerances: Tolerances | None = None
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    seed: int = 0


@dataclass
class Timing:
    """A quick latency figure from the parity run: the input model vs the optimized one, interleaved."""

    case: str
    provider: str
    iterations: int
    reference_ms: float
    optimized_ms: float
    meaningful: bool = True
    note: str | None = None

    @property
    def speedup(self) -> float:
        return self.reference_ms / self.optimized_ms if self.optimized_ms > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"case": self.case, "provider": self.provider, "iterations": self.iterations,
                "reference_ms": self.reference_ms, "optimized_ms": self.optimized_ms, "speedup": self.speedup,
                "meaningful": self.meaningful, "note": self.note}


@dataclass
class OptimizeResult:
    output: Path
    manifest_path: Path
    level: str
    provider: str
    optimized_for: str | None
    model_type: str | None
    model_type_source: str  # "flag", "detected" or "none"
    model_type_reason: str
    fusion_engine: str | None
    num_heads: int | None
    hidden_size: int | None
    fused_ops: dict[str, int]
    attention_fused: bool
    fusion_status: str  # "fused", "partial" (no attention), "none" or "skipped"
    fusion_note: str | None
    nodes_before: int
    nodes_after: int
    float16: bool
    float16_io: bool
    facts: OnnxFacts
    parity: ParityReport | None
    timing: Timing | None
    notes: list[str]
    seconds: dict[str, float]

    @property
    def passed(self) -> bool:
        return self.parity is None or self.parity.passed

    def record(self) -> dict:
        """The manifest record of this step (also the core of :meth:`to_dict`)."""
        return {"level": self.level, "provider": self.provider, "optimized_for": self.optimized_for,
                "model_type": self.model_type, "model_type_source": self.model_type_source,
                "fusion_engine": self.fusion_engine, "num_heads": self.num_heads, "hidden_size": self.hidden_size,
                "fused_ops": self.fused_ops,
                "attention_fused": self.attention_fused, "fusion_status": self.fusion_status,
                "fusion_note": self.fusion_note, "nodes_before": self.nodes_before, "nodes_after": self.nodes_after,
                "float16": self.float16, "float16_io": self.float16_io,
                "parity": self.parity.summary() if self.parity else {"skipped": True},
                "timing": self.timing.to_dict() if self.timing else None, "notes": self.notes}

    def to_dict(self) -> dict:
        return {"output": str(self.output), "manifest": str(self.manifest_path), **self.record(),
                "model_type_reason": self.model_type_reason,
                "inputs": [s.to_dict() for s in self.facts.inputs],
                "outputs": [s.to_dict() for s in self.facts.outputs],
                "external_data": self.facts.external_files,
                "parity": self.parity.to_dict() if self.parity else None, "seconds": self.seconds}


# ---------------------------------------------------------------------------------------------------------------
# Helpers other commands call.


def optimized_for(model_path: str | Path) -> str | None:
    """The provider a model's graph was optimized for ("cpu", "cuda"), or None when it runs anywhere.

    Reads the model's ``metadata_props`` (weights are not loaded).
    """
    model = load_graph(Path(model_path))
    return {p.key: p.value for p in model.metadata_props}.get(OPTIMIZED_FOR_KEY) or None


def provider_mismatch(model_path: str | Path, provider: str) -> str | None:
    """A warning when ``model_path`` was optimized for a provider other than ``provider``, else None.

    For ``validate``/``bench``-style commands: an extended/all-level graph holds rewrites for one provider (and
    CPU layouts for one vector width); on another provider it may fail to load or run slower than the original.
    """
    target = optimized_for(model_path)
    if target is None or target == provider.lower():
        return None
    return (f"{Path(model_path).name} was optimized for {target} (mpack optimize --provider {target}) but runs on "
            f"{provider.lower()} here: its graph may hold {target}-only operators and its timings do not carry over")


def is_quantized(model) -> list[str]:
    """The quantized op types in a graph (empty for a float model)."""
    ops = {op for _, op in _op_counts(model.graph)}
    return sorted(op for op in ops if op in QUANTIZED_OPS or op.startswith(QUANTIZED_PREFIXES))


# ---------------------------------------------------------------------------------------------------------------
# Graph reading: op counts, model type, heads and hidden size.


def _op_counts(graph) -> Counter:
    """(domain, op_type) → count over the graph and its subgraphs."""
    counts: Counter = Counter()
    for node in graph.node:
        counts[(node.domain or "", node.op_type)] += 1
        for attr in node.attribute:
            if attr.HasField("g"):
                counts.update(_op_counts(attr.g))
            for sub in attr.graphs:
                counts.update(_op_counts(sub))
    return counts


def _graph_inputs(model) -> list:
    init = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init]


def detect_model_type(model) -> tuple[str | None, str]:
    """ONNX Runtime's model type for a graph, and why: a first match in a short list of clear signs.

    Returns:
        (model type or None, reason). None means no attention was found (nothing to fuse) or no sign told which.
    """
    ops = {op for _, op in _op_counts(model.graph)}
    inputs = _graph_inputs(model)
    names = [i.name.lower() for i in inputs]
    if ops & set(ATTENTION_OPS):
        return "bert", "the graph already holds fused attention"
    if "Softmax" not in ops:
        return None, "no Softmax in the graph, so no attention to fuse"
    if any("decoder_input" in n for n in names):
        return "bart", "decoder_input_ids among the inputs (encoder-decoder)"
    if any("past" in n for n in names) or "Trilu" in ops:
        return "gpt2", "past key/values inputs or a triangular (causal) mask"
    image = [i for i in inputs if i.type.tensor_type.elem_type in (1, 10, 16) and
             len(i.type.tensor_type.shape.dim) == 4]
    if any("pixel" in n for n in names) or (image and "Conv" in ops):
        return "vit", "an image input (rank 4, float) with attention"
    if any(i.type.tensor_type.elem_type in (6, 7) for i in inputs):
        return "bert", "token-id (integer) inputs with attention"
    return None, "attention without token-id or image inputs: pass --model-type"


def _constants(model) -> dict:
    """Constant values by name: initializers and Constant node outputs (small ones only)."""
    from onnx import numpy_helper

    values = {}
    for t in model.graph.initializer:
        if t.data_location != 1 and int(np.prod(t.dims or [1])) <= 16:
            values[t.name] = numpy_helper.to_array(t)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and int(np.prod(attr.t.dims or [1])) <= 16:
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name == "value_ints":
                    values[node.output[0]] = np.array(attr.ints)
                elif attr.name == "value_int":
                    values[node.output[0]] = np.array([attr.i])
    return values


def _shape_vector(name: str, consts: dict, producers: dict) -> list[int | None] | None:
    """A Reshape target as a list (None for entries known only at run time), or None when its length is unknown.

    Exporters build attention reshapes as Concat(batch, seq, heads or -1, head_size), batch and seq coming from
    Shape/Gather/Unsqueeze at run time; the trailing constants are what tells heads and head size.
    """
    if name in consts:
        return [int(v) for v in np.asarray(consts[name]).ravel()]
    node = producers.get(name)
    if node is None or node.op_type != "Concat":
        return None
    out: list[int | None] = []
    for piece in node.input:
        if piece in consts:
            out += [int(v) for v in np.asarray(consts[piece]).ravel()]
            continue
        src = producers.get(piece)
        if src is not None and src.op_type == "Unsqueeze":
            out.append(None)
        elif src is not None and src.op_type == "Shape":
            attrs = {a.name: a.i for a in src.attribute}
            if "start" in attrs and "end" in attrs and attrs["end"] > attrs["start"] >= 0:
                out += [None] * (attrs["end"] - attrs["start"])
            else:
                return None
        else:
            return None
    return out


def detect_dims(model) -> tuple[int | None, int | None]:
    """``(num_heads, hidden_size)`` read from the graph, each None when the graph does not tell.

    hidden_size: the most common width of LayerNormalization scales (else of square MatMul weights). num_heads:
    from the attention reshapes (batch, seq, heads, head_size); Transformers 5 writes -1 for heads, so heads is
    hidden_size / head_size. Fused Attention nodes carry num_heads themselves.
    """
    consts = _constants(model)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    widths: Counter = Counter()
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization"):
            scale = node.input[{"LayerNormalization": 1, "SkipLayerNormalization": 2}.get(node.op_type, 5)] \
                if len(node.input) > 2 else None
            if scale in dims and len(dims[scale]) == 1:
                widths[dims[scale][0]] += 1
    if not widths:
        for node in model.graph.node:
            if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in dims:
                shape = dims[node.input[1]]
                if len(shape) == 2 and shape[0] == shape[1]:
                    widths[shape[0]] += 1
    hidden = widths.most_common(1)[0][0] if widths else None

    heads: Counter = Counter()
    for node in model.graph.node:
        if node.op_type in ATTENTION_OPS:
            for attr in node.attribute:
                if attr.name == "num_heads":
                    heads[attr.i] += 1
        if node.op_type != "Reshape" or hidden is None or len(node.input) < 2:
            continue
        vector = _shape_vector(node.input[1], consts, producers)
        if not vector or len(vector) != 4:
            continue
        h, d = vector[2], vector[3]
        if d is not None and 0 < d < hidden and hidden % d == 0 and h in (-1, hidden // d):
            heads[hidden // d] += 1
        elif h is not None and 0 < h < hidden and hidden % h == 0 and d in (-1, hidden // h):
            heads[h] += 1
    return (heads.most_common(1)[0][0] if heads else None), hidden


def _int_input_plan(model, specs: list[TensorSpec]) -> dict[str, tuple[str, int]]:
    """How to draw each integer input: ("mask", 2) for attention masks, ("ids", bound) for ids that index a table.

    Random ids must stay inside the vocabulary (a Gather's table), and masks must be 0/1 with something to attend.
    """
    tables = {t.name: list(t.dims) for t in model.graph.initializer}
    bounds: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in tables and tables[node.input[0]]:
            rows = tables[node.input[0]][0]
            bounds[node.input[1]] = min(bounds.get(node.input[1], rows), rows)
    plan = {}
    for spec in specs:
        if np.dtype(spec.dtype).kind not in "iu":
            continue
        if "mask" in spec.name.lower():
            plan[spec.name] = ("mask", 2)
        else:
            plan[spec.name] = ("ids", max(1, min(10, bounds.get(spec.name, 10))))
    return plan


def parity_feeds(specs: list[TensorSpec], sizes: dict[str, int], seed: int,
                 plan: dict[str, tuple[str, int]]) -> dict[str, np.ndarray]:
    """Seeded feeds: :func:`mpack.inputs.random_feeds`, with ids inside their table and 0/1 masks."""
    feeds = random_feeds(specs, sizes, seed=seed)
    rng = np.random.default_rng(seed + 7919)
    for name, (kind, high) in plan.items():
        array = feeds[name]
        if kind == "mask":
            mask = rng.integers(0, 2, array.shape)
            if mask.ndim >= 1 and mask.shape[-1]:
                mask[..., 0] = 1  # every row attends to something
            feeds[name] = mask.astype(array.dtype)
        else:
            feeds[name] = rng.integers(0, high, array.shape).astype(array.dtype)
    return feeds


# ---------------------------------------------------------------------------------------------------------------
# The pipeline.


def _known_model_types() -> list[str]:
    try:
        with silenced():
            from onnxruntime.transformers.optimizer import MODEL_TYPES
    except ImportError as exc:
        _missing_optimizer(exc)
    return sorted(MODEL_TYPES)


def _missing_optimizer(exc: ImportError):
    """Turn a failed import of onnxruntime.transformers into the usual "install mpack[...]" error."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if not name:  # ORT raises some of its own ImportErrors without a name ("missing 'sympy'")
        name = "sympy" if "sympy" in str(exc) else "onnxruntime"
    require(name)  # raises MissingDependencyError naming the extra (sympy, onnxruntime: mpack[cpu])
    raise MissingDependencyError(f"ONNX Runtime's transformer optimizer cannot be imported: {first_line(exc)}",
                                 hint="reinstall mpack[cpu] (or mpack[gpu])") from None


def _check_config(cfg: OptimizeConfig) -> None:
    manifest.check_output(cfg.output, "model.opt.onnx", cfg.model)
    if cfg.level not in LEVELS:
        raise ConfigError("--level", cfg.level, f"is not one of {', '.join(LEVELS)}")
    if cfg.provider not in PROVIDERS:
        raise ConfigError("--provider", cfg.provider, f"is not one of {', '.join(PROVIDERS)}")
    for flag, value in (("--num-heads", cfg.num_heads), ("--hidden-size", cfg.hidden_size)):
        if value is not None and value < 1:
            raise ConfigError(flag, value, "must be a positive integer")
    if cfg.num_heads and cfg.hidden_size and cfg.hidden_size % cfg.num_heads:
        raise ConfigError("--hidden-size", cfg.hidden_size, f"is not divisible by --num-heads {cfg.num_heads}",
                          hint="each head gets hidden_size / num_heads channels: give sizes that divide")
    if cfg.fuser not in FUSERS:
        raise ConfigError("--fuser", cfg.fuser, f"is not one of {', '.join(FUSERS)}")
    if cfg.float16_io and not cfg.float16:
        raise ConfigError("--float16-io", True, "needs --float16")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise ConfigError("--batch-sizes", list(cfg.batch_sizes), "must be positive integers")
    if cfg.model_type not in (AUTO, NONE):
        known = _known_model_types()
        if cfg.model_type not in known:
            raise ConfigError("--model-type", cfg.model_type, "is not a model type ONNX Runtime's optimizer knows",
                              hint=f"use auto, none or one of: {', '.join(known)}")


def _cuda_works() -> bool:
    """Whether a CUDA session really starts here (onnxruntime-gpu lists CUDA even without a GPU)."""
    import onnxruntime as ort

    if _ORT_PROVIDER["cuda"] not in ort.get_available_providers():
        return False
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        with silenced():
            session = ort.InferenceSession(model.SerializeToString(), options,
                                           providers=[_ORT_PROVIDER["cuda"], _ORT_PROVIDER["cpu"]])
    except Exception:  # a broken CUDA install: treat as no CUDA
        return False
    return session.get_providers()[0] == _ORT_PROVIDER["cuda"]


def _resolve_provider(cfg: OptimizeConfig, model, notes: list[str]) -> str:
    """"auto" → the provider the input was optimized for (if it works here), cuda for --float16 where a CUDA device
    works, else cpu."""
    if cfg.provider != "auto":
        return cfg.provider
    target = {p.key: p.value for p in model.metadata_props}.get(OPTIMIZED_FOR_KEY)
    if target == "cuda" and _cuda_works():
        notes.append("--provider auto: the input was optimized for cuda, so is this model")
        return "cuda"
    if not cfg.float16:
        return "cpu"
    if _cuda_works():
        notes.append("--float16: optimized and verified on cuda (found here)")
        return "cuda"
    notes.append("--float16 is meant for GPUs; no CUDA device here, so it was optimized and verified on cpu")
    return "cpu"


def _load_input(path: Path):
    try:
        return load_graph(path)
    except MpackError:
        raise
    except Exception as exc:  # onnx.load picks a text parser by suffix (.json, .txt) and raises its own errors
        raise InputFileError(f"{path} is not an ONNX model ({type(exc).__name__})",
                             hint="give an .onnx file written by an exporter or by mpack convert") from None


def _check_model(cfg: OptimizeConfig, model) -> None:
    quantized = is_quantized(model)
    if quantized:
        raise InputFileError(f"{cfg.model} is already quantized (has {', '.join(quantized)})",
                             hint="optimize the float model first, then quantize the optimized one "
                                  "(mpack quantize)")
    props = {p.key: p.value for p in model.metadata_props}
    target = props.get(OPTIMIZED_FOR_KEY)
    if target and target != cfg.provider:
        raise InputFileError(f"{cfg.model} was optimized for {target} (metadata {OPTIMIZED_FOR_KEY}); it cannot be "
                             f"optimized for {cfg.provider}",
                             hint=f"optimize the un-optimized model (from mpack convert) with --provider "
                                  f"{cfg.provider}")


def _resolve_dims(cfg: OptimizeConfig, model, model_type: str | None, notes: list[str]
                  ) -> tuple[int | None, int | None]:
    heads, hidden = detect_dims(model) if model_type else (None, None)
    if cfg.num_heads is not None:
        if heads is not None and heads != cfg.num_heads:
            notes.append(f"--num-heads {cfg.num_heads} overrides {heads} read from the graph")
        heads = cfg.num_heads
    if cfg.hidden_size is not None:
        if hidden is not None and hidden != cfg.hidden_size:
            notes.append(f"--hidden-size {cfg.hidden_size} overrides {hidden} read from the graph")
        hidden = cfg.hidden_size
    if heads and hidden and hidden % heads:
        which = "--num-heads" if cfg.num_heads is not None else "--hidden-size"
        value = cfg.num_heads if cfg.num_heads is not None else cfg.hidden_size
        raise ConfigError(which, value, f"does not divide: hidden size {hidden} is not divisible by {heads} heads",
                          hint="each head gets hidden_size / num_heads channels: give sizes that divide")
    return heads, hidden


def _ort_pass(src: Path, dest: Path, level: str, provider: str, external: bool) -> None:
    """ONNX Runtime's offline optimization: create a session that saves its optimized graph to ``dest``."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = _ORT_PROVIDER[provider]
    if wanted not in available:
        raise ConfigError("--provider", provider, "is not available in this ONNX Runtime",
                          hint="available here: " + ", ".join(k for k, v in _ORT_PROVIDER.items() if v in available)
                               + " (install mpack[gpu] on a CUDA machine for cuda)")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    options.optimized_model_filepath = str(dest)
    options.log_severity_level = 3
    if external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         dest.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    providers = [wanted] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    try:
        session = ort.InferenceSession(str(src), sess_options=options, providers=providers)
    except Exception as exc:  # ORT's Fail/InvalidGraph/NotImplemented: the model cannot be loaded here
        raise InputFileError(f"ONNX Runtime cannot load {src.name}: {first_line(exc)}",
                             hint="check the file with `mpack inspect`") from None
    if session.get_providers()[0] != wanted:
        raise ConfigError("--provider", provider, f"could not be started here (ONNX Runtime fell back to "
                          f"{session.get_providers()[0]})", hint="check the GPU driver and CUDA libraries")


def _save(model, dest: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dest.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(dest))


@contextlib.contextmanager
def _in_dir(path: Path):
    """Run a block in ``path``: ORT's symbolic shape inference leaves ``sym_shape_infer_temp.onnx`` (and its
    ``*.data``) in the current directory when it fails; they must land in our private directory, not the user's."""
    cwd = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(cwd)


class _FusionLog(logging.Handler):
    """Collects the transformer optimizer's reasons for not fusing ("failed to match mask path")."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: Counter = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "failed" in message.lower() or "expected value" in message.lower():
            self.messages[message.split(". ")[0][:160]] += 1


def _fuse(src: Path, dest: Path, model_type: str, heads: int | None, hidden: int | None, external: bool
          ) -> Counter:
    """ONNX Runtime's transformer fusions (Attention, SkipLayerNormalization, EmbedLayerNormalization, Gelu)."""
    import onnx

    src, dest = src.resolve(), dest.resolve()  # _in_dir changes the working directory
    try:
        with silenced():
            from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
            from onnxruntime.transformers.optimizer import optimize_by_fusion
    except ImportError as exc:
        _missing_optimizer(exc)
    options = FusionOptions(model_type)
    if options.attention_mask_format == AttentionMaskFormat.MaskIndexEnd:
        # ORT's BERT default turns attention_mask into sequence lengths, which silently assumes right-side padding;
        # keeping the 2D mask gives the same results as the source for any mask.
        options.attention_mask_format = AttentionMaskFormat.AttentionMask
    log = _FusionLog()
    watched = [logging.getLogger(name) for name in ("fusion_attention", "fusion_base")]
    saved = [(lg, lg.level, lg.propagate) for lg in watched]
    for lg in watched:
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
        lg.addHandler(log)
    try:
        with _in_dir(dest.parent), silenced("onnx_model", "fusion_utils", "onnx_model_bert"):
            model = onnx.load(str(src))
            fused = optimize_by_fusion(model, model_type, heads or 0, hidden or 0, options)
            fused.topological_sort()
            _save(fused.model, dest, external)
    except MpackError:
        raise
    except ImportError as exc:
        _missing_optimizer(exc)
    except Exception as exc:  # the fusion scripts raise assorted errors on graphs they half-match
        raise MpackError(f"ONNX Runtime's transformer fusions failed on this graph ({type(exc).__name__}: "
                         f"{first_line(exc, 200)})", hint="retry with --model-type none (graph optimization only), "
                         "or give --num-heads/--hidden-size") from None
    finally:
        for lg, level, propagate in saved:
            lg.removeHandler(log)
            lg.setLevel(level)
            lg.propagate = propagate
    return log.messages


def _fuse_onnxscript(src: Path, dest: Path, external: bool, required: bool) -> str | None:
    """onnxscript's ORT fusions (SDPA → MultiHeadAttention → Attention, SkipLayerNormalization, BiasGelu), which
    match the dynamo exporter's graphs. Returns None on success, else why it could not run.
    """
    try:
        with silenced():
            import onnx_ir as ir
            from onnxscript.rewriter.ort_fusions import optimize_for_ort
    except ImportError as exc:
        if required:
            raise MissingDependencyError(f"--fuser onnxscript needs the Python package 'onnxscript' ({exc})",
                                         hint="install it with: pip install 'mpack[torch]'") from None
        return "onnxscript is not installed (mpack[torch])"
    try:
        with silenced("onnxscript", "onnx_ir"):
            model = ir.load(str(src))
            model, _ = optimize_for_ort(model)
            ir.save(model, str(dest), external_data=(dest.name + ".data") if external else None)
    except Exception as exc:  # a rewrite rule that trips on an unusual graph; ORT's result stands
        if required:
            raise MpackError(f"onnxscript's ORT fusions failed on this graph ({type(exc).__name__}: "
                             f"{first_line(exc, 200)})", hint="retry with --fuser ort") from None
        return f"onnxscript's ORT fusions failed ({type(exc).__name__}: {first_line(exc, 120)})"
    return None


def _attention_added(before: Counter, path: Path) -> bool:
    after = _op_counts(load_graph(path).graph)
    return any(after.get((_CONTRIB, op), 0) > before.get((_CONTRIB, op), 0) for op in ATTENTION_OPS)


def _to_float16(src: Path, dest: Path, keep_io: bool, external: bool) -> None:
    import onnx

    src, dest = src.resolve(), dest.resolve()  # _in_dir changes the working directory
    try:
        with silenced():
            from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
            from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError as exc:
        _missing_optimizer(exc)
    try:
        with _in_dir(dest.parent), silenced("onnx_model", "float16", "symbolic_shape_infer", "shape_infer_helper"):
            model = OnnxModel(onnx.load(str(src)))
            model.convert_float_to_float16(keep_io_types=keep_io,
                                           op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FLOAT32)))
            _save(model.model, dest, external)
    except ImportError as exc:
        _missing_optimizer(exc)


def _stamp(path: Path, entries: dict[str, str | None]) -> None:
    """Write mpack's keys into the model's metadata_props (weights stay where they are)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    for key, value in keep + [(k, v) for k, v in entries.items() if v is not None]:
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save_model(model, str(path))


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise MpackError(f"the optimized model fails onnx.checker: {first_line(exc, 200)}",
                         hint="retry with --level basic or --model-type none") from None


def _fused_ops(before: Counter, after: Counter) -> dict[str, int]:
    """Op types the optimization added (contrib ops and fused standard ops), with how many."""
    grown = {}
    for (domain, op), count in after.items():
        if domain == _CONTRIB or (domain in ("", "ai.onnx") and op in _STANDARD_FUSED):
            delta = count - before.get((domain, op), 0)
            if delta > 0:
                grown[op] = delta
    return dict(sorted(grown.items(), key=lambda kv: (-kv[1], kv[0])))


def _why_no_attention(src_manifest: dict | None, model, specs: list[TensorSpec], log: Counter,
                      model_type: str, fuser: str, onnxscript_problem: str | None) -> tuple[str, str]:
    """(why attention did not fuse, the route that works), from the exporter, the inputs and the fuser used."""
    exporter = str((src_manifest or {}).get("exporter") or "")
    dynamo = "dynamo" in exporter or (not exporter and any(n.name.startswith("node_") for n in model.graph.node))
    source = (src_manifest or {}).get("source", {}).get("path")
    inputs = " ".join(f"--input {s}" for s in specs)
    convert = f"mpack convert {source or 'SOURCE'} {inputs}"
    torchscript = (f"re-export with `{convert} --exporter torchscript -o model.onnx` (Hugging Face models: "
                   "attn_implementation=\"eager\" and an attention_mask input) and optimize that")
    dynamo_route = f"re-export with `{convert} --exporter dynamo -o model.onnx` and optimize that"
    tried = f"; {onnxscript_problem}" if onnxscript_problem else ""
    matcher = "; ".join(f"{m} ({n}x)" for m, n in log.most_common(2))
    matcher = f" [ONNX Runtime: {matcher}]" if matcher else ""
    ort_side = ("ONNX Runtime's transformer optimizer matches the TorchScript-based exporter's graph of eager "
                "attention with a mask")
    if dynamo and fuser == "ort":
        why = (f"the graph comes from the dynamo exporter and {ort_side}; --fuser ort skipped onnxscript's fusions, "
               "which match dynamo exports")
        route = f"drop --fuser ort, or {torchscript}"
    elif dynamo:
        why = f"the graph comes from the dynamo exporter and {ort_side}{tried}"
        route = ("install onnxscript (pip install 'mpack[torch]') and re-run, or " + torchscript
                 if onnxscript_problem and "not installed" in onnxscript_problem else torchscript)
    elif fuser == "onnxscript":
        why = "onnxscript's ORT fusions match the dynamo exporter's graphs, and this one is not a dynamo export"
        route = "drop --fuser onnxscript (ONNX Runtime's transformer optimizer then runs)"
    elif model_type == "bert" and not any("mask" in s.name.lower() for s in specs):
        why = ("the model has no attention_mask input: Transformers 5 then builds attention without a mask, a "
               f"pattern ONNX Runtime's transformer optimizer does not match{tried}")
        route = ("export the model with an attention_mask input (forward(input_ids, attention_mask), one more "
                 f"--input), or {dynamo_route} (onnxscript's fusions match it)")
    else:
        why = f"the attention subgraph does not match ONNX Runtime's {model_type} patterns{tried}"
        route = f"{torchscript}; or {dynamo_route} (onnxscript's fusions match dynamo exports)"
    return why + matcher, route


def _timing(reference, candidate, ref_feeds: dict, cand_feeds: dict, label: str, provider: str,
            float16: bool) -> Timing:
    """Median latency of both models on the same feeds, interleaved so drifts in machine load hit both."""
    ref_times, cand_times = [], []
    start = time.perf_counter()
    for i in range(TIMING_WARMUP + TIMING_ITERATIONS):
        t0 = time.perf_counter()
        reference.session.run(None, ref_feeds)
        t1 = time.perf_counter()
        candidate.session.run(None, cand_feeds)
        t2 = time.perf_counter()
        if i >= TIMING_WARMUP:
            ref_times.append(t1 - t0)
            cand_times.append(t2 - t1)
            if len(ref_times) >= 3 and t2 - start > TIMING_BUDGET_S:
                break
    meaningful, note = True, "a quick figure from the parity run; use a benchmark for decisions"
    if float16 and provider == "cpu":
        meaningful = False
        note = ("float16 on CPU: ONNX Runtime runs most float16 ops through Casts to float32, so this speed figure "
                "is not meaningful; measure on the GPU the model is for")
    return Timing(label, provider, len(ref_times), 1e3 * statistics.median(ref_times),
                  1e3 * statistics.median(cand_times), meaningful, note)


def _verify(cfg: OptimizeConfig, src: Path, dest: Path, specs: list[TensorSpec], plan: dict,
            reference_provider: str) -> tuple[ParityReport, Timing | None]:
    """The input model (fp32) vs the optimized one on the same seeded inputs, per size case."""
    from mpack.backends.onnxruntime import OnnxRuntimeRunner

    tolerances = cfg.tolerances or (Tolerances(FP16_TOLERANCE) if cfg.float16 else Tolerances())
    cases = parity_cases(specs, cfg.batch_sizes)
    report = ParityReport(reference=f"input[{reference_provider}]", candidate=f"optimized[{cfg.provider}]")
    timing = None
    with OnnxRuntimeRunner(src, (reference_provider,)) as reference, \
            OnnxRuntimeRunner(dest, (cfg.provider,)) as candidate:
        cand_types = {s.name: s.dtype for s in candidate.input_specs()}
        last: tuple[SizeCase, dict, dict] | None = None
        for i, case in enumerate(cases):
            feeds = parity_feeds(specs, case.sizes, cfg.seed + i, plan)
            cand_feeds = {k: v.astype(cand_types.get(k, v.dtype)) for k, v in feeds.items()}
            expected = reference.infer(feeds)
            try:
                got = candidate.infer(cand_feeds)
            except Exception as exc:  # a run failure of the optimized graph is a parity failure, not a crash
                report.errors.append(f"{case.label}: the optimized model failed: {first_line(exc, 200)}")
                continue
            compare_outputs(report, case.label, expected, got, tolerances)
            last = (case, feeds, cand_feeds)
        if last is not None and report.passed:
            timing = _timing(reference, candidate, last[1], last[2], last[0].label, cfg.provider, cfg.float16)
    return report, timing


def run(cfg: OptimizeConfig, progress: Callable[[str], None] | None = None) -> OptimizeResult:
    """Optimize one ONNX model and verify it against the input; see the module docstring for the steps.

    Raises:
        MpackError: for bad input (exit 2), a missing extra (4) or a parity failure (3).
    """
    step = progress or (lambda message: None)
    _check_config(cfg)
    require("onnxruntime")
    notes: list[str] = []
    seconds: dict[str, float] = {}
    source = _load_input(cfg.model)
    cfg = replace(cfg, provider=_resolve_provider(cfg, source, notes))
    _check_model(cfg, source)
    src_manifest = manifest.load(cfg.model)
    facts_in = read_facts(cfg.model, source)
    specs = facts_in.inputs

    if cfg.model_type == NONE:
        model_type, type_source, type_reason = None, "none", "--model-type none: fusions skipped"
    elif cfg.model_type == AUTO:
        model_type, type_reason = detect_model_type(source)
        type_source = "detected" if model_type else "none"
    else:
        model_type, type_source, type_reason = cfg.model_type, "flag", "--model-type"
    heads, hidden = _resolve_dims(cfg, source, model_type, notes)
    if model_type and model_type != "bert" and not (heads and hidden):
        notes.append(f"num_heads/hidden_size not found in the graph: {model_type} fusions may need --num-heads "
                     "and --hidden-size")

    external = bool(external_files(source)) or initializer_bytes(source) > EXTERNAL_DATA_THRESHOLD
    before = _op_counts(source.graph)
    work = manifest.private_dir(cfg.output)
    try:
        current = cfg.model
        fusion_log: Counter = Counter()
        engine, onnxscript_problem = None, None
        name = cfg.output.name
        if model_type:
            step(f"fusing transformer operators ({model_type})")
            t0 = time.perf_counter()
            if cfg.fuser in ("auto", "ort"):
                for sub in ("basic", "fused-ort"):
                    (work / sub).mkdir()
                _ort_pass(current, work / "basic" / name, "basic", "cpu", external)
                fusion_log = _fuse(work / "basic" / name, work / "fused-ort" / name, model_type, heads, hidden,
                                   external)
                engine, current = "ort", work / "fused-ort" / name
            if cfg.fuser == "onnxscript" or (cfg.fuser == "auto" and not _attention_added(before, current)):
                step("fusing transformer operators (onnxscript)")
                (work / "fused-onnxscript").mkdir()
                candidate = work / "fused-onnxscript" / name
                onnxscript_problem = _fuse_onnxscript(cfg.model, candidate, external, cfg.fuser == "onnxscript")
                if onnxscript_problem is None and (cfg.fuser == "onnxscript" or _attention_added(before, candidate)):
                    engine, current = "onnxscript", candidate
                    if cfg.fuser == "auto":
                        notes.append("ONNX Runtime's transformer optimizer fused no attention in this graph; "
                                     "onnxscript's ORT fusions (made for dynamo exports) did")
                elif onnxscript_problem is None:
                    onnxscript_problem = "onnxscript's ORT fusions fused no attention either"
            seconds["fuse"] = time.perf_counter() - t0
        if cfg.float16:
            step("converting to float16")
            t0 = time.perf_counter()
            (work / "fp16").mkdir()
            _to_float16(current, work / "fp16" / name, keep_io=not cfg.float16_io, external=external)
            current = work / "fp16" / name
            seconds["float16"] = time.perf_counter() - t0
        step(f"ONNX Runtime graph optimization ({cfg.level}, {cfg.provider})")
        t0 = time.perf_counter()
        final_dir = work / "final"
        final_dir.mkdir()
        final = final_dir / name
        _ort_pass(current, final, cfg.level, cfg.provider, external)
        target = cfg.provider if cfg.level in PROVIDER_SPECIFIC_LEVELS else None
        _stamp(final, {OPTIMIZED_FOR_KEY: target, RECORD_KEY: json.dumps(
            {"level": cfg.level, "provider": cfg.provider, "model_type": model_type, "float16": cfg.float16,
             "mpack": __version__}, sort_keys=True)})
        _check(final)
        seconds["optimize"] = time.perf_counter() - t0
        if cfg.level == "all" and cfg.provider == "cpu":
            notes.append("level all adds CPU layout rewrites (NCHWc) tuned to this CPU's vector width: run the model "
                         "on the same kind of machine")

        optimized = load_graph(final)
        after = _op_counts(optimized.graph)
        fused = _fused_ops(before, after)
        attention = any(op in fused for op in ATTENTION_OPS) or any(op in ATTENTION_OPS for _, op in before)
        status, fusion_note = _fusion_status(model_type, type_reason, fused, attention, src_manifest, source,
                                             specs, fusion_log, cfg.fuser, onnxscript_problem)

        report, timing = None, None
        if cfg.verify:
            step(f"checking parity: input vs optimized ({cfg.provider})")
            t0 = time.perf_counter()
            plan = _int_input_plan(source, specs)
            reference_provider = optimized_for(cfg.model) or "cpu"
            report, timing = _verify(cfg, cfg.model, final, specs, plan, reference_provider)
            seconds["parity"] = time.perf_counter() - t0
            if not report.passed:
                raise ParityError("parity check failed: the optimized model differs from the input beyond tolerance",
                                  report=report, hint=_parity_hint(cfg, model_type))

        facts = read_facts(final)
        result = OptimizeResult(
            output=cfg.output, manifest_path=manifest.manifest_path_for(cfg.output), level=cfg.level,
            provider=cfg.provider, optimized_for=target, model_type=model_type, model_type_source=type_source,
            model_type_reason=type_reason, fusion_engine=ENGINES.get(engine), num_heads=heads if model_type else None,
            hidden_size=hidden if model_type else None, fused_ops=fused, attention_fused=attention,
            fusion_status=status, fusion_note=fusion_note, nodes_before=sum(before.values()),
            nodes_after=sum(after.values()), float16=cfg.float16, float16_io=cfg.float16_io, facts=facts,
            parity=report, timing=timing, notes=notes, seconds=seconds)
        _write_manifest(cfg, src_manifest, final, facts, result)
        manifest.publish(final_dir, cfg.output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.facts.path = cfg.output
    return result


def _fusion_status(model_type: str | None, type_reason: str, fused: dict[str, int], attention: bool,
                   src_manifest: dict | None, source, specs: list[TensorSpec], log: Counter, fuser: str,
                   onnxscript_problem: str | None) -> tuple[str, str | None]:
    if not model_type:
        return "skipped", f"transformer fusions skipped: {type_reason}"
    if attention:
        return "fused", None
    why, route = _why_no_attention(src_manifest, source, specs, log, model_type, fuser, onnxscript_problem)
    others = ", ".join(f"{op} {n}" for op, n in fused.items())
    head = f"no attention fused ({others} did)" if fused else "nothing fused"
    return ("partial" if fused else "none"), f"{head}: {why}. Route that works: {route}"


def _parity_hint(cfg: OptimizeConfig, model_type: str | None) -> str:
    if cfg.float16:
        return "float16 loses precision: loosen --atol/--rtol if the differences are acceptable, or drop --float16"
    if model_type:
        return ("check --num-heads/--hidden-size, or retry with --model-type none (graph optimization only); "
                "--no-verify skips the check")
    return "loosen --atol/--rtol if the differences are acceptable, or skip with --no-verify"


def _write_manifest(cfg: OptimizeConfig, src_manifest: dict | None, final: Path, facts: OnnxFacts,
                    result: OptimizeResult) -> None:
    """Copy the input's manifest (convert's record stays), point it at the new file and append this step.

    N.B. The top-level keys are a superset of convert's (model, inputs, outputs, opsets, ...), so ``mpack quantize``
    and ``mpack inspect`` read an optimized model's manifest like a converted one's.
    """
    created = manifest.now()
    data = copy.deepcopy(src_manifest) if src_manifest else {
        "schema": manifest.SCHEMA, "created_at": created, "mpack_version": __version__,
        "source": {"path": str(cfg.model.resolve()), "format": "onnx", "sha256": manifest.sha256_path(cfg.model)},
        "framework": None, "exporter": None, "opset": facts.opsets.get("ai.onnx"),
        "versions": {"mpack": __version__, "onnx": distribution_version("onnx"),
                     "onnxruntime": _ort_version(), "python": platform.python_version()},
        "parity": {"skipped": True}, "notes": [], "history": []}
    data["model"] = {"path": cfg.output.name, "sha256": manifest.sha256_path(final),
                     "size_bytes": final.stat().st_size + sum((final.parent / f).stat().st_size
                                                              for f in facts.external_files),
                     "external_data": [{"path": f, "sha256": manifest.sha256_path(final.parent / f)}
                                       for f in facts.external_files]}
    data["opsets"] = facts.opsets
    data["inputs"] = [s.to_dict() for s in facts.inputs]
    data["outputs"] = [s.to_dict() for s in facts.outputs]
    data["optimized_for"] = result.optimized_for
    record = {**result.record(), "onnxruntime": _ort_version()}
    data["optimization"] = record
    data.setdefault("history", []).append({
        "step": "optimize", "at": created,
        "from": {"path": str(cfg.model), "sha256": manifest.sha256_path(cfg.model)},
        **{k: record[k] for k in ("level", "provider", "optimized_for", "model_type", "fusion_engine", "num_heads",
                                  "hidden_size", "fused_ops", "fusion_status", "nodes_before", "nodes_after",
                                  "float16", "parity")}})
    manifest.write_atomic(final.parent / manifest.manifest_path_for(cfg.output).name, data)


def _ort_version() -> str | None:
    return distribution_version("onnxruntime") or distribution_version("onnxruntime-gpu")
