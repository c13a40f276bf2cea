"""One loaded model version: an ONNX Runtime session, its V2 tensor specs, and the request checks against them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from mpack.serving.errors import InvalidInputError, ModelRunError, ServeConfigError

# V2 datatype name → numpy dtype. BYTES (strings) and BF16 are not served. N.B. model_config below and
# grpc_api.CONTENTS_FIELD key on the same names.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
# ONNX Runtime's type strings → V2 datatype names.
ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output in V2 terms; -1 marks a dynamic dim."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.datatype]

    def to_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class Runner(Protocol):
    """What the server needs of a model: specs and a thread-safe ``run``. ONNX Runtime's is :class:`OrtRunner`;
    tests wrap it (a runner that sleeps or raises) through ``Engine(runner_factory=...)``."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    providers: tuple[str, ...]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


RunnerFactory = Callable[[Path, tuple[str, ...], int], Runner]


def resolve_providers(names: tuple[str, ...], available: list[str]) -> list[str]:
    """mpack provider names → ONNX Runtime's, CPU last as the fallback for ops a GPU provider lacks."""
    if names == ("auto",):
        names = ("cuda", "cpu") if PROVIDERS["cuda"] in available else ("cpu",)
    resolved = []
    for name in names:
        if name == "auto":
            continue
        ort_name = PROVIDERS[name]
        if ort_name not in available:
            have = ", ".join(k for k, v in PROVIDERS.items() if v in available)
            raise ServeConfigError("--providers", ",".join(names), f"{name} is not available in this ONNX Runtime",
                                   hint=f"available: {have}; CUDA needs onnxruntime-gpu and a GPU")
        resolved.append(ort_name)
    if PROVIDERS["cpu"] not in resolved:
        resolved.append(PROVIDERS["cpu"])
    return resolved


class OrtRunner:
    """An ONNX Runtime session. ``run`` is called from the batcher's worker threads (``session.run`` releases the
    GIL and is thread-safe)."""

    def __init__(self, path: Path, providers: tuple[str, ...] = ("auto",), threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # One inference at a time per instance thread: inter-op parallelism only adds threads fighting for cores.
        options.inter_op_num_threads = 1
        # Fatal only: a run that fails is answered to its client and counted; ORT's own error lines would repeat it
        # on stderr for every bad request.
        options.log_severity_level = 4
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=resolve_providers(providers, ort.get_available_providers()))
        except ServeConfigError:
            raise
        except Exception as exc:
            raise ServeConfigError("model", str(path), "ONNX Runtime cannot load it: " + _first_line(exc)) from None
        self.providers = tuple(self.session.get_providers())
        self.inputs = tuple(_spec(node, path) for node in self.session.get_inputs())
        self.outputs = tuple(_spec(node, path) for node in self.session.get_outputs())
        self._output_names = [o.name for o in self.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self.session.run(self._output_names, feeds)))


