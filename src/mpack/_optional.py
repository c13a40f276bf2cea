"""Optional dependencies, in one place. Nothing here installs anything.

Framework imports happen only inside ``backends/*`` and ``convert/*``, at call time, through :func:`require`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from types import ModuleType

from mpack.errors import MissingDependencyError

# module name -> (what it is for, the extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("Running ONNX models", "cpu"),  # or mpack[gpu]: onnxruntime-gpu provides the same module
    "torch": ("PyTorch models", "torch"),
    "onnxscript": ("the dynamo ONNX exporter", "torch"),
    "tensorflow": ("TensorFlow models", "tf"),
    "tf2onnx": ("TensorFlow models", "tf"),
    "keras": ("Keras models", "tf"),
    # onnxruntime.transformers (mpack optimize) imports sympy; onnxruntime itself does not depend on it.
    "sympy": ("ONNX Runtime's transformer fusions", "cpu"),
    "docker": ("Building serving images", "image"),
    "jinja2": ("Rendering the image templates", "image"),
    "pyarrow": ("Parquet files", "batch"),
    "redis": ("Queue workers (Redis Streams)", "queue"),
    "ray": ("Batch jobs on Ray", "batch"),
    "uvicorn": ("mpack serve", "serve"),
    "grpc": ("mpack serve", "serve"),
}

# The `onnxruntime` module ships in two distributions that overwrite each other; either one satisfies us.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def is_available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    return importlib.util.find_spec(module) is not None


def missing(module: str, exc: BaseException | None = None) -> MissingDependencyError:
    """The error for an optional ``module`` that is not installed, naming the extra that installs it."""
    purpose, extra = EXTRAS.get(module, (module, module))
    return MissingDependencyError(
        f"{purpose} need the Python package '{module}', which is not installed" + (f" ({exc})" if exc else ""),
        hint=f"install it with: pip install 'mpack[{extra}]'",
    )


def require(module: str) -> ModuleType:
    """Import ``module`` or raise a :class:`MissingDependencyError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing(module, exc) from None


def distribution_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def onnxruntime_distribution() -> tuple[str, str] | None:
    """Which distribution provides ``onnxruntime`` here, as (name, version)."""
    for name in ORT_DISTRIBUTIONS:
        version = distribution_version(name)
        if version:
            return name, version
    return None
