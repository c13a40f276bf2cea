"""TensorFlow exporter: a SavedModel, a Keras ``.keras``/``.h5`` file or a TFLite flatbuffer → ONNX with tf2onnx.

Routes (see the "TensorFlow / Keras 3 → ONNX" section of the stack notes for why):
    keras, h5   ``load_model`` → ``tf.function`` with an input signature → ``tf2onnx.convert.from_function``.
                ``from_keras`` fails on Keras 3 Sequential models (``KeyError: 'keras_tensor_N'``).
    savedmodel  ``tf2onnx.tf_loader.from_saved_model`` → ``tf2onnx.convert.from_graph_def`` on the
                ``serving_default`` signature (a reloaded signature cannot go to ``from_function``).
    tflite      ``tf2onnx.convert.from_tflite``; tf2onnx reorders inputs and outputs and names them after the
                flatbuffer's tensors, so they are renamed after the file's SignatureDef keys.

Naming (N.B. ``backends/tensorflow.py`` returns outputs under the same names):
    inputs      the model's own input names (Keras inputs, signature keys), without ":0".
    outputs     Keras: ``model.output_names`` (Functional) or ``output_{i}`` (Sequential, as ``model.export``
                names them); a model returning a dict keeps its keys. SavedModel and TFLite: the signature's
                output keys (``output_0``... for ``model.export``).
    dims        unknown dims become symbolic: axis 0 "batch", others "{input}_dim{axis}".
"""

from __future__ import annotations

import contextlib
import logging
import re
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpack._optional import require
from mpack.backends.base import BaseRunner
from mpack.convert.base import ExportedModel, ExportRequest
from mpack._quiet import silenced
from mpack.errors import ConfigError, ExportError, InputFileError, MpackError, first_line
from mpack.inputs import DEFAULT_BATCH_SIZES
from mpack.specs import TensorSpec

BATCH = "batch"
SIGNATURE = "serving_default"
TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier, bytes 4..8
# ONNX domains whose ops ONNX Runtime runs without extensions; tf2onnx puts some string ops in "ai.onnx.contrib"
# (onnxruntime-extensions), which a plain ORT cannot load.
_RUNNABLE_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
# Protobuf cannot serialise a message over 2 GiB; above this the model is saved with external data.
_PROTO_LIMIT = 2**31 - 2**24