def _spec(node, path: Path) -> TensorSpec:
    if node.type not in ORT_TYPES:
        raise ServeConfigError("model", str(path), f"tensor {node.name} has type {node.type}, which is not served",
                               hint=f"served types: {', '.join(ORT_TYPES)}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or []))
    return TensorSpec(node.name, ORT_TYPES[node.type], shape)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class ModelVersion:
    """A loaded version of a served model, as the engine routes to it.

    Args:
        model: The served model name.
        version: Its version string.
        runner: The loaded runner.
        max_batch_size: From the model's batching spec; forced to 1 when a tensor has a fixed first dim (such a
            model cannot be batched by the server and its config reports max_batch_size 0, as Triton does).
    """

    def __init__(self, model: str, version: str, runner: Runner, max_batch_size: int) -> None:
        self.model = model
        self.version = version
        self.runner = runner
        self.inputs = runner.inputs
        self.outputs = runner.outputs
        self.batchable = all(len(t.shape) >= 1 and t.shape[0] == -1 for t in (*self.inputs, *self.outputs))
        self.max_batch_size = max_batch_size if self.batchable else 1
        self._input_index = {t.name: t for t in self.inputs}
        self.output_names = tuple(t.name for t in self.outputs)

    def check(self, feeds: dict[str, np.ndarray]) -> tuple[int, tuple]:
        """Check names, dtypes and shapes against the model.

        Returns:
            (batch size, shape key): requests with equal keys can share one ``session.run``.

        Raises:
            InvalidInputError: naming the input and what is wrong.
        """
        if feeds.keys() != self._input_index.keys():
            missing = [n for n in self._input_index if n not in feeds]
            extra = [n for n in feeds if n not in self._input_index]
            problem = (f"missing input(s) {', '.join(missing)}" if missing else
                       f"unexpected input(s) {', '.join(extra)}")
            raise InvalidInputError(f"{problem}; model {self.model} takes {', '.join(self._input_index)}")
        batch = None
        key = []
        for name, spec in self._input_index.items():
            array = feeds[name]
            if array.dtype != spec.dtype:
                raise InvalidInputError(f"input {name} has datatype {_v2_name(array.dtype)}; model {self.model} "
                                        f"expects {spec.datatype}")
            if array.ndim != len(spec.shape) or any(w != -1 and g != w for g, w in zip(array.shape, spec.shape)):
                raise InvalidInputError(f"input {name} has shape {list(array.shape)}; model {self.model} expects "
                                        f"{list(spec.shape)} (-1: any size)")
            if self.batchable:
                if batch is None:
                    batch = array.shape[0]
                elif array.shape[0] != batch:
                    raise InvalidInputError(f"input {name} has batch size {array.shape[0]}, another input {batch}")
            key.append(array.shape[1:] if self.batchable else array.shape)
        batch = batch if batch is not None else 1
        if self.batchable and batch > self.max_batch_size:
            raise InvalidInputError(f"batch size {batch} exceeds max_batch_size {self.max_batch_size} of model "
                                    f"{self.model}", hint="split the request")
        if self.batchable and batch < 1:
            raise InvalidInputError("batch size 0: the request carries no sample")
        return batch, tuple(key)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one (possibly batched) feed; any runtime failure becomes a ModelRunError."""
        try:
            return self.runner.run(feeds)
        except Exception as exc:  # ONNX Runtime raises plain RuntimeError subclasses (Fail, InvalidArgument, ...)
            raise ModelRunError(f"model {self.model} version {self.version} failed on this input: "
                                f"{_first_line(exc)}") from None

    def warmup_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """Zeros of every input, dynamic dims 1 (the batch dim ``batch``)."""
        feeds = {}
        for spec in self.inputs:
            shape = [d if d != -1 else 1 for d in spec.shape]
            if self.batchable:
                shape[0] = batch
            feeds[spec.name] = np.zeros(shape, spec.dtype)
        return feeds

    def metadata(self, versions: list[str]) -> dict:
        return {"name": self.model, "versions": versions, "platform": "onnxruntime_onnx",
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    def model_config(self, preferred: tuple[int, ...], max_queue_delay_ms: float) -> dict:
        """Triton's model configuration (the fields perf_analyzer reads). With max_batch_size > 0 the dims leave
        out the batch dim, as Triton's do."""
        mbs = self.max_batch_size if self.batchable else 0

        def dims(spec: TensorSpec) -> list[int]:
            return list(spec.shape[1:] if mbs else spec.shape)

        config = {
            "name": self.model, "platform": "onnxruntime_onnx", "backend": "onnxruntime", "max_batch_size": mbs,
            "input": [{"name": t.name, "data_type": "TYPE_" + t.datatype, "dims": dims(t)} for t in self.inputs],
            "output": [{"name": t.name, "data_type": "TYPE_" + t.datatype, "dims": dims(t)} for t in self.outputs],
        }
        if mbs > 1:
            config["dynamic_batching"] = {"preferred_batch_size": list(preferred),
                                          "max_queue_delay_microseconds": int(max_queue_delay_ms * 1000)}
        return config


def _v2_name(dtype: np.dtype) -> str:
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    return str(dtype)


def element_count(shape) -> int:
    return math.prod(shape)
