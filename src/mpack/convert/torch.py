"""PyTorch sources → ONNX with ``torch.onnx``: TorchScript files, ``torch.export`` programs (.pt2), pickled modules
and ``package.module:factory`` entry points.

The dynamo exporter (``torch.onnx.export(dynamo=True)``) is tried first; the TorchScript-based exporter is the
fallback when dynamo fails, or the choice with ``--exporter torchscript``. A ScriptModule cannot go through dynamo
("Exporting a ScriptModule is not supported"), so TorchScript files use the TorchScript exporter.
"""

from __future__ import annotations

import importlib
import pickle
import re
import sys
from pathlib import Path

from mpack._optional import require
from mpack.backends.torch import TorchRunner, flatten_outputs
from mpack.convert.base import ExportedModel, ExportRequest
from mpack._quiet import silenced
from mpack.errors import ConfigError, ExportError, InputFileError, MpackError, first_line
from mpack.inputs import export_sizes, random_feeds
from mpack.specs import TensorSpec, with_dynamic_batch

_ATEN_OP = re.compile(r"aten(?:::|\.)([A-Za-z0-9_]+)")


def quiet():
    return silenced("torch.onnx", "torch._export", "torch.export", "onnxscript")


def load_source(req: ExportRequest):
    """Load the PyTorch object behind ``req.source``: an ``nn.Module``, ScriptModule or ExportedProgram."""
    torch = require("torch")
    path = Path(req.source)
    _cwd_on_path()
    try:
        if req.kind == "torchscript":
            return torch.jit.load(str(path), map_location="cpu")
        if req.kind == "export-program":
            with quiet():
                return torch.export.load(str(path))
        if req.kind == "pickled-module":
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        else:
            obj = _call_entry_point(req.source)
    except MpackError:
        raise
    except (ModuleNotFoundError, AttributeError) as exc:  # unpickling needs the model's class importable
        raise InputFileError(f"{req.source} cannot be unpickled: {first_line(exc)}",
                             hint="run mpack where the model's class is importable, or use an entry point "
                                  "(package.module:factory)") from None
    except (RuntimeError, ValueError, EOFError, OSError, KeyError, pickle.UnpicklingError) as exc:
        raise InputFileError(f"{req.source} is not a readable {req.kind.replace('-', ' ')} file: "
                             f"{first_line(exc)}", hint="check the file; mpack reads torch.save, "
                             "torch.jit.save and torch.export.save outputs") from None
    if isinstance(obj, dict) and req.kind == "pickled-module":
        raise InputFileError(f"{req.source} holds a state_dict, not a module",
                             hint="point mpack at a factory instead: mpack convert pkg.mod:make_model "
                                  f"--weights {req.source}")
    if not isinstance(obj, torch.nn.Module):
        raise InputFileError(f"{req.source} gives a {type(obj).__name__}, not a torch.nn.Module",
                             hint="save the module itself with torch.save(model, path), or use an entry point")
    if req.weights is not None:
        _load_weights(obj, req.weights)
    return obj.eval()


