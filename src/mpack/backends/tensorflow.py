"""TensorFlow runners: a Keras model, a SavedModel signature and a TFLite interpreter, on named inputs.

Every runner returns its outputs keyed by the names the ONNX export gave them (see ``convert/tensorflow.py``), so
parity maps outputs by name even where a converter reorders them (tf2onnx does for TFLite).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mpack._optional import require
from mpack.backends.base import BaseRunner
from mpack.specs import TensorSpec


def import_tensorflow():
    """Import TensorFlow quietly (no C++ INFO/WARNING lines) or raise a MissingDependencyError naming the extra."""
    # N.B. only takes effect if TF is not imported yet; convert/tensorflow.py imports TF through here too.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = require("tensorflow")
    tf.get_logger().setLevel("ERROR")
    return tf


def import_keras():
    """Import Keras (3) after TensorFlow, or raise a MissingDependencyError naming the ``tf`` extra."""
    import_tensorflow()
    return require("keras")


def keras_output_names(model, count: int) -> list[str]:
    """Names for a Keras model's outputs: its ``output_names`` when they are usable, else ``output_{i}``.

    Keras 3 Sequential models have no ``output_names``; ``output_{i}`` is also what ``model.export`` calls the
    outputs of the SavedModel signature, so a Sequential gets the same names from every format.
    """
    names = getattr(model, "output_names", None)
    if isinstance(names, (list, tuple)) and len(names) == count and len(set(names)) == count \
            and all(isinstance(n, str) and n for n in names):
        return list(names)
    return [f"output_{i}" for i in range(count)]


def call_keras(model, args: list, output_names: list[str] | None = None) -> dict:
    """Call a Keras model in inference mode on positional inputs; return its outputs as an ordered dict.

    A model returning a dict keeps its keys; any other structure is flattened and named ``output_names`` (by
    default :func:`keras_output_names`).
    """
    tf = import_tensorflow()
    structure = getattr(model, "_inputs_struct", None)  # Keras 3 Functional: list, dict or a single input
    if structure is not None and not isinstance(structure, (list, tuple)) and len(args) > 1:
        packed = tf.nest.pack_sequence_as(structure, args)
    else:
        packed = args[0] if len(args) == 1 else list(args)
    result = model(packed, training=False)
    if isinstance(result, dict):
        return {str(k): v for k, v in result.items()}
    flat = tf.nest.flatten(result)
    names = output_names or keras_output_names(model, len(flat))
    return dict(zip(names, flat))


class KerasRunner(BaseRunner):
    """Runs a Keras model eagerly with its inputs in the model's own order.

    Args:
        load: Returns the Keras model; called once, on activation.
        specs: The inputs, in the model's input order.
        output_names: Names of the flattened outputs, as in the ONNX model.
    """

    name = "keras"

    def __init__(self, load: Callable[[], object], specs: list[TensorSpec], output_names: list[str]):
        super().__init__()
        self.load = load
        self.specs = specs
        self.output_names = output_names
        self.model = None

    def _activate(self) -> None:
        self.model = self.load()

    def _deactivate(self) -> None:
        self.model = None

    def input_specs(self) -> list[TensorSpec]:
        return self.specs

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tf = import_tensorflow()
        args = [tf.convert_to_tensor(feeds[s.name]) for s in self.specs]
        outputs = call_keras(self.model, args, self.output_names)
        return {name: np.asarray(value) for name, value in outputs.items()}


class SavedModelRunner(BaseRunner):
    """Runs one signature of a SavedModel with keyword inputs.

    Args:
        load: Returns the loaded SavedModel (``tf.saved_model.load``); called once, on activation.
        signature: The signature key, e.g. "serving_default".
        specs: The signature's inputs.
        output_names: The signature's output keys, as in the ONNX model.
    """

    name = "tensorflow-savedmodel"

    def __init__(self, load: Callable[[], object], signature: str, specs: list[TensorSpec],
                 output_names: list[str]):
        super().__init__()
        self.load = load
        self.signature = signature
        self.specs = specs
        self.output_names = output_names
        self.function = None

    def _activate(self) -> None:
        self.function = self.load().signatures[self.signature]

    def _deactivate(self) -> None:
        self.function = None

    def input_specs(self) -> list[TensorSpec]:
        return self.specs

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tf = import_tensorflow()
        outputs = self.function(**{s.name: tf.convert_to_tensor(feeds[s.name]) for s in self.specs})
        return {name: np.asarray(outputs[name]) for name in self.output_names}


def tflite_interpreter(path: str | Path):
    """A TFLite interpreter on the builtin kernels only.

    The default XNNPACK delegate is left out: it logs to the C++ stderr on creation and re-delegates on every
    resize, and the builtin kernels are the reference semantics anyway.
    """
    tf = import_tensorflow()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "tf.lite.Interpreter is deprecated" (a UserWarning on every creation)
        return tf.lite.Interpreter(
            model_path=str(path),
            experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)


class TFLiteRunner(BaseRunner):
    """Runs a TFLite flatbuffer, resizing its inputs to the feeds' shapes (TFLite allocates for fixed shapes).

    Args:
        path: The .tflite file.
        specs: The inputs, named as in the ONNX model.
        input_tensors: Input name to interpreter tensor index.
        output_tensors: Output name (as in the ONNX model) to interpreter tensor index.
    """

    name = "tflite"

    def __init__(self, path: str | Path, specs: list[TensorSpec], input_tensors: dict[str, int],
                 output_tensors: dict[str, int]):
        super().__init__()
        self.path = Path(path)
        self.specs = specs
        self.input_tensors = input_tensors
        self.output_tensors = output_tensors
        self.interpreter = None

    def _activate(self) -> None:
        self.interpreter = tflite_interpreter(self.path)
        self.interpreter.allocate_tensors()

    def _deactivate(self) -> None:
        self.interpreter = None

    def input_specs(self) -> list[TensorSpec]:
        return self.specs

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        interpreter = self.interpreter
        current = {d["index"]: tuple(d["shape"]) for d in interpreter.get_input_details()}
        resized = False
        for name, index in self.input_tensors.items():
            shape = tuple(feeds[name].shape)
            if current.get(index) != shape:
                interpreter.resize_tensor_input(index, list(shape), strict=False)
                resized = True
        if resized:
            interpreter.allocate_tensors()
        for name, index in self.input_tensors.items():
            interpreter.set_tensor(index, np.ascontiguousarray(feeds[name]))
        interpreter.invoke()
        return {name: np.array(interpreter.get_tensor(index)) for name, index in self.output_tensors.items()}
