"""A real model past protobuf's 2 GB limit converts with its weights in external data and passes parity."""

from __future__ import annotations

import json

import pytest

from tests.conftest import mpack

pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.slow
def test_over_2gb_uses_external_data(tmp_path):
    out = tmp_path / "huge.onnx"
    result = mpack("convert", "fixtures.torch_models:make_huge", "--input", "ids:batch,3:int64", "-o", out, "--json")
    assert result.exit_code == 0, result
    data = json.loads(result.stdout)
    weights = tmp_path / "huge.onnx.data"
    assert data["external_data"] == ["huge.onnx.data"]
    assert weights.stat().st_size > 2**31 and out.stat().st_size < 1 << 20
    assert data["parity"]["passed"]
    manifest = json.loads((tmp_path / "huge.mpack.json").read_text())
    assert manifest["model"]["external_data"][0]["path"] == "huge.onnx.data"
    assert manifest["model"]["size_bytes"] == out.stat().st_size + weights.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.mpack.json", "huge.onnx", "huge.onnx.data"]