@dataclass(frozen=True)
class _Declared:
    """An input as the model declares it: None marks an unknown dim."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


def export_tensorflow(req: ExportRequest) -> ExportedModel:
    """Convert a TensorFlow model to ``req.work_dir / "model.onnx"`` with tf2onnx.

    Args:
        req: ``req.kind`` is "savedmodel", "keras", "h5" or "tflite".

    Returns:
        The ONNX file, its input specs and a runner for the original model, whose outputs carry the ONNX names.

    Raises:
        InputFileError: the source is missing, or not the kind of model it claims to be.
        ConfigError: ``req.specs`` does not match the model's inputs.
        ExportError: tf2onnx cannot convert the model (e.g. an op without an ONNX conversion).
        MissingDependencyError: TensorFlow or tf2onnx is not installed.
    """
    from mpack.backends.tensorflow import import_tensorflow

    sources = {"savedmodel": _SavedModelSource, "keras": _KerasSource, "h5": _KerasSource,
               "tflite": _TFLiteSource}
    if req.kind not in sources:
        raise ConfigError("kind", req.kind, "is not a TensorFlow model format",
                          hint=f"use one of {', '.join(sources)}")
    tf = import_tensorflow()
    tf2onnx = require("tf2onnx")
    from tf2onnx import constants

    max_opset = max(constants.OPSET_TO_IR_VERSION)
    if not 7 <= req.opset <= max_opset:
        raise ConfigError("--opset", req.opset, f"tf2onnx {tf2onnx.__version__} exports opsets 7 to {max_opset}",
                          hint=f"use --opset {max_opset} or lower")
    source = sources[req.kind](Path(req.source), req.kind)
    with _quiet():
        source.load()
    specs = resolve_specs(source.declared, req.specs, req.dynamic_batch)
    forced = _forced_batch(source.declared, specs)
    notes = list(source.notes)

    try:
        model = _convert(source, specs, req.opset)
    except _UnsupportedOps:
        raise
    except ExportError:
        if not forced:
            raise
        # The model would not trace with a free batch (e.g. a reshape to a fixed size): keep its own batch.
        specs = _unforce(specs, source.declared, forced)
        notes.append(_fixed_batch_note(forced, "it does not convert with a free batch size"))
        forced = []
        model = _convert(source, specs, req.opset)

    output_names = _clean_io_names(model, source.input_rename(model), source.output_rename(model))
    if source.restore_order:  # TFLite: tf2onnx shuffles them; give back the SignatureDef's order
        _reorder(model.graph.input, [d.name for d in source.declared])
        output_names = _reorder(model.graph.output, list(source.outputs))
    specs = _in_onnx_order(model, specs)
    _set_input_dims(model, specs)
    _name_output_dims(model, free_batch=bool(forced))
    onnx_path = req.work_dir / "model.onnx"
    _save(model, onnx_path)
    runner = source.runner(specs, output_names)

    if forced:
        problem = _dynamic_problem(onnx_path, runner, specs)
        if problem:
            specs = _unforce(specs, source.declared, forced)
            notes.append(_fixed_batch_note(forced, problem))
            _set_input_dims(model, specs)
            _name_output_dims(model, free_batch=False)
            _save(model, onnx_path)
            runner = source.runner(specs, output_names)
        else:
            sizes = " and ".join(map(str, DEFAULT_BATCH_SIZES))
            notes.append(f"made the fixed batch size of {', '.join(forced)} dynamic (--dynamic-batch); the export "
                         f"and the original model both ran at batch sizes {sizes}")

    return ExportedModel(
        onnx_path=onnx_path, framework="tensorflow", framework_version=tf.__version__,
        exporter=f"tf2onnx {tf2onnx.__version__} ({source.route})", input_specs=specs, source_runner=runner,
        notes=notes)


def source_runner(source: str, kind: str, specs: list[TensorSpec], output_names: list[str]) -> BaseRunner:
    """A runner for a TensorFlow source as a manifest records it, without converting again (``mpack validate``).

    Args:
        source: The SavedModel directory or the .keras/.h5/.tflite file.
        kind: Its format: "savedmodel", "keras", "h5" or "tflite".
        specs: The ONNX model's inputs (named as the model's own inputs).
        output_names: The ONNX model's output names; the runner returns its outputs under them.

    Raises:
        InputFileError: the source is missing or unreadable.
        ConfigError: the names do not match the model's own inputs or outputs.
    """
    from mpack.backends.tensorflow import SavedModelRunner, import_tensorflow

    sources = {"savedmodel": _SavedModelSource, "keras": _KerasSource, "h5": _KerasSource,
               "tflite": _TFLiteSource}
    if kind not in sources:
        raise ConfigError("kind", kind, "is not a TensorFlow model format", hint=f"use one of {', '.join(sources)}")
    tf = import_tensorflow()
    src = sources[kind](Path(source), kind)
    with _quiet():
        src.load()
    own = [d.name for d in src.declared]
    if sorted(own) != sorted(s.name for s in specs):
        raise ConfigError("inputs", [s.name for s in specs], f"do not match the inputs {own} of {source}")
    if kind == "tflite" and not set(output_names) <= set(src.outputs):
        raise ConfigError("outputs", list(output_names), f"do not match the outputs {list(src.outputs)} of {source}")
    if kind == "savedmodel":  # export_tensorflow reuses tf2onnx's loaded copy; here the signature is loaded anew
        path = str(src.path)
        return SavedModelRunner(lambda: tf.saved_model.load(path), src.signature, list(specs), list(output_names))
    return src.runner(list(specs), list(output_names))


# --- sources: load, declare inputs, convert, run -------------------------------------------------------------


class _Source:
    route = ""
    restore_order = False  # put the ONNX inputs and outputs back in the order of ``declared`` and ``outputs``

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self.declared: list[_Declared] = []
        self.notes: list[str] = []

    def load(self) -> None:
        raise NotImplementedError

    def convert(self, specs: list[TensorSpec], opset: int):
        """Return the tf2onnx ModelProto."""
        raise NotImplementedError

    def input_rename(self, model) -> dict[str, str]:
        return {}

    def output_rename(self, model) -> dict[str, str]:
        return {}

    def runner(self, specs: list[TensorSpec], output_names: list[str]) -> BaseRunner:
        raise NotImplementedError


class _KerasSource(_Source):
    route = "from_function"

    def load(self) -> None:
        from mpack.backends.tensorflow import import_keras

        keras = import_keras()
        what = "Keras .keras archive" if self.kind == "keras" else "Keras HDF5 (.h5) model"
        _check_file(self.path, what)
        if self.kind == "keras" and not zipfile.is_zipfile(self.path):
            raise InputFileError(f"{self.path} is not a {what} (not a zip archive)",
                                 hint="save the model with model.save('model.keras')")
        if self.kind == "h5" and not _is_hdf5(self.path):
            raise InputFileError(f"{self.path} is not a {what} (no HDF5 signature)",
                                 hint="save the model with model.save('model.h5')")
        try:
            self.model = keras.models.load_model(self.path, compile=False)
        except Exception as exc:  # Keras raises ValueError, OSError, TypeError, KeyError... for a bad file
            raise InputFileError(f"{self.path} cannot be loaded as a {what}: {first_line(exc)}",
                                 hint="check that the file is complete and that custom layers are registered "
                                      "(keras.saving.register_keras_serializable)") from None
        inputs = getattr(self.model, "inputs", None)
        if not inputs:
            raise InputFileError(f"{self.path} holds a Keras model that declares no inputs (a subclassed model "
                                 "that was never built)",
                                 hint="save a Functional or Sequential model, or build the model before saving")
        self.declared = [_Declared(i.name, tuple(i.shape), _dtype_name(i.dtype)) for i in inputs]
        if type(self.model).__name__ == "Sequential":
            self.notes.append("Keras Sequential converted through tf.function (tf2onnx.convert.from_keras fails "
                              "on Keras 3 Sequential models)")

    def convert(self, specs: list[TensorSpec], opset: int):
        tf, tf2onnx = require("tensorflow"), require("tf2onnx")
        from mpack.backends.tensorflow import call_keras

        model = self.model
        by_name = {s.name: s for s in specs}
        signature = [tf.TensorSpec([d if isinstance(d, int) else None for d in by_name[i.name].shape],
                                   tf.as_dtype(by_name[i.name].dtype), name=i.name) for i in self.declared]

        names: list[str] = []

        @tf.function(input_signature=signature)
        def serve(*args):
            outputs = call_keras(model, list(args))
            names[:] = outputs
            # A list keeps the model's output order in the ONNX graph (tf2onnx sorts the keys of a dict).
            return list(outputs.values())

        concrete = serve.get_concrete_function()  # traced once; from_function reuses this trace
        self._outputs = dict(zip([t.name for t in concrete.outputs], names))
        model_proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=opset,
                                                       large_model=False)
        return model_proto

    def output_rename(self, model) -> dict[str, str]:
        return self._outputs

    def runner(self, specs: list[TensorSpec], output_names: list[str]) -> BaseRunner:
        from mpack.backends.tensorflow import KerasRunner

        by_name = {s.name: s for s in specs}
        model = self.model
        return KerasRunner(lambda: model, [by_name[d.name] for d in self.declared], output_names)


class _SavedModelSource(_Source):
    route = "from_saved_model + from_graph_def"

    def load(self) -> None:
        if not self.path.exists():
            raise InputFileError(f"{self.path} does not exist", hint="check the path")
        if not self.path.is_dir() or not any((self.path / f).is_file()
                                             for f in ("saved_model.pb", "saved_model.pbtxt")):
            raise InputFileError(f"{self.path} is not a SavedModel directory (no saved_model.pb in it)",
                                 hint="give the directory written by tf.saved_model.save or model.export")
        from tensorflow.python.saved_model import loader_impl  # parses the proto only, no variables

        try:
            saved = loader_impl.parse_saved_model(str(self.path))
        except Exception as exc:
            raise InputFileError(f"{self.path} is not a valid SavedModel: {first_line(exc)}",
                                 hint="re-export the model with tf.saved_model.save or model.export") from None
        found = {k: g for g in saved.meta_graphs for k in g.signature_def if not k.startswith("_")}
        if SIGNATURE in found:
            self.signature = SIGNATURE
        elif len(found) == 1:
            self.signature = next(iter(found))
        else:
            raise InputFileError(f"{self.path} has no '{SIGNATURE}' signature (signatures: "
                                 f"{', '.join(sorted(found)) or 'none'})",
                                 hint="export the model with a serving_default signature, e.g. model.export(dir)")
        graph = found[self.signature]
        self.tags = list(graph.meta_info_def.tags) or ["serve"]
        signature = graph.signature_def[self.signature]
        if any(info.tensor_shape.unknown_rank for info in signature.inputs.values()):
            raise InputFileError(f"{self.path}: the '{self.signature}' signature has an input of unknown rank",
                                 hint="export the model with an input signature that fixes each input's rank")
        from tensorflow.python.framework import dtypes

        self.declared = [
            _Declared(key, tuple(None if d.size < 0 else d.size for d in info.tensor_shape.dim),
                      dtypes.as_dtype(info.dtype).name)
            for key, info in signature.inputs.items()]
        self.notes.append(f"converted the SavedModel's '{self.signature}' signature")

    def convert(self, specs: list[TensorSpec], opset: int):
        tf2onnx = require("tf2onnx")
        from tf2onnx import tf_loader

        try:
            graph_def, inputs, outputs, _, imported, renames = tf_loader.from_saved_model(
                str(self.path), None, None, tag=self.tags, signatures=[self.signature], return_concrete_func=True,
                return_tensors_to_rename=True)
        except Exception as exc:
            raise InputFileError(f"{self.path} cannot be loaded as a SavedModel: {first_line(exc)}",
                                 hint="check that the directory is complete (variables/ included)") from None
        self.imported = imported
        # tf2onnx names inputs after the signature's TensorSpec names; the signature is called by its keys.
        _, kwargs = imported.signatures[self.signature].structured_input_signature
        self._inputs = {spec.name: key for key, spec in kwargs.items() if spec.name and spec.name != key}
        model_proto, _ = tf2onnx.convert.from_graph_def(
            graph_def, input_names=inputs, output_names=outputs, opset=opset, tensors_to_rename=renames,
            large_model=False)
        return model_proto

    def input_rename(self, model) -> dict[str, str]:
        return self._inputs

    def runner(self, specs: list[TensorSpec], output_names: list[str]) -> BaseRunner:
        from mpack.backends.tensorflow import SavedModelRunner

        imported = self.imported
        return SavedModelRunner(lambda: imported, self.signature, specs, output_names)


class _TFLiteSource(_Source):
    route = "from_tflite"
    restore_order = True

    def load(self) -> None:
        from mpack.backends.tensorflow import tflite_interpreter

        _check_file(self.path, "TFLite flatbuffer")
        with open(self.path, "rb") as f:
            head = f.read(8)
        if head[4:8] != TFLITE_IDENTIFIER:
            raise InputFileError(f"{self.path} is not a TFLite flatbuffer (no 'TFL3' identifier)",
                                 hint="convert the model with tf.lite.TFLiteConverter")
        try:
            interpreter = tflite_interpreter(self.path)
        except Exception as exc:
            raise InputFileError(f"{self.path} cannot be loaded as a TFLite model: {first_line(exc)}",
                                 hint="convert the model again with tf.lite.TFLiteConverter") from None
        signatures = interpreter.get_signature_list()
        key = SIGNATURE if SIGNATURE in signatures else (next(iter(signatures)) if len(signatures) == 1 else None)
        if key is not None:
            runner = interpreter.get_signature_runner(key)
            inputs, outputs = runner.get_input_details(), runner.get_output_details()
        else:  # no (or several) SignatureDefs: fall back to the main subgraph's tensor names
            inputs = {_clean_name(d["name"]): d for d in interpreter.get_input_details()}
            outputs = {_clean_name(d["name"]): d for d in interpreter.get_output_details()}
            self.notes.append("the TFLite file has no single SignatureDef: inputs and outputs are named after "
                              "its tensors")
        self.inputs = {name: d["index"] for name, d in inputs.items()}
        self.outputs = {name: d["index"] for name, d in outputs.items()}
        self._by_tensor = {d["name"]: name for name, d in {**inputs, **outputs}.items()}
        self.declared = [
            _Declared(name, tuple(None if s < 0 else int(s) for s in d.get("shape_signature", d["shape"])),
                      np.dtype(d["dtype"]).name)
            for name, d in inputs.items()]
        if key is not None:
            self.notes.append(f"TFLite inputs and outputs named and ordered after the '{key}' SignatureDef "
                              "(tf2onnx reorders them)")
        self.notes.append("the TFLite reference runs on the builtin kernels, without the XNNPACK delegate")

    def convert(self, specs: list[TensorSpec], opset: int):
        tf2onnx = require("tf2onnx")
        model_proto, _ = tf2onnx.convert.from_tflite(str(self.path), opset=opset, large_model=False)
        return model_proto

    def input_rename(self, model) -> dict[str, str]:
        return {i.name: self._by_tensor[i.name] for i in model.graph.input if i.name in self._by_tensor}

    def output_rename(self, model) -> dict[str, str]:
        return {o.name: self._by_tensor[o.name] for o in model.graph.output if o.name in self._by_tensor}

    def runner(self, specs: list[TensorSpec], output_names: list[str]) -> BaseRunner:
        from mpack.backends.tensorflow import TFLiteRunner

        return TFLiteRunner(self.path, specs, self.inputs, {n: self.outputs[n] for n in output_names})


# --- specs ---------------------------------------------------------------------------------------------------


def default_dim_name(input_name: str, axis: int) -> str:
    """The symbolic name of an unknown dim: "batch" on axis 0, else ``{input}_dim{axis}`` in identifier chars."""
    if axis == 0:
        return BATCH
    name = re.sub(r"\W", "_", f"{input_name}_dim{axis}", flags=re.ASCII)
    return name if not name[0].isdigit() else f"_{name}"


def resolve_specs(declared: list[_Declared], given: list[TensorSpec] | None,
                  dynamic_batch: bool) -> list[TensorSpec]:
    """Input specs from the model's declaration, checked against and refined by ``--input`` specs.

    A given spec may rename symbolic dims, fix an unknown dim, or make a fixed axis 0 symbolic (a dynamic batch,
    checked after export); it may not change a fixed dim elsewhere, the rank or the dtype.

    Raises:
        ConfigError: naming the expected inputs when the given specs do not match.
    """
    expected = ", ".join(str(_declared_spec(d)) for d in declared)
    hint = f"the model's inputs are: {expected}"
    if given is None:
        specs = [_declared_spec(d) for d in declared]
    else:
        by_name = {s.name: s for s in given}
        names = [d.name for d in declared]
        if sorted(by_name) != sorted(names) or len(given) != len(by_name):
            raise ConfigError("--input", [s.name for s in given], f"do not match the model's inputs {names}",
                              hint=hint)
        specs = []
        for d in declared:
            spec = by_name[d.name]
            if len(spec.shape) != len(d.shape):
                raise ConfigError(f"--input {spec.name}", str(spec), f"has rank {len(spec.shape)}, the model's "
                                  f"input has rank {len(d.shape)}", hint=hint)
            for axis, (mine, theirs) in enumerate(zip(spec.shape, d.shape)):
                if theirs is not None and mine != theirs and (axis > 0 or isinstance(mine, int)):
                    raise ConfigError(f"--input {spec.name}", str(spec), f"axis {axis} is fixed to {theirs} in "
                                      "the model", hint=hint)
            if spec.dtype != d.dtype:
                raise ConfigError(f"--input {spec.name}", str(spec), f"the model's input is {d.dtype}", hint=hint)
            specs.append(spec)
    if dynamic_batch:
        from mpack.specs import with_dynamic_batch

        specs = [with_dynamic_batch(s, BATCH) for s in specs]
    return specs


def _declared_spec(d: _Declared) -> TensorSpec:
    return TensorSpec(d.name, tuple(default_dim_name(d.name, a) if n is None else n for a, n in enumerate(d.shape)),
                      d.dtype)


def _forced_batch(declared: list[_Declared], specs: list[TensorSpec]) -> list[str]:
    """Inputs whose axis 0 the model fixes but the specs make symbolic."""
    by_name = {s.name: s for s in specs}
    return [d.name for d in declared
            if d.shape and d.shape[0] is not None and isinstance(by_name[d.name].shape[0], str)]


def _unforce(specs: list[TensorSpec], declared: list[_Declared], forced: list[str]) -> list[TensorSpec]:
    fixed = {d.name: d.shape[0] for d in declared}
    return [TensorSpec(s.name, (fixed[s.name], *s.shape[1:]), s.dtype, dict(s.examples)) if s.name in forced else s
            for s in specs]


def _fixed_batch_note(forced: list[str], why: str) -> str:
    return f"kept the model's fixed batch size on {', '.join(forced)}: {why}"


def _dynamic_problem(onnx_path: Path, runner: BaseRunner, specs: list[TensorSpec]) -> str | None:
    """Why the export (or the source model) does not run at the parity batch sizes, or None when both do."""
    from mpack.backends.onnxruntime import OnnxRuntimeRunner
    from mpack.inputs import parity_cases, random_feeds

    ort_runner = OnnxRuntimeRunner(onnx_path)
    for case in parity_cases(specs):
        feeds = random_feeds(specs, case.sizes)
        for who, r in (("the original model", runner), ("ONNX Runtime", ort_runner)):
            try:
                with _quiet():
                    outputs = r.infer(feeds)
            except Exception as exc:
                return f"{who} fails at {case.label} ({first_line(exc)})"
            batch = case.sizes.get(BATCH)
            bad = [n for n, v in outputs.items() if np.ndim(v) == 0 or np.shape(v)[0] != batch]
            if bad:
                return f"{who} does not return batch-sized outputs at {case.label} ({', '.join(bad)})"
    return None


# --- the ONNX graph: conversion, names, dims ------------------------------------------------------------------


def _convert(source: _Source, specs: list[TensorSpec], opset: int):
    """Run the source's tf2onnx conversion quietly; raise ExportError on a failure or an unconverted op."""
    with _quiet() as log:
        try:
            model = source.convert(specs, opset)
        except MpackError:
            raise
        except Exception as exc:
            raise ExportError(f"tf2onnx could not convert {source.path}: {type(exc).__name__}: {first_line(exc)}",
                              hint=f"try another --opset (now {opset}); if it persists, the model uses a "
                                   "construct tf2onnx cannot handle") from None
    unsupported = _unsupported_ops(model, log)
    if unsupported:
        raise _UnsupportedOps(f"tf2onnx {require('tf2onnx').__version__} cannot convert {source.path}: no ONNX "
                              f"conversion for op(s) {', '.join(unsupported)}",
                              hint=f"replace these ops in the model (some convert only at a higher --opset; now "
                                   f"{opset})")
    return model


