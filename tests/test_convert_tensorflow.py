"""TensorFlow exporter: every format of two tiny models converts, names its tensors cleanly and passes parity."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fixtures.tf_models import make_tf_fixtures  # noqa: E402
from mpack.backends.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from mpack.convert.base import ExportedModel, ExportRequest  # noqa: E402
from mpack.convert.tensorflow import export_tensorflow  # noqa: E402
from mpack.errors import ConfigError, ExportError, InputFileError  # noqa: E402
from mpack.inputs import parity_cases, random_feeds  # noqa: E402
from mpack.parity import ParityReport, Tolerances, compare_outputs  # noqa: E402
from mpack.specs import TensorSpec, parse_input_spec  # noqa: E402

OPSET = 17
SEQUENTIAL_IN = [TensorSpec("features", ("batch", 16))]
FUNCTIONAL_IN = [TensorSpec("image", ("batch", 8, 8, 3)), TensorSpec("meta", ("batch", 5))]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return make_tf_fixtures(tmp_path_factory.mktemp("tf_models"))


def export(source: Path, kind: str, work_dir: Path, specs=None, dynamic_batch: bool = False) -> ExportedModel:
    return export_tensorflow(ExportRequest(str(source), kind, specs, OPSET, dynamic_batch, work_dir))


def parity(exported: ExportedModel) -> ParityReport:
    report = ParityReport(exported.source_runner.name, "onnxruntime")
    candidate = OnnxRuntimeRunner(exported.onnx_path)
    for case in parity_cases(exported.input_specs):
        feeds = random_feeds(exported.input_specs, case.sizes)
        compare_outputs(report, case.label, exported.source_runner.infer(feeds), candidate.infer(feeds),
                        Tolerances())
    return report


def onnx_io(path: Path) -> tuple[dict[str, list], dict[str, list]]:
    """ONNX graph inputs and outputs: name -> dims (dim_param or dim_value, None when unknown)."""
    graph = onnx.load(str(path)).graph

    def dims(value):
        return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                for d in value.type.tensor_type.shape.dim]

    return {i.name: dims(i) for i in graph.input}, {o.name: dims(o) for o in graph.output}


@pytest.mark.parametrize("name, kind, inputs, outputs", [
    ("sequential.keras", "keras", SEQUENTIAL_IN, {"output_0": ["batch", 4]}),
    ("sequential.h5", "h5", SEQUENTIAL_IN, {"output_0": ["batch", 4]}),
    ("sequential_savedmodel", "savedmodel", SEQUENTIAL_IN, {"output_0": ["batch", 4]}),
    ("sequential.tflite", "tflite", SEQUENTIAL_IN, {"output_0": ["batch", 4]}),
    ("functional.keras", "keras", FUNCTIONAL_IN, {"logits": ["batch", 3], "score": ["batch", 1]}),
    ("functional.h5", "h5", FUNCTIONAL_IN, {"logits": ["batch", 3], "score": ["batch", 1]}),
    ("functional_savedmodel", "savedmodel", FUNCTIONAL_IN, {"output_0": ["batch", 3], "output_1": ["batch", 1]}),
    ("functional.tflite", "tflite", FUNCTIONAL_IN, {"output_0": ["batch", 3], "output_1": ["batch", 1]}),
])
def test_exports_and_passes_parity(models, tmp_path, name, kind, inputs, outputs):
    exported = export(models[name], kind, tmp_path)

    assert exported.onnx_path == tmp_path / "model.onnx"
    assert exported.framework == "tensorflow" and exported.framework_version == tf.__version__
    assert exported.exporter.startswith("tf2onnx ")
    assert sorted(exported.input_specs, key=lambda s: s.name) == inputs
    onnx_inputs, onnx_outputs = onnx_io(exported.onnx_path)
    # input_specs are named and ordered exactly as the ONNX inputs, and carry the same dim names
    assert [s.name for s in exported.input_specs] == list(onnx_inputs)
    assert {s.name: list(s.shape) for s in exported.input_specs} == onnx_inputs
    assert onnx_outputs == outputs
    report = parity(exported)
    assert report.passed, report.summary()
    assert {c.case for c in report.comparisons} == {"batch=1", "batch=4"}
    assert {c.output for c in report.comparisons} == set(outputs)


def test_keras_sequential_trap(models, tmp_path):
    """Keras 3 Sequential breaks tf2onnx.convert.from_keras (KeyError 'keras_tensor_N'); ours goes through
    tf.function."""
    keras = pytest.importorskip("keras")
    assert type(keras.models.load_model(models["sequential.keras"])).__name__ == "Sequential"
    exported = export(models["sequential.keras"], "keras", tmp_path)
    assert "(from_function)" in exported.exporter
    assert any("Sequential" in note for note in exported.notes)
    assert parity(exported).passed


def test_tflite_outputs_map_by_name(models, tmp_path):
    """tf2onnx reorders TFLite inputs and outputs; names still pick the right tensors."""
    exported = export(models["functional.tflite"], "tflite", tmp_path)
    onnx_inputs, onnx_outputs = onnx_io(exported.onnx_path)
    # tf2onnx gives (meta, image) -> (output_1, output_0); the SignatureDef's order is restored
    assert list(onnx_inputs) == ["image", "meta"] and list(onnx_outputs) == ["output_0", "output_1"]

    keras = pytest.importorskip("keras")
    model = keras.models.load_model(models["functional.keras"])
    feeds = random_feeds(exported.input_specs, {"batch": 4}, seed=3)
    logits, score = (np.asarray(t) for t in model([feeds["image"], feeds["meta"]], training=False))
    for outputs in (exported.source_runner.infer(feeds), OnnxRuntimeRunner(exported.onnx_path).infer(feeds)):
        np.testing.assert_allclose(outputs["output_0"], logits, atol=1e-5)  # output_0 is the first Keras output
        np.testing.assert_allclose(outputs["output_1"], score, atol=1e-5)


def test_fixed_batch_tflite(models, tmp_path):
    static = export(models["sequential_fixed.tflite"], "tflite", tmp_path / "static")
    assert static.input_specs == [TensorSpec("features", (1, 16))]
    assert onnx_io(static.onnx_path)[0] == {"features": [1, 16]}
    assert parity(static).passed

    dynamic = export(models["sequential_fixed.tflite"], "tflite", tmp_path / "dynamic", dynamic_batch=True)
    assert dynamic.input_specs == SEQUENTIAL_IN
    assert onnx_io(dynamic.onnx_path) == ({"features": ["batch", 16]}, {"output_0": ["batch", 4]})
    assert any("dynamic" in note for note in dynamic.notes)
    report = parity(dynamic)
    assert report.passed and {c.case for c in report.comparisons} == {"batch=1", "batch=4"}


def test_fixed_batch_that_cannot_be_freed_stays_fixed(tmp_path):
    """A reshape to a constant shape pins the batch: keep it fixed and say why."""
    function = tf.function(lambda x: {"flat": tf.reshape(x, [1, 16]) * 2.0},
                           input_signature=[tf.TensorSpec([1, 4, 4], tf.float32, name="x")])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()])
    path = tmp_path / "pinned.tflite"
    path.write_bytes(converter.convert())

    exported = export(path, "tflite", tmp_path / "out", dynamic_batch=True)
    assert [s.shape for s in exported.input_specs] == [(1, 4, 4)]
    assert list(onnx_io(exported.onnx_path)[0].values()) == [[1, 4, 4]]
    assert any("fixed batch" in note for note in exported.notes)
    assert parity(exported).passed


def test_given_specs_rename_dims(models, tmp_path):
    exported = export(models["sequential.keras"], "keras", tmp_path, specs=[parse_input_spec("features:n,16")])
    assert exported.input_specs == [TensorSpec("features", ("n", 16))]
    assert onnx_io(exported.onnx_path) == ({"features": ["n", 16]}, {"output_0": ["n", 4]})
    assert parity(exported).passed


@pytest.mark.parametrize("spec, problem", [
    ("pixels:batch,16", "do not match the model's inputs"),
    ("features:batch,4,4", "rank"),
    ("features:batch,8", "fixed to 16"),
    ("features:batch,16:int64", "float32"),
])
def test_given_specs_must_match(models, tmp_path, spec, problem):
    with pytest.raises(ConfigError) as info:
        export(models["sequential_savedmodel"], "savedmodel", tmp_path, specs=[parse_input_spec(spec)])
    assert problem in str(info.value)
    assert "features:batch,16:float32" in info.value.hint  # names the expected inputs


def _lgamma_savedmodel(path: Path) -> Path:
    class Lgamma(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def __call__(self, x):
            return {"y": tf.math.lgamma(tf.abs(x) + 1.0)}

    module = Lgamma()
    tf.saved_model.save(module, str(path), signatures=module.__call__)
    return path


def _lgamma_keras(path: Path) -> Path:
    keras = pytest.importorskip("keras")

    @keras.saving.register_keras_serializable(package="mpack_tests")
    class LogGamma(keras.layers.Layer):
        def call(self, x):
            return tf.math.lgamma(tf.abs(x) + 1.0)

    keras.Sequential([keras.Input((4,), name="x"), keras.layers.Dense(4), LogGamma()]).save(path)
    return path


@pytest.mark.parametrize("kind, build", [("savedmodel", _lgamma_savedmodel), ("keras", _lgamma_keras)])
def test_unsupported_op_is_an_export_error(tmp_path, capfd, kind, build):
    """tf2onnx 1.17 has no conversion for Lgamma: it logs and leaves a non-ONNX node; we raise, quietly."""
    source = build(tmp_path / ("lgamma.keras" if kind == "keras" else "lgamma"))
    capfd.readouterr()
    with pytest.raises(ExportError) as info:
        export(source, kind, tmp_path / "out", dynamic_batch=True)
    assert "Lgamma" in str(info.value) and info.value.hint
    assert info.value.exit_code == 5
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no tf2onnx/TF log lines on the user's terminal


@pytest.mark.parametrize("kind, name, content, problem", [
    ("keras", "model.keras", b"not a zip at all", "not a Keras .keras archive"),
    ("keras", "model.keras", None, "cannot be loaded as a Keras .keras archive"),
    ("h5", "model.h5", b"\x00" * 64, "not a Keras HDF5"),
    ("tflite", "model.tflite", b"\x00" * 64, "not a TFLite flatbuffer"),
    ("tflite", "model.tflite", b"\x1c\x00\x00\x00TFL3" + b"\x00" * 8, "cannot be loaded as a TFLite model"),
    ("savedmodel", "model.keras", b"", "is not a SavedModel directory"),
])
def test_bad_model_files(tmp_path, kind, name, content, problem):
    path = tmp_path / name
    if content is None:  # a zip archive, but not a Keras one
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("hello.txt", "hello")
    else:
        path.write_bytes(content)
    with pytest.raises(InputFileError) as info:
        export(path, kind, tmp_path / "out")
    assert problem in str(info.value) and str(path) in str(info.value)


def test_savedmodel_without_serving_default(tmp_path):
    class TwoSignatures(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def double(self, x):
            return {"y": x * 2.0}

    module = TwoSignatures()
    signatures = {"double": module.double, "triple": tf.function(lambda x: {"y": x * 3.0}).get_concrete_function(
        tf.TensorSpec([None, 4], tf.float32, name="x"))}
    tf.saved_model.save(module, str(tmp_path / "two"), signatures=signatures)
    with pytest.raises(InputFileError, match="no 'serving_default' signature .signatures: double, triple."):
        export(tmp_path / "two", "savedmodel", tmp_path / "out")


def test_not_a_savedmodel_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="not a SavedModel directory"):
        export(tmp_path / "empty", "savedmodel", tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a saved model")
    with pytest.raises(InputFileError, match="not a valid SavedModel"):
        export(broken, "savedmodel", tmp_path / "out")
    with pytest.raises(InputFileError, match="does not exist"):
        export(tmp_path / "missing", "savedmodel", tmp_path / "out")


def test_missing_tensorflow_names_the_extra(monkeypatch, tmp_path):
    from mpack.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"mpack\[tf\]"):
        export(tmp_path / "model.keras", "keras", tmp_path / "out")
