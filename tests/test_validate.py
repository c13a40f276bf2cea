"""`mpack validate` on real models: source vs ONNX vs INT8, providers, --data, JUnit, the divergence report."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from tests.conftest import assert_clean_error, mpack
from tests.validate_models import cnn  # noqa: F401  (a session fixture)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")


def _json(*args, code: int = 0) -> dict:
    result = mpack("validate", *args, "--json")
    assert result.exit_code == code, result
    return json.loads(result.stdout)


@pytest.fixture
def own_cnn(cnn, tmp_path):
    """A private copy of the fp32 model and its manifest (tests that read the manifest's history)."""
    for name in ("cnn.onnx", "cnn.mpack.json"):
        shutil.copy(cnn["dir"] / name, tmp_path / name)
    return tmp_path / "cnn.onnx"


def test_fp32_against_itself_passes(cnn):
    data = _json(cnn["fp32"], cnn["fp32"])
    assert data["passed"] is True and data["counts"] == {"passed": 1, "failed": 0, "skipped": 0}
    (comparison,) = data["comparisons"]
    assert comparison["reference"] == "cnn.onnx[cpu]" and comparison["candidate"] == "cnn.onnx #2[cpu]"
    assert comparison["parity"]["outputs"]["output"]["max_abs"] == 0
    assert data["cases"] == ["batch=1", "batch=4"]  # the manifest's dynamic batch, at the default batch sizes


def test_source_against_onnx_passes_and_is_recorded(own_cnn):
    result = mpack("validate", own_cnn, "--source", "--batch-sizes", "2,3")
    assert result.exit_code == 0, result
    assert "parity: pytorch (examples.tiny_cnn:make_model) vs cnn.onnx[cpu]" in result.stdout
    assert "validation passed" in result.stderr
    history = json.loads(own_cnn.with_name("cnn.mpack.json").read_text())["history"]
    assert history[0]["step"] == "convert" and history[-1]["step"] == "validate"
    step = history[-1]
    assert step["passed"] is True and step["cases"] == ["batch=2", "batch=3"]
    assert step["reference"].startswith("pytorch") and step["comparisons"][0]["status"] == "passed"


def test_export_program_source_with_two_dynamic_dims(torch_fixtures, tmp_path):
    out = tmp_path / "encoder.onnx"
    assert mpack("convert", torch_fixtures["encoder_pt2"], "-o", out, "--no-verify").exit_code == 0
    data = _json(out, "--source")
    assert data["passed"] and data["reference"] == "pytorch (encoder.pt2)"
    assert data["cases"] == ["batch=1 tokens_dim1=8", "batch=4 tokens_dim1=12"]


def test_int8_fails_tight_and_passes_loose(cnn):
    result = mpack("validate", cnn["fp32"], cnn["int8"])
    assert_clean_error(result, 3, "validation failed", "1 of 1")
    assert "first diverging node" in result.stdout and "Conv" in result.stdout
    data = _json(cnn["fp32"], cnn["int8"], code=3)
    (comparison,) = data["comparisons"]
    assert comparison["status"] == "failed"
    first = comparison["first_divergence"]
    assert first["op_type"] == "Conv" and first["against"] == "cnn.onnx[cpu]" and first["case"] == "batch=1"
    loose = _json(cnn["fp32"], cnn["int8"], "--atol", "0.05", "--rtol", "0.05")
    assert loose["passed"] and loose["comparisons"][0]["parity"]["outputs"]["output"]["max_abs"] > 1e-4


def test_source_reference_with_fp32_and_int8(cnn):
    """Three forms at once: the source is the reference; INT8 is located against the fp32 ONNX model."""
    data = _json(cnn["fp32"], cnn["int8"], "--source", "--atol", "1e-3", "--rtol", "0", code=3)
    by_candidate = {c["candidate"]: c for c in data["comparisons"]}
    assert by_candidate["cnn.onnx[cpu]"]["status"] == "passed"
    int8 = by_candidate["cnn.int8.onnx[cpu]"]
    assert int8["status"] == "failed" and int8["first_divergence"]["against"] == "cnn.onnx[cpu]"


def test_induced_fault_reports_the_edited_node(cnn):
    edited = cnn["edited"]
    for chunk in ("64", "2"):
        data = _json(cnn["fp32"], cnn["faulty"], "--chunk-size", chunk, code=3)
        first = data["comparisons"][0]["first_divergence"]
        assert (first["node"], first["op_type"], first["tensor"]) == (edited["node"], edited["op_type"],
                                                                      edited["tensor"])
    result = mpack("validate", cnn["fp32"], cnn["faulty"], "--no-locate")
    assert result.exit_code == 3 and "first diverging node" not in result.stdout


def test_cuda_without_gpu_is_skipped_not_failed(cnn, tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA")
    report = tmp_path / "junit.xml"
    result = mpack("validate", cnn["fp32"], "--providers", "cpu,cuda", "--junit", report)
    assert result.exit_code == 0, result
    assert "skipped cnn.onnx[cuda]" in result.stderr and "CUDA is not available" in result.stderr
    assert "validation passed: 0 passed, 0 failed, 1 skipped" in result.stderr
    suite = ET.parse(report).getroot()
    assert suite.get("tests") == "1" and suite.get("skipped") == "1" and suite.get("failures") == "0"
    assert "CUDA" in suite.find(".//skipped").get("message")


def test_junit_counts_comparisons_outputs_failures_and_skips(cnn, tmp_path):
    report = tmp_path / "junit.xml"
    result = mpack("validate", cnn["fp32"], cnn["int8"], "--providers", "cpu,cuda", "--junit", report)
    assert result.exit_code == 3, result
    root = ET.parse(report).getroot()
    cases = root.findall(".//testcase")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    # candidates: fp32[cuda], int8[cpu], int8[cuda]; one output each
    assert len(cases) == 3 and root.get("tests") == "3"
    failures = [c for c in cases if c.find("failure") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    assert len(skipped) == (0 if has_cuda else 2)
    assert "cnn.int8.onnx[cpu] vs cnn.onnx[cpu]: output" in [c.get("name") for c in failures]
    failure = next(c for c in failures if "int8.onnx[cpu]" in c.get("name")).find("failure")
    assert "beyond tolerance" in failure.get("message") and "first diverging node" in failure.text
    assert [p.name for p in tmp_path.iterdir()] == ["junit.xml"]  # written atomically, no temp file left


def test_data_file_inputs(cnn, tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, pixels=np.ones((3, 3, 32, 32), np.float32))
    data = _json(cnn["fp32"], cnn["faulty"], "--data", path, code=3)
    assert data["cases"] == ["data"] and data["comparisons"][0]["parity"]["comparisons"][0]["shape_ref"] == [3, 10]


@pytest.mark.gpu
def test_cpu_against_cuda(cnn):
    data = _json(cnn["fp32"], cnn["int8"], "--providers", "cpu,cuda", "--atol", "0.05", "--rtol", "0.05")
    statuses = {c["candidate"]: c["status"] for c in data["comparisons"]}
    assert statuses == {"cnn.onnx[cuda]": "passed", "cnn.int8.onnx[cpu]": "passed", "cnn.int8.onnx[cuda]": "passed"}


# --- bad input: one line, exit 2, no traceback, nothing written ----------------------------------------------------


def _renamed_input(src, dest, name: str) -> None:
    model = onnx.load(str(src))
    old = model.graph.input[0].name
    model.graph.input[0].name = name
    for node in model.graph.node:
        node.input[:] = [name if i == old else i for i in node.input]
    onnx.save_model(model, str(dest))


def test_unknown_provider_lists_the_available_ones(cnn, tmp_path):
    result = mpack("validate", cnn["fp32"], cnn["int8"], "--providers", "cpu,foo", "--junit", tmp_path / "r.xml")
    assert_clean_error(result, 2, "--providers", "'foo'", "available here: cpu")
    assert not (tmp_path / "r.xml").exists()


def test_bad_models(cnn, tmp_path):
    assert_clean_error(mpack("validate", tmp_path / "none.onnx", cnn["fp32"]), 2, "does not exist")
    (tmp_path / "text.onnx").write_text("not a model at all")
    assert_clean_error(mpack("validate", cnn["fp32"], tmp_path / "text.onnx"), 2, "is not an ONNX model")
    _renamed_input(cnn["fp32"], tmp_path / "other.onnx", "image")
    assert_clean_error(mpack("validate", cnn["fp32"], tmp_path / "other.onnx"), 2, "has inputs ['image']",
                       "['pixels']")
    assert_clean_error(mpack("validate", cnn["fp32"]), 2, "nothing to compare", "--source")
    # The INT8 model has no manifest, so there is no source to run.
    assert_clean_error(mpack("validate", cnn["int8"], "--source"), 2, "--source", "manifest")


@pytest.mark.parametrize("arrays,needle", [
    ({"image": np.ones((1, 3, 32, 32), np.float32)}, "missing ['pixels']"),
    ({"pixels": np.ones((1, 3, 16, 16), np.float32)}, "expects shape"),
    ({"pixels": np.ones((1, 3, 32, 32), np.float64)}, "expects dtype float32"),
])
def test_data_that_does_not_fit(cnn, tmp_path, arrays, needle):
    path = tmp_path / "inputs.npz"
    np.savez(path, **arrays)
    assert_clean_error(mpack("validate", cnn["fp32"], cnn["int8"], "--data", path), 2, "--data", needle)


def test_bad_options(cnn, tmp_path):
    assert_clean_error(mpack("validate", cnn["fp32"], cnn["int8"], "--data", tmp_path / "none.npz"), 2,
                       "does not exist")
    (tmp_path / "x.npz").write_text("text")
    assert_clean_error(mpack("validate", cnn["fp32"], cnn["int8"], "--data", tmp_path / "x.npz"), 2, "not an .npz")
    assert_clean_error(mpack("validate", cnn["fp32"], cnn["int8"], "--batch-sizes", "0"), 2, "--batch-sizes")
    assert_clean_error(mpack("validate", cnn["fp32"], cnn["int8"], "--atol", "x"), 2, "not a number")
    assert_clean_error(mpack("validate", cnn["fp32"], cnn["int8"], "--junit", tmp_path / "no" / "r.xml"), 2,
                       "does not exist")


def test_tensorflow_sources(tmp_path):
    """A Keras Functional model (two inputs, two outputs) as .keras and as a SavedModel, validated against ONNX."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    import contextlib
    import io

    from fixtures.tf_models import build_functional

    model = build_functional()
    model.save(tmp_path / "functional.keras")
    with contextlib.redirect_stdout(io.StringIO()):
        model.export(str(tmp_path / "functional_savedmodel"), verbose=False)
    for source, name in ((tmp_path / "functional.keras", "keras"), (tmp_path / "functional_savedmodel", "sm")):
        out = tmp_path / f"{name}.onnx"
        assert mpack("convert", source, "-o", out, "--no-verify").exit_code == 0
        data = _json(out, "--source")
        assert data["passed"] and data["reference"] == f"tensorflow ({source.name})", data
        assert set(data["comparisons"][0]["parity"]["outputs"]) == set(data["outputs"]) and len(data["outputs"]) == 2
