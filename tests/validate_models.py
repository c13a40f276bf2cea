"""Real models shared by test_validate.py and test_divergence.py, built once per session.

``cnn``: the example CNN converted with ``mpack convert`` (fp32, with its manifest), an INT8 version made with
``onnxruntime.quantization.quantize_dynamic`` (not ``mpack quantize``, so these tests do not depend on it), and a
faulty copy whose middle Conv has its weights scaled by 1.5 (an induced fault with a known first diverging node).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import mpack


def scale_initializer(src: Path, dest: Path, op_type: str = "Conv", which: int = 1, factor: float = 1.5,
                      **save_kwargs) -> dict:
    """Copy ``src`` to ``dest`` with the weight (input 1) of the ``which``-th ``op_type`` node scaled.

    Returns:
        The edited node: {"node", "op_type", "tensor"} as the reference graph names them.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    node = [n for n in model.graph.node if n.op_type == op_type][which]
    init = next(t for t in model.graph.initializer if t.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save_model(model, str(dest), **save_kwargs)
    return {"node": node.name, "op_type": node.op_type, "tensor": node.output[0]}


def quantize_int8(src: Path, dest: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "Please consider to run pre-processing before quantization"
    try:
        quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


@pytest.fixture(scope="session")
def cnn(tmp_path_factory) -> dict:
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    directory = tmp_path_factory.mktemp("validate-cnn")
    fp32 = directory / "cnn.onnx"
    result = mpack("convert", "examples.tiny_cnn:make_model", "--input", "pixels:batch,3,32,32", "-o", fp32)
    assert result.exit_code == 0, result
    quantize_int8(fp32, directory / "cnn.int8.onnx")
    edited = scale_initializer(fp32, directory / "faulty.onnx")
    return {"dir": directory, "fp32": fp32, "int8": directory / "cnn.int8.onnx", "faulty": directory / "faulty.onnx",
            "edited": edited}
