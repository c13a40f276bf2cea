"""ONNX Runtime runner with a provider list, e.g. ``("cpu",)`` or ``("cuda", "cpu")``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mpack.backends.base import BaseRunner
from mpack.errors import ConfigError, InputFileError, first_line
from mpack.specs import ORT_TYPE_TO_DTYPE, TensorSpec

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


# ONNX Runtime's session option naming the folder that a model given as bytes keeps its external data in.
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def session_from_onnx(path: str | Path | bytes, providers: tuple[str, ...] = ("cpu",), threads: int | None = None,
                      external_folder: Path | None = None, where: str | None = None):
    """Create an ``onnxruntime.InferenceSession``, checking that the asked providers really run.

    ONNX Runtime silently falls back to CPU when a provider cannot load (e.g. CUDA without a GPU), so the session's
    own provider list is checked after creation.

    Args:
        path: The .onnx file, or a serialised model.
        providers: Short provider names in priority order. Defaults to ("cpu",).
        threads: intra-op threads. Defaults to ONNX Runtime's choice.
        external_folder: Where a serialised model's external data lies. Defaults to none.
        where: How errors name the model. Defaults to the path.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = []
    for short in providers:
        full = PROVIDERS.get(short.lower())
        if full is None or full not in available:
            names = ", ".join(k for k, v in PROVIDERS.items() if v in available)
            raise ConfigError("provider", short, "is not available in this ONNX Runtime",
                              hint=f"available here: {names}")
        wanted.append(full)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if external_folder is not None:
        options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(Path(external_folder).resolve()))
    model = path if isinstance(path, bytes) else str(path)
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=wanted)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types; all mean the file cannot be run
        raise InputFileError(f"ONNX Runtime cannot load {where or path}: {first_line(exc)}",
                             hint="check the file with `mpack inspect`") from None
    if session.get_providers()[0] != wanted[0]:
        raise ConfigError("provider", providers[0], "could not be started here (ONNX Runtime fell back to "
                          f"{session.get_providers()[0]})", hint="check the GPU driver and CUDA libraries")
    return session


class OnnxRuntimeRunner(BaseRunner):
    """Runs an ONNX file under ONNX Runtime.

    Args:
        path: The .onnx file.
        providers: Short provider names in priority order. Defaults to ("cpu",).
        threads: intra-op threads. Defaults to ONNX Runtime's choice.
    """

    def __init__(self, path: str | Path, providers: tuple[str, ...] = ("cpu",), threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.providers = tuple(providers)
        self.threads = threads
        self.name = f"onnxruntime[{','.join(self.providers)}]"
        self.session = None

    def _activate(self) -> None:
        self.session = session_from_onnx(self.path, self.providers, self.threads)

    def _deactivate(self) -> None:
        self.session = None

    def input_specs(self) -> list[TensorSpec]:
        self.activate()
        return [_spec(i) for i in self.session.get_inputs()]

    def output_names(self) -> list[str]:
        self.activate()
        return [o.name for o in self.session.get_outputs()]

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, feeds)
        return dict(zip(self.output_names(), outputs))


def _spec(node) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in node.shape)
    return TensorSpec(node.name, shape, ORT_TYPE_TO_DTYPE.get(node.type, node.type))
