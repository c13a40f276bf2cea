"""`mpack convert` end to end on TensorFlow sources: the CLI, the manifest and the bad-input paths."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_clean_error, assert_nothing_written, mpack

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")


@pytest.fixture(scope="module")
def tf_models(tmp_path_factory):
    from fixtures.tf_models import make_tf_fixtures

    return make_tf_fixtures(tmp_path_factory.mktemp("tf-cli"))


@pytest.mark.parametrize("name,kind", [("functional_savedmodel", "savedmodel"), ("sequential.keras", "keras"),
                                       ("functional.tflite", "tflite")])
def test_convert_cli_and_manifest(tf_models, tmp_path, name, kind):
    out = tmp_path / "model.onnx"
    result = mpack("convert", tf_models[name], "-o", out, "--json")
    assert result.exit_code == 0, result
    data = json.loads(result.stdout)  # nothing from TF or tf2onnx leaked into the JSON
    assert data["kind"] == kind and data["framework"] == "tensorflow" and data["exporter"].startswith("tf2onnx")
    assert data["parity"]["passed"] and len(data["parity"]["cases"]) == 2
    manifest = json.loads((tmp_path / "model.mpack.json").read_text())
    assert manifest["framework"]["name"] == "tensorflow" and len(manifest["source"]["sha256"]) == 64
    assert all(i["shape"][0] == "batch" for i in manifest["inputs"])


def test_opset_choice_is_recorded(tf_models, tmp_path):
    result = mpack("convert", tf_models["sequential.h5"], "-o", tmp_path / "m.onnx", "--opset", "15", "--json")
    assert result.exit_code == 0, result
    assert json.loads(result.stdout)["opset"] == 15
    info = json.loads(mpack("inspect", tmp_path / "m.onnx", "--json").stdout)
    assert info["opsets"]["ai.onnx"] == 15


def test_directory_that_is_not_a_savedmodel(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hi")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_clean_error(mpack("convert", folder, "-o", out_dir / "m.onnx"), 2, "not a TensorFlow SavedModel")
    assert_nothing_written(out_dir)


def test_corrupted_keras_file(tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"PK\x03\x04 broken zip")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_clean_error(mpack("convert", bad, "-o", out_dir / "m.onnx"), 2, "bad.keras")
    assert_nothing_written(out_dir)


def test_input_that_does_not_match_the_signature(tf_models, tmp_path):
    result = mpack("convert", tf_models["sequential.keras"], "--input", "pixels:batch,16", "-o", tmp_path / "m.onnx")
    assert_clean_error(result, 2, "features")
    assert_nothing_written(tmp_path)


def test_torch_only_options_are_refused(tf_models, tmp_path):
    result = mpack("convert", tf_models["sequential.keras"], "--exporter", "dynamo", "-o", tmp_path / "m.onnx")
    assert_clean_error(result, 2, "PyTorch models only")
