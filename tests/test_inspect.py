"""`mpack inspect` on hand-built ONNX graphs (no framework needed) and on a converted model with its manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import assert_clean_error, mpack

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _graph_model(path):
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="handmade")
    onnx.save(model, str(path))


def test_inspect_json(tmp_path):
    path = tmp_path / "g.onnx"
    _graph_model(path)
    result = mpack("inspect", path, "--json")
    assert result.exit_code == 0, result
    info = json.loads(result.stdout)
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["n", 4]}]
    assert info["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["n", 3]}]
    assert info["parameters"] == 15 and info["nodes"] == 4
    assert info["op_histogram"] == {"Relu": 2, "MatMul": 1, "Add": 1}
    assert info["opsets"] == {"ai.onnx": 17} and info["producer"] == "handmade"
    assert info["size_bytes"] == path.stat().st_size and info["manifest"] is None


def test_inspect_table(tmp_path):
    path = tmp_path / "g.onnx"
    _graph_model(path)
    result = mpack("inspect", path)
    assert result.exit_code == 0
    assert "x [n, 4] float32" in result.stdout and "Relu" in result.stdout


def test_inspect_shows_manifest(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "cnn.onnx"
    assert mpack("convert", "examples.tiny_cnn:make_model", "-i", "pixels:batch,3,32,32", "-o", out).exit_code == 0
    info = json.loads(mpack("inspect", out, "--json").stdout)
    assert info["manifest"]["exporter"] == "torch.onnx (dynamo)"
    assert info["manifest"]["parity_passed"] is True and info["manifest"]["history"] == ["convert"]
    assert "manifest" in mpack("inspect", out).stdout


def test_inspect_bad_files(tmp_path):
    assert_clean_error(mpack("inspect", tmp_path / "none.onnx"), 2, "does not exist")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xfe not protobuf at all" * 3)
    assert_clean_error(mpack("inspect", junk), 2, "not an ONNX model")


def test_inspect_rejects_bytes_that_parse_as_empty_protobuf(tmp_path):
    odd = tmp_path / "notes.json"
    odd.write_text("x\n")  # a valid (empty) protobuf message, but no model
    assert_clean_error(mpack("inspect", odd), 2, "not an ONNX model")
