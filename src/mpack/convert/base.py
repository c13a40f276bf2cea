"""What every exporter hands back to the conversion pipeline (``convert.run``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mpack.backends.base import Runner
from mpack.specs import TensorSpec


@dataclass(frozen=True)
class ExportRequest:
    """What the pipeline asks an exporter for.

    Args:
        source: The model file, directory or entry point as the user gave it.
        kind: The detected source format (see ``convert.detect``).
        specs: Inputs from ``--input``, or None to take them from the model's own signature.
        opset: ONNX opset to export at.
        dynamic_batch: Make axis 0 of every input symbolic ("batch") when it is fixed.
        work_dir: A private temporary directory to write into; the exporter writes ``work_dir/model.onnx``.
        exporter: "auto", "dynamo" or "torchscript" (PyTorch only).
        weights: A state_dict to load into an entry point's module (PyTorch only).
    """

    source: str
    kind: str
    specs: list[TensorSpec] | None
    opset: int
    dynamic_batch: bool
    work_dir: Path
    exporter: str = "auto"
    weights: Path | None = None


@dataclass
class ExportedModel:
    """An exported ONNX file plus what the pipeline needs to check it against its source.

    ``source_runner`` returns outputs keyed by the ONNX model's output names, so the comparison maps by name even
    where a converter reorders outputs (TFLite does).
    """

    onnx_path: Path
    framework: str
    framework_version: str
    exporter: str
    input_specs: list[TensorSpec]
    source_runner: Runner
    notes: list[str] = field(default_factory=list)
