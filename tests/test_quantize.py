"""`mpack quantize` on real models with real ONNX Runtime quantization and inference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import assert_clean_error, assert_nothing_written, mpack

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from fixtures.onnx_models import sensitive_mlp  # noqa: E402


def _run(*args) -> dict:
    result = mpack("quantize", *args, "--json")
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """The wide fixture CNN, converted once: (model path, calibration .npz)."""
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("cnn")
    model = folder / "cnn.onnx"
    result = mpack("convert", "fixtures.torch_models:make_wide_cnn", "-i", "pixels:batch,3,32,32", "-o", model)
    assert result.exit_code == 0, result
    rng = np.random.default_rng(0)
    calib = folder / "calib.npz"
    np.savez(calib, pixels=rng.standard_normal((16, 3, 32, 32)).astype(np.float32))
    return model, calib


@pytest.fixture(scope="module")
def encoder(torch_fixtures, tmp_path_factory):
    folder = tmp_path_factory.mktemp("enc")
    model = folder / "encoder.onnx"
    assert mpack("convert", torch_fixtures["encoder_pt2"], "-o", model).exit_code == 0
    return model


def test_cnn_static_qdq_per_channel(cnn, tmp_path):
    model, calib = cnn
    out = tmp_path / "cnn.int8.onnx"
    data = _run(model, "-o", out, "--calibration", calib)
    assert data["mode"] == "static" and "conv net" in data["mode_reason"] and data["format"] == "qdq"
    assert 2.5 < data["ratio"] < 4.2, data["ratio"]
    assert data["quantized_ops"]["Conv"] == 3
    [acc] = data["accuracy"]
    assert acc["cosine"] >= 0.99 and acc["top1_agreement"] >= 0.9
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    manifest = json.loads((tmp_path / "cnn.int8.mpack.json").read_text())
    q = manifest["quantization"]
    assert q["calibration"]["count"] == 16 and q["calibration"]["feeds"] == 1 and len(q["calibration"]["sha256"]) == 64
    assert q["method"] == "minmax" and q["excluded_nodes"] == [] and set(q["cpu_flags"]) >= {"avx2", "avx512_vnni"}
    assert [h["step"] for h in manifest["history"]] == ["convert", "quantize"]
    assert manifest["model"]["sha256"] != json.loads((model.parent / "cnn.mpack.json").read_text())["model"]["sha256"]


def test_calibration_directory_and_entropy(cnn, tmp_path):
    model, _ = cnn
    samples = tmp_path / "samples"
    samples.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        np.save(samples / f"{i}.npy", rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
    # Entropy clips the tails of these random activations hard, so this checks the route, not the accuracy.
    data = _run(model, "-o", tmp_path / "e.int8.onnx", "--calibration", samples, "--method", "entropy",
                "--max-drop", "cosine=0.5")
    assert data["method"] == "entropy" and data["validation_samples"] == 6


def test_entropy_ranges_differ_from_minmax(cnn, tmp_path):
    """quantize_static's own Entropy calibration silently equals MinMax; ours must not."""
    from mpack.inputs import load_samples
    from mpack.onnx_io import read_facts
    from mpack.quantize import _calibrate, calibration_ranges

    model, calib = cnn
    feeds = load_samples(calib, read_facts(model).inputs)
    minmax = calibration_ranges(_calibrate(model, feeds, "minmax", _mkdir(tmp_path / "a")))
    entropy = calibration_ranges(_calibrate(model, feeds, "entropy", _mkdir(tmp_path / "b")))
    differing = [k for k in minmax if not np.allclose(minmax[k], entropy[k])]
    assert len(differing) >= len(minmax) // 2


def _mkdir(path):
    path.mkdir()
    return path


def test_qoperator_format(cnn, tmp_path):
    model, calib = cnn
    out = tmp_path / "q.int8.onnx"
    data = _run(model, "-o", out, "--calibration", calib, "--format", "qoperator", "--method", "percentile")
    assert data["format"] == "qoperator"
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(out)).graph.node}


def test_random_calibration_warns(cnn, tmp_path):
    model, _ = cnn
    result = mpack("quantize", model, "-o", tmp_path / "r.int8.onnx", "--calibration", "random")
    assert result.exit_code == 0, result
    assert "RANDOM" in result.stderr


def test_transformer_defaults_to_dynamic_within_budget(encoder, tmp_path):
    out = tmp_path / "enc.int8.onnx"
    data = _run(encoder, "-o", out)
    assert data["mode"] == "dynamic" and "MatMul" in data["mode_reason"]
    assert data["quantized_ops"].get("MatMul", 0) >= 4
    assert all(a["cosine"] >= 0.99 for a in data["accuracy"])
    assert 1.2 < data["ratio"] < 4.0  # a 25 k-parameter model: graph overhead keeps the file ratio low
    session = ort.InferenceSession(str(out))
    assert session.run(None, {"tokens": np.zeros((2, 7, 32), np.float32)})[0].shape == (2, 7, 4)


def test_reduce_range_follows_the_cpu(encoder, tmp_path):
    from mpack.quantize import cpu_flags, needs_reduce_range

    data = _run(encoder, "-o", tmp_path / "a.onnx")
    manifest = json.loads((tmp_path / "a.mpack.json").read_text())
    assert manifest["quantization"]["reduce_range"] == needs_reduce_range(cpu_flags())
    assert needs_reduce_range({"avx2": True, "avx512_vnni": False}) and not needs_reduce_range(
        {"avx2": True, "avx512_vnni": True})
    forced = _run(encoder, "-o", tmp_path / "b.onnx", "--full-range", "--max-drop", "cosine=1")
    assert json.loads((tmp_path / "b.mpack.json").read_text())["quantization"]["reduce_range"] is False
    assert data["cpu_flags"] == forced["cpu_flags"]


