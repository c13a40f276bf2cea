"""ONNX files: full check, shape inference, saving with or without external data, and reading graph facts.

Protobuf cannot serialise a message over 2 GB, so large models keep their weights in an external data file
(``<model>.onnx.data``) and are checked and shape-inferred by path, never as one in-memory message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mpack.errors import ExportError, InputFileError
from mpack.specs import ONNX_ELEM_TO_DTYPE, TensorSpec

PROTOBUF_LIMIT = 2**31 - 1
# Leave headroom for the graph itself beside the weights.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


@dataclass
class OnnxFacts:
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opsets: dict[str, int]
    ir_version: int
    producer: str
    external_files: list[str] = field(default_factory=list)


def value_specs(values) -> list[TensorSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        specs.append(TensorSpec(v.name, shape, ONNX_ELEM_TO_DTYPE.get(t.elem_type, str(t.elem_type))))
    return specs


def initializer_bytes(model) -> int:
    """Bytes of weights held in the message (external tensors count by their recorded length)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == 1:  # EXTERNAL
            total += int({e.key: e.value for e in t.external_data}.get("length", 0))
        else:
            total += len(t.raw_data) or t.ByteSize()
    return total


def external_files(model) -> list[str]:
    return sorted({e.value for t in model.graph.initializer if t.data_location == 1
                   for e in t.external_data if e.key == "location"})


def rename_dims(model, specs: list[TensorSpec]) -> None:
    """Give the graph's symbolic dims the names of ``specs`` (matched by input name and axis), everywhere.

    Exporters name dims after their own symbols (``s52``, ``unk__3``); the specs carry the names users chose.
    """
    mapping: dict[str, str] = {}
    by_name = {s.name: s for s in specs}
    for value in model.graph.input:
        spec = by_name.get(value.name)
        if spec is None:
            continue
        for dim, want in zip(value.type.tensor_type.shape.dim, spec.shape):
            if dim.dim_param and isinstance(want, str):
                mapping.setdefault(dim.dim_param, want)
    if not mapping:
        return
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in mapping:
                dim.dim_param = mapping[dim.dim_param]


def finalize(src: Path, dest: Path, external_data: str = "auto", threshold: int = EXTERNAL_DATA_THRESHOLD,
             specs: list[TensorSpec] | None = None) -> OnnxFacts:
    """Load an exported model, run the full checker and shape inference, and save it to ``dest``.

    Args:
        src: The exporter's file (its external data, if any, beside it).
        dest: Where to write; its directory must be private to this run (the caller renames into place).
        external_data: "auto" (external when weights exceed ``threshold``), "always" or "never".
        threshold: Weight bytes above which "auto" uses external data. Defaults to 1.8 GiB.
        specs: Input specs whose symbolic dim names the graph should carry. Defaults to leaving names as they are.

    Raises:
        ExportError: when the model fails ``onnx.checker``.
    """
    import onnx

    model = onnx.load(str(src))
    if specs:
        rename_dims(model, specs)
    weights = initializer_bytes(model)
    external = external_data == "always" or (external_data == "auto" and weights > threshold)
    if external_data == "never" and weights > threshold:
        raise ExportError(f"the model's weights ({weights / 2**30:.2f} GiB) exceed what one ONNX file can hold",
                          hint="drop --external-data never")
    try:
        if external:
            location = dest.name + ".data"
            onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=location)
            del model
            onnx.checker.check_model(str(dest), full_check=True)
            onnx.shape_inference.infer_shapes_path(str(dest), str(dest))
        else:
            onnx.checker.check_model(model, full_check=True)
            model = onnx.shape_inference.infer_shapes(model)
            onnx.save_model(model, str(dest))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported model fails onnx.checker: {str(exc).splitlines()[0][:300]}",
                          hint="try another --opset or --exporter") from None
    return read_facts(dest)


def load_graph(path: Path):
    """The model's graph without its external weights (cheap, any size)."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise InputFileError(f"{path} does not exist", hint="check the path")
    try:
        # format: onnx.load picks a parser by file suffix (".json" → JSON); model files are protobuf whatever their name.
        model = onnx.load(str(path), format="protobuf", load_external_data=False)
    except (DecodeError, ValueError, OSError) as exc:
        raise InputFileError(f"{path} is not an ONNX model ({type(exc).__name__})",
                             hint="give an .onnx file written by an exporter or by mpack convert") from None
    # Protobuf parses many short byte strings without complaint; a model has an IR version and a graph.
    if model.ir_version < 1 or not model.HasField("graph"):
        raise InputFileError(f"{path} is not an ONNX model (no IR version or graph)",
                             hint="give an .onnx file written by an exporter or by mpack convert")
    return model


def read_facts(path: Path, model=None) -> OnnxFacts:
    model = model if model is not None else load_graph(path)
    init_names = {t.name for t in model.graph.initializer}
    return OnnxFacts(
        path=path,
        inputs=value_specs([i for i in model.graph.input if i.name not in init_names]),
        outputs=value_specs(model.graph.output),
        opsets={(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        ir_version=model.ir_version,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        external_files=external_files(model))