def _quiet():
    return silenced("tf2onnx", "tensorflow", "absl", "keras", "h5py")


class _UnsupportedOps(ExportError):
    """tf2onnx left ops without an ONNX conversion (a free batch size would not change that)."""


def _unsupported_ops(model, records: list[logging.LogRecord]) -> list[str]:
    """Op types tf2onnx left unconverted: from its log ("Unsupported ops", "Failed to convert") and the graph."""
    import onnx

    found: dict[str, None] = {}
    for record in records:
        if record.msg.startswith("Unsupported ops") and record.args and isinstance(record.args[0], Counter):
            found.update(dict.fromkeys(sorted(record.args[0])))
        elif record.msg.startswith("Failed to convert node") and record.args:
            found.update({f"{record.args[0]} (conversion failed)": None})
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.domain not in _RUNNABLE_DOMAINS or (
                    node.domain != "com.microsoft" and not onnx.defs.has(node.op_type, node.domain)):
                found.setdefault(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
    return list(found)


def _graphs(graph) -> Iterator:
    """A graph and all its subgraphs (If/Loop/Scan bodies)."""
    import onnx

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _clean_name(name: str) -> str:
    """A tensor name without the TF output index ":0" (other indices become "_N")."""
    name = re.sub(r":0$", "", name)
    return re.sub(r":(\d+)$", r"_\1", name)


def _clean_io_names(model, input_rename: dict[str, str], output_rename: dict[str, str]) -> list[str]:
    """Rename graph inputs and outputs (given names first, else ":0"-less ones) everywhere; return the outputs."""
    graph = model.graph
    taken = {n for g in _graphs(graph) for node in g.node for n in (*node.input, *node.output)}
    taken |= {i.name for i in graph.initializer}
    taken |= {i.name for i in graph.input}
    mapping: dict[str, str] = {}
    for value, given in [(i, input_rename) for i in graph.input] + [(o, output_rename) for o in graph.output]:
        old = value.name
        new = given.get(old) or _clean_name(old)
        if new == old or old in mapping:
            continue
        if new in taken or new in mapping.values():
            if old in given:
                raise ExportError(f"cannot name the ONNX tensor {old!r} {new!r}: the name is taken",
                                  hint="rename the model's inputs or outputs")
            continue
        mapping[old] = new
    _rename_tensors(graph, mapping)
    return [o.name for o in graph.output]


def _rename_tensors(graph, mapping: dict[str, str]) -> None:
    if not mapping:
        return
    for g in _graphs(graph):  # subgraphs may use outer-scope names
        for node in g.node:
            node.input[:] = [mapping.get(n, n) for n in node.input]
            node.output[:] = [mapping.get(n, n) for n in node.output]
        for value in (*g.input, *g.output, *g.value_info):
            value.name = mapping.get(value.name, value.name)
        for init in g.initializer:
            init.name = mapping.get(init.name, init.name)


def _reorder(values, order: list[str]) -> list[str]:
    """Reorder a repeated ValueInfoProto field by ``order`` (names not in it go last); return the names."""
    rank = {name: i for i, name in enumerate(order)}
    ordered = sorted(values, key=lambda v: rank.get(v.name, len(rank)))
    copies = [type(v)() for v in ordered]
    for copy, value in zip(copies, ordered):
        copy.CopyFrom(value)
    del values[:]
    values.extend(copies)
    return [v.name for v in values]


def _in_onnx_order(model, specs: list[TensorSpec]) -> list[TensorSpec]:
    """The specs in the ONNX graph's input order; an input the graph lacks means the renaming went wrong."""
    by_name = {s.name: s for s in specs}
    names = [i.name for i in model.graph.input if i.name in by_name or not _is_initializer(model, i.name)]
    if sorted(names) != sorted(by_name):
        raise ExportError(f"the ONNX model's inputs {names} do not match the model's inputs {sorted(by_name)}",
                          hint="this is a bug in mpack's TensorFlow exporter: please report it")
    return [by_name[n] for n in names]


def _is_initializer(model, name: str) -> bool:
    return any(i.name == name for i in model.graph.initializer)


def _set_input_dims(model, specs: list[TensorSpec]) -> None:
    by_name = {s.name: s for s in specs}
    for value in model.graph.input:
        spec = by_name.get(value.name)
        if spec is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, spec.shape):
            if isinstance(size, int):
                dim.dim_value = size
            else:
                dim.dim_param = size