def _cwd_on_path() -> None:
    """Like uvicorn and gunicorn: entry points and pickled classes resolve against the current directory first."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))


def _call_entry_point(source: str):
    module_name, _, attr = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an entry point's own import can raise anything; it is the user's code
        raise InputFileError(f"cannot import '{module_name}' for entry point {source}: {first_line(exc)}",
                               hint="run mpack from the directory that holds the package, or pip install it")
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise InputFileError(f"'{module_name}' has no attribute '{attr}'",
                                   hint="write the entry point as package.module:function")
    if not callable(factory):
        raise InputFileError(f"entry point {source} is not callable", hint="point it at a function or class")
    try:
        return factory()
    except Exception as exc:  # the user's factory failed
        raise InputFileError(f"entry point {source} raised {type(exc).__name__}: {first_line(exc)}")


def _load_weights(module, weights: Path) -> None:
    torch = require("torch")
    if not weights.is_file():
        raise InputFileError(f"weights file {weights} does not exist")
    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"it holds a {type(state).__name__}, not a state_dict")
        module.load_state_dict(state)
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise ConfigError("--weights", str(weights), f"does not fit the module: {first_line(exc)}",
                          hint="save it with torch.save(model.state_dict(), path) from the same architecture") from None


def source_runner(source: str, kind: str, specs: list[TensorSpec], output_names: list[str],
                  weights: Path | None = None) -> TorchRunner:
    """A runner for a PyTorch source as a manifest records it, without exporting again (``mpack validate``).

    Args:
        source: The model file or ``package.module:factory``.
        kind: Its format: "torchscript", "export-program", "pickled-module" or "entry-point".
        specs: The inputs, in forward-argument order (the ONNX model's inputs).
        output_names: The ONNX model's output names, given to the flattened outputs in order.
        weights: A state_dict for an entry point's module. Defaults to None.

    Returns:
        A :class:`TorchRunner` that loads the model on activation (errors then are ``MpackError``s).
    """
    # N.B. load_source reads only source, kind and weights; the export fields are placeholders.
    req = ExportRequest(source, kind, list(specs), opset=0, dynamic_batch=False, work_dir=Path("."),
                        weights=weights)

    def load():
        obj = load_source(req)
        return obj.module() if kind == "export-program" else obj

    return TorchRunner(load, list(specs), list(output_names))


def program_input_specs(program) -> list[TensorSpec]:
    """Input specs of a ``torch.export`` program from its placeholders' fake tensors.

    Each distinct symbolic size becomes a named dim: the one on axis 0 is "batch", others ``<input>_dim<axis>``
    where they first appear.
    """
    names = list(program.graph_signature.user_inputs)
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    symbols: dict[str, str] = {}
    specs = []
    for name in names:
        val = nodes[name].meta.get("val")
        if val is None or not hasattr(val, "shape"):
            raise ConfigError("input", name, "is not a tensor input; mpack exports tensor inputs only")
        shape = []
        for axis, size in enumerate(val.shape):
            if isinstance(size, int):
                shape.append(size)
                continue
            key = str(size)
            if key not in symbols:
                symbols[key] = ("batch" if axis == 0 and "batch" not in symbols.values()
                                else f"{name}_dim{axis}")
            shape.append(symbols[key])
        specs.append(TensorSpec(name, tuple(shape), str(val.dtype).removeprefix("torch.")))
    return specs


def export_torch(req: ExportRequest) -> ExportedModel:
    """Export a PyTorch source to ``req.work_dir / "model.onnx"``."""
    torch = require("torch")
    obj = load_source(req)
    is_program = req.kind == "export-program"
    is_script = isinstance(obj, torch.jit.ScriptModule)

    specs = req.specs
    if specs is None:
        if not is_program:
            raise ConfigError("--input", None, "a PyTorch module carries no input signature",
                              hint="name its inputs, e.g. --input pixels:batch,3,32,32:float32")
        specs = program_input_specs(obj)
    elif is_program:
        _check_against_program(specs, program_input_specs(obj))
    if req.dynamic_batch:
        specs = [with_dynamic_batch(s) for s in specs]

    callable_module = obj.module() if is_program else obj
    example = random_feeds(specs, export_sizes(specs), seed=0)
    args = tuple(torch.from_numpy(example[s.name]) for s in specs)
    try:
        with torch.no_grad():
            outputs = flatten_outputs(callable_module(*args))
    except Exception as exc:  # the model rejects the inputs described by --input
        raise ConfigError("--input", " ".join(str(s) for s in specs),
                          f"does not fit the model: {type(exc).__name__}: {first_line(exc)}",
                          hint="give one --input per forward() argument, in order, with the shapes it expects") from None
    if not all(isinstance(o, torch.Tensor) for o in outputs):
        raise ExportError("the model returns non-tensor outputs", hint="return tensors (or tuples/dicts of them)")
    output_names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]

    path = req.work_dir / "model.onnx"
    notes: list[str] = []
    route = req.exporter
    if route == "auto":
        route = "torchscript" if is_script else "dynamo"
        if is_script:
            notes.append("TorchScript file: exported with the TorchScript-based exporter (dynamo cannot export "
                         "a ScriptModule)")
    if route == "dynamo" and is_script:
        raise ConfigError("--exporter", "dynamo", "cannot export a TorchScript (ScriptModule) file",
                          hint="use --exporter torchscript, or save the model with torch.export.save")
    export_target = obj if is_program else callable_module
    try:
        _export(export_target if route == "dynamo" else callable_module, args, path, specs, output_names,
                req.opset, route)
        used = route
    except _ExportFailed as first:
        if req.exporter != "auto" or route != "dynamo":
            raise first.to_error() from None
        notes.append(f"the dynamo exporter failed ({first.summary}); fell back to the TorchScript-based exporter")
        try:
            _export(callable_module, args, path, specs, output_names, req.opset, "torchscript")
        except _ExportFailed as second:
            raise second.to_error(also=first) from None
        used = "torchscript"

    module_for_runner = callable_module
    return ExportedModel(
        onnx_path=path, framework="pytorch", framework_version=torch.__version__,
        exporter=f"torch.onnx ({used})", input_specs=specs,
        source_runner=TorchRunner(lambda: module_for_runner, specs, output_names), notes=notes)


def _check_against_program(given: list[TensorSpec], own: list[TensorSpec]) -> None:
    if [s.name for s in given] != [s.name for s in own] or any(
            len(g.shape) != len(o.shape) for g, o in zip(given, own)):
        raise ConfigError("--input", " ".join(str(s) for s in given), "does not match the program's inputs",
                          hint="the program expects " + " ".join(str(s) for s in own))


class _ExportFailed(Exception):
    def __init__(self, route: str, exc: BaseException):
        super().__init__(route)
        self.route = route
        text = _full_text(exc)
        self.ops = sorted(set(_ATEN_OP.findall(text)) - {"Tensor"})
        self.summary = (f"unsupported operator {', '.join('aten::' + o for o in self.ops)}" if self.ops
                        else f"{type(exc).__name__}: {first_line(exc)}")

    def to_error(self, also: _ExportFailed | None = None) -> ExportError:
        ops = sorted(set(self.ops) | set(also.ops if also else []))
        if ops:
            return ExportError(f"cannot convert operator {', '.join('aten::' + o for o in ops)} to ONNX "
                               f"({self.route} exporter)",
                               hint="replace it in the model, try another --opset, or register a custom symbolic")
        return ExportError(f"the {self.route} exporter failed: {self.summary}",
                           hint="re-run with --debug for the exporter's own trace")


def _export(model, args, path: Path, specs: list[TensorSpec], output_names: list[str], opset: int,
            route: str) -> None:
    torch = require("torch")
    dynamic_axes = {s.name: {axis: dim for axis, dim in enumerate(s.shape) if isinstance(dim, str)}
                    for s in specs}
    dynamic_axes = {k: v for k, v in dynamic_axes.items() if v} or None
    kwargs = dict(input_names=[s.name for s in specs], output_names=output_names, opset_version=opset)
    try:
        with quiet():
            if route == "dynamo":
                require("onnxscript")
                # N.B. external_data=True keeps >2 GB models exportable; convert.finalize re-saves small models
                # as one file.
                torch.onnx.export(model, args, str(path), dynamo=True, dynamic_axes=dynamic_axes,
                                  external_data=True, **kwargs)
            else:
                torch.onnx.export(model, args, str(path), dynamo=False, dynamic_axes=dynamic_axes, **kwargs)
    except Exception as exc:  # exporters raise many unrelated types; all mean "this route failed"
        if isinstance(exc, MpackError):  # e.g. onnxscript missing
            raise
        raise _ExportFailed(route, exc) from exc


def _full_text(exc: BaseException) -> str:
    parts = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)
