"""`mpack convert` on real PyTorch models of every source format, checked by ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import assert_clean_error, assert_nothing_written, mpack

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from fixtures.torch_models import INPUTS  # noqa: E402


def _inputs(name: str) -> list[str]:
    return [arg for spec in INPUTS[name] for arg in ("--input", spec)]


def _convert_json(*args) -> dict:
    result = mpack("convert", *args, "--json")
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


def _dims(manifest_io: list[dict]) -> dict[str, list]:
    return {t["name"]: t["shape"] for t in manifest_io}


def test_pickled_module_cnn(torch_fixtures, tmp_path):
    out = tmp_path / "cnn.onnx"
    data = _convert_json(torch_fixtures["cnn_pickled"], *_inputs("cnn"), "-o", out)
    assert data["kind"] == "pickled-module" and data["exporter"] == "torch.onnx (dynamo)"
    assert data["parity"]["passed"] and set(data["parity"]["cases"]) == {"batch=1", "batch=4"}
    session = ort.InferenceSession(str(out))
    assert session.run(None, {"pixels": np.zeros((3, 3, 32, 32), np.float32)})[0].shape == (3, 10)


def test_torchscript_gru_uses_torchscript_exporter(torch_fixtures, tmp_path):
    out = tmp_path / "gru.onnx"
    data = _convert_json(torch_fixtures["gru_torchscript"], *_inputs("gru"), "-o", out)
    assert data["kind"] == "torchscript" and data["exporter"] == "torch.onnx (torchscript)"
    assert any("ScriptModule" in n for n in data["notes"])
    # Two sequence lengths were compared, not only two batch sizes.
    assert set(data["parity"]["cases"]) == {"batch=1 seq=10", "batch=4 seq=15"}
    assert _dims(data["inputs"]) == {"steps": ["batch", "seq", 8]}


def test_export_program_takes_its_own_signature(torch_fixtures, tmp_path):
    out = tmp_path / "encoder.onnx"
    data = _convert_json(torch_fixtures["encoder_pt2"], "-o", out)  # no --input: the program carries its specs
    assert data["kind"] == "export-program"
    assert _dims(data["inputs"]) == {"tokens": ["batch", "tokens_dim1", 32]}
    assert _dims(data["outputs"]) == {"output": ["batch", "tokens_dim1", 4]}
    assert data["parity"]["passed"] and len(data["parity"]["cases"]) == 2


def test_entry_point_with_weights_two_in_two_out(torch_fixtures, tmp_path):
    out = tmp_path / "mlp.onnx"
    data = _convert_json("fixtures.torch_models:make_mlp", "--weights", torch_fixtures["mlp_weights"],
                         *_inputs("mlp"), "-o", out)
    assert [o["name"] for o in data["outputs"]] == ["output_0", "output_1"]
    assert data["parity"]["passed"] and set(data["parity"]["outputs"]) == {"output_0", "output_1"}
    # The weights really were loaded: the ONNX model matches the state_dict, not the factory's own init.
    from fixtures.torch_models import TwoInTwoOut

    model = TwoInTwoOut().eval()
    model.load_state_dict(torch.load(torch_fixtures["mlp_weights"]))
    a, b = np.ones((2, 6), np.float32), np.ones((2, 4), np.float32)
    expected = model(torch.from_numpy(a), torch.from_numpy(b))[0].detach().numpy()
    got = ort.InferenceSession(str(out)).run(["output_0"], {"features": a, "extra": b})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_manifest_records_provenance(torch_fixtures, tmp_path):
    out = tmp_path / "mlp.onnx"
    mpack("convert", torch_fixtures["mlp_pt2"], "-o", out)
    manifest = json.loads((tmp_path / "mlp.mpack.json").read_text())
    assert manifest["source"]["format"] == "export-program"
    assert len(manifest["source"]["sha256"]) == 64
    assert manifest["framework"] == {"name": "pytorch", "version": torch.__version__}
    assert manifest["exporter"] == "torch.onnx (dynamo)" and manifest["opset"] == 18
    assert manifest["versions"]["onnxruntime"] == ort.__version__ and manifest["versions"]["onnx"]
    assert _dims(manifest["inputs"]) == {"features": ["batch", 6], "extra": ["batch", 4]}
    assert manifest["parity"]["passed"] is True and manifest["created_at"]
    assert manifest["model"]["size_bytes"] == out.stat().st_size
    assert manifest["history"][0]["step"] == "convert"
    import hashlib

    assert manifest["model"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_static_batch_keeps_fixed_axis(tmp_path):
    data = _convert_json("examples.tiny_cnn:make_model", "--input", "pixels:2,3,32,32", "--static-batch",
                         "-o", tmp_path / "m.onnx")
    assert _dims(data["inputs"]) == {"pixels": [2, 3, 32, 32]}
    assert data["parity"]["cases"] == ["static"]


def test_frozen_sequence_length_fails_parity(tmp_path):
    """The TorchScript-based exporter freezes the sequence length inside attention; parity at two lengths sees it."""
    result = mpack("convert", "fixtures.torch_models:make_encoder", *_inputs("encoder"), "--exporter", "torchscript",
                   "-o", tmp_path / "enc.onnx")
    assert_clean_error(result, 3, "parity check failed", "--exporter dynamo")
    assert "Reshape" in result.stdout  # the failing case is shown in the table
    assert_nothing_written(tmp_path)
    # The dynamo exporter keeps it dynamic.
    data = _convert_json("fixtures.torch_models:make_encoder", *_inputs("encoder"), "-o", tmp_path / "enc.onnx")
    assert data["parity"]["passed"]


def test_zero_tolerance_fails_with_figures(tmp_path):
    result = mpack("convert", "examples.tiny_cnn:make_model", *_inputs("cnn"), "--atol", "0", "--rtol", "0",
                   "-o", tmp_path / "m.onnx", "--json")
    assert result.exit_code == 3, result
    data = json.loads(result.stdout)
    assert data["passed"] is False
    worst = data["parity"]["outputs"]["output"]
    assert worst["max_abs"] > 0 and worst["atol"] == 0
    assert_nothing_written(tmp_path)


def test_no_verify_skips_parity(tmp_path):
    data = _convert_json("examples.tiny_cnn:make_model", *_inputs("cnn"), "--no-verify", "-o", tmp_path / "m.onnx")
    assert data["parity"] is None
    assert json.loads((tmp_path / "m.mpack.json").read_text())["parity"] == {"skipped": True}


def test_external_data_always(tmp_path):
    out = tmp_path / "m.onnx"
    data = _convert_json("examples.tiny_cnn:make_model", *_inputs("cnn"), "--external-data", "always", "-o", out)
    assert data["external_data"] == ["m.onnx.data"] and (tmp_path / "m.onnx.data").stat().st_size > 10_000
    assert out.stat().st_size < (tmp_path / "m.onnx.data").stat().st_size  # the large weights moved out
    ins = mpack("inspect", out, "--json")
    info = json.loads(ins.stdout)
    assert info["external_data"] == ["m.onnx.data"]
    assert info["size_bytes"] == out.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert ort.InferenceSession(str(out)).run(None, {"pixels": np.zeros((1, 3, 32, 32), np.float32)})


def test_existing_output_survives_a_failed_run(tmp_path):
    out = tmp_path / "m.onnx"
    mpack("convert", "examples.tiny_cnn:make_model", *_inputs("cnn"), "-o", out)
    before = out.read_bytes(), (tmp_path / "m.mpack.json").read_bytes()
    result = mpack("convert", "fixtures.torch_models:make_eigh", "--input", "matrix:batch,4,4", "-o", out)
    assert result.exit_code == 5
    assert (out.read_bytes(), (tmp_path / "m.mpack.json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mpack.json", "m.onnx"]


# --- bad input: one line, non-zero exit, no traceback, nothing written -------------------------------------------

def test_missing_file(tmp_path):
    assert_clean_error(mpack("convert", tmp_path / "nope.pt", "-o", tmp_path / "m.onnx"), 2, "does not exist")
    assert_nothing_written(tmp_path)


def test_corrupted_torch_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = mpack("convert", bad, *_inputs("cnn"), "-o", out_dir / "m.onnx")
    assert_clean_error(result, 2, "bad.pt")
    assert_nothing_written(out_dir)


def test_unknown_format(tmp_path):
    text = tmp_path / "model.txt"
    text.write_text("hello")
    assert_clean_error(mpack("convert", text, "-o", tmp_path / "m.onnx"), 2, "unknown model format")


def test_state_dict_instead_of_module(torch_fixtures, tmp_path):
    result = mpack("convert", torch_fixtures["cnn_weights"], *_inputs("cnn"), "-o", tmp_path / "m.onnx")
    assert_clean_error(result, 2, "state_dict", "--weights")


@pytest.mark.parametrize("entry,needle", [
    ("no_such_pkg.models:make", "cannot import"),
    ("fixtures.torch_models:no_such_factory", "no attribute"),
    ("fixtures.torch_models:make_not_a_module", "not a torch.nn.Module"),
])
def test_bad_entry_points(tmp_path, entry, needle):
    assert_clean_error(mpack("convert", entry, "--input", "x:batch,3", "-o", tmp_path / "m.onnx"), 2, needle)
    assert_nothing_written(tmp_path)


def test_weights_that_do_not_fit(torch_fixtures, tmp_path):
    result = mpack("convert", "examples.tiny_cnn:make_model", "--weights", torch_fixtures["mlp_weights"],
                   *_inputs("cnn"), "-o", tmp_path / "m.onnx")
    assert_clean_error(result, 2, "--weights", "does not fit")


def test_torch_model_needs_input_spec(tmp_path):
    assert_clean_error(mpack("convert", "examples.tiny_cnn:make_model", "-o", tmp_path / "m.onnx"), 2,
                       "--input")


def test_input_that_does_not_match_the_model(tmp_path):
    result = mpack("convert", "examples.tiny_cnn:make_model", "--input", "pixels:batch,5,32,32", "-o",
                   tmp_path / "m.onnx")
    assert_clean_error(result, 2, "does not fit the model")
    assert_nothing_written(tmp_path)


def test_input_that_does_not_match_the_program(torch_fixtures, tmp_path):
    result = mpack("convert", torch_fixtures["mlp_pt2"], "--input", "wrong:batch,6", "-o", tmp_path / "m.onnx")
    assert_clean_error(result, 2, "does not match the program")


def test_unconvertible_operator_is_named(tmp_path):
    result = mpack("convert", "fixtures.torch_models:make_eigh", "--input", "matrix:batch,4,4",
                   "-o", tmp_path / "m.onnx")
    assert_clean_error(result, 5, "linalg_eigh")
    assert result.stdout == ""  # exporter dumps stay off stdout
    assert_nothing_written(tmp_path)


def test_output_in_missing_directory(tmp_path):
    result = mpack("convert", "examples.tiny_cnn:make_model", *_inputs("cnn"), "-o", tmp_path / "no" / "m.onnx")
    assert_clean_error(result, 2, "does not exist", "mkdir")
    assert_nothing_written(tmp_path)


def test_reconvert_without_external_data_removes_the_old_weights(tmp_path):
    out = tmp_path / "m.onnx"
    args = ("examples.tiny_cnn:make_model", *_inputs("cnn"), "-o", out)
    assert mpack("convert", *args, "--external-data", "always").exit_code == 0
    assert (tmp_path / "m.onnx.data").exists()
    assert mpack("convert", *args).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mpack.json", "m.onnx"]
    assert oct((tmp_path / "m.mpack.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_source_model_failing_at_a_parity_size_is_a_clean_parity_failure(tmp_path):
    result = mpack("convert", "fixtures.torch_models:make_fixed_reshape", "--input", "x:batch,3",
                   "--exporter", "torchscript", "-o", tmp_path / "m.onnx")
    assert_clean_error(result, 3, "parity check failed")
    assert "model itself failed" in result.stdout
    assert_nothing_written(tmp_path)


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    junk = tmp_path / "w.pt"
    junk.write_bytes(b"\x80\x04garbage that is no pickle")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = mpack("convert", "examples.tiny_cnn:make_model", "--weights", junk, *_inputs("cnn"), "-o",
                   out_dir / "m.onnx")
    assert_clean_error(result, 2, "--weights")
    assert_nothing_written(out_dir)