def test_budget_fallback_keeps_the_sensitive_node_in_float(tmp_path):
    model = sensitive_mlp(tmp_path / "mlp.onnx")
    # Without the fallback, per-tensor INT8 misses the budget: exit 3, nothing written.
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = mpack("quantize", model, "-o", out_dir / "mlp.int8.onnx", "--per-tensor", "--no-fallback")
    assert_clean_error(result, 3, "misses the budget")
    assert_nothing_written(out_dir)
    data = _run(model, "-o", out_dir / "mlp.int8.onnx", "--per-tensor")
    assert data["excluded_nodes"] == ["outlier_matmul"]
    assert len(data["attempts"]) == 2 and not data["attempts"][0]["passed"] and data["attempts"][1]["passed"]
    assert data["accuracy"][0]["cosine"] >= 0.99
    graph = onnx.load(str(out_dir / "mlp.int8.onnx")).graph
    assert any(n.name == "outlier_matmul" and n.op_type == "MatMul" for n in graph.node)


def test_budget_that_cannot_be_met(tmp_path):
    model = sensitive_mlp(tmp_path / "mlp.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = mpack("quantize", model, "-o", out_dir / "m.int8.onnx", "--per-tensor", "--max-drop", "cosine=0",
                   "--max-excluded", "1")
    assert_clean_error(result, 3, "misses the budget", "kept in float32")
    assert_nothing_written(out_dir)


# --- bad input -----------------------------------------------------------------------------------------------------

def test_calibration_that_does_not_match(cnn, tmp_path):
    model, _ = cnn
    wrong_name = tmp_path / "wrong.npz"
    np.savez(wrong_name, image=np.zeros((2, 3, 32, 32), np.float32))
    assert_clean_error(mpack("quantize", model, "-o", tmp_path / "q.onnx", "--calibration", wrong_name), 2,
                       "expects inputs ['pixels']")
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, pixels=np.zeros((2, 3, 16), np.float32))
    assert_clean_error(mpack("quantize", model, "-o", tmp_path / "q.onnx", "--calibration", wrong_shape), 2,
                       "expects")
    wrong_dtype = tmp_path / "dtype.npz"
    np.savez(wrong_dtype, pixels=np.zeros((2, 3, 32, 32), np.float64))
    assert_clean_error(mpack("quantize", model, "-o", tmp_path / "q.onnx", "--calibration", wrong_dtype), 2,
                       "float32")
    assert not (tmp_path / "q.onnx").exists()


def test_empty_calibration_set(cnn, tmp_path):
    model, _ = cnn
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(mpack("quantize", model, "-o", tmp_path / "q.onnx", "--calibration", empty), 2,
                       "no samples")


def test_static_needs_calibration(cnn, tmp_path):
    model, _ = cnn
    assert_clean_error(mpack("quantize", model, "-o", tmp_path / "q.onnx"), 2, "--calibration")


def test_already_quantized(cnn, tmp_path):
    model, calib = cnn
    first = tmp_path / "once.int8.onnx"
    _run(model, "-o", first, "--calibration", calib)
    assert_clean_error(mpack("quantize", first, "-o", tmp_path / "twice.onnx", "--calibration", calib), 2,
                       "already quantized")


def test_nothing_to_quantize(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "relu.onnx"))
    assert_clean_error(mpack("quantize", tmp_path / "relu.onnx", "-o", tmp_path / "q.onnx"), 2, "no float weights")


@pytest.mark.parametrize("args,needle", [(["--mode", "fast"], "not one of"), (["--max-drop", "cos=1"], "expected"),
                                         (["--method", "kl"], "not one of")])
def test_bad_options(cnn, tmp_path, args, needle):
    model, _ = cnn
    assert_clean_error(mpack("quantize", model, "-o", tmp_path / "q.onnx", *args), 2, needle)


def test_budget_failure_prints_the_attempts_as_json(tmp_path):
    model = sensitive_mlp(tmp_path / "mlp.onnx")
    result = mpack("quantize", model, "-o", tmp_path / "q.onnx", "--per-tensor", "--no-fallback", "--json")
    assert result.exit_code == 3
    data = json.loads(result.stdout)
    assert data["passed"] is False and data["report"]["attempts"][0]["accuracy"][0]["cosine"] < 0.99


def test_unreadable_samples_and_malformed_manifest(cnn, tmp_path):
    model, _ = cnn
    truncated = tmp_path / "t.npz"
    truncated.write_bytes(b"PK\x03\x04" + b"\x00" * 20)
    assert_clean_error(mpack("quantize", model, "-o", tmp_path / "q.onnx", "--calibration", truncated), 2,
                       "not an .npz")
    copy = tmp_path / "m.onnx"
    copy.write_bytes(model.read_bytes())
    (tmp_path / "m.mpack.json").write_text('{"inputs": [{"name": "x"}]}')
    assert_clean_error(mpack("quantize", copy, "-o", tmp_path / "q.onnx", "--calibration", "random"), 2,
                       "not an mpack manifest")