def _name_output_dims(model, free_batch: bool) -> None:
    """Re-derive output dims from the input dims by ONNX shape inference.

    tf2onnx names unknown output dims "unk__N", and keeps a fixed batch size on the outputs of a model whose
    batch was made free (``free_batch``). Output dims are cleared and inferred again; a dim inference cannot
    derive keeps its fixed size (except a freed batch axis) or stays unknown.
    """
    import onnx

    original = {}
    for value in (*model.graph.output, *model.graph.value_info):
        if any(v is value for v in model.graph.output):
            original[value.name] = [d.dim_value if d.HasField("dim_value") else None
                                    for d in value.type.tensor_type.shape.dim]
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") or value.name in original:
                dim.Clear()
    inferred_outputs = {}
    if model.ByteSize() <= _PROTO_LIMIT:
        with contextlib.suppress(Exception):  # a nicety: the export stands without it
            inferred_outputs = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        inferred = inferred_outputs.get(value.name)
        new_dims = list(inferred.type.tensor_type.shape.dim) if inferred is not None else []
        if len(new_dims) != len(dims):
            new_dims = [None] * len(dims)
        for axis, (dim, new, old) in enumerate(zip(dims, new_dims, original[value.name])):
            if new is not None and new.HasField("dim_value"):
                dim.dim_value = new.dim_value
            elif new is not None and new.HasField("dim_param") and not new.dim_param.startswith("unk__"):
                dim.dim_param = new.dim_param
            elif old is not None and not (free_batch and axis == 0):
                dim.dim_value = old


def _save(model, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() > _PROTO_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save_model(model, str(path))


# --- files and noise -----------------------------------------------------------------------------------------


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise InputFileError(f"{path} does not exist", hint="check the path")
    if not path.is_file():
        raise InputFileError(f"{path} is not a file, so not a {what}", hint="give the model file")


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as f:  # the HDF5 superblock sits at 0, 512, 1024, 2048...
        for offset in (0, 512, 1024, 2048):
            f.seek(offset)
            if f.read(8) == b"\x89HDF\r\n\x1a\n":
                return True
    return False


def _dtype_name(dtype) -> str:
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype)).name
