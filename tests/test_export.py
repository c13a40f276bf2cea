"""`mpack export triton|k8s`: the output parses with the engines' own schemas (Triton's ModelConfig protobuf, the
kubernetes and KServe Python models), strictly: an unknown or mistyped field fails the test."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from fixtures.onnx_models import mlp
from tests.conftest import REPO, assert_clean_error, mpack

ort = pytest.importorskip("onnxruntime")


def _parse_config(path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_triton_repository(tmp_path):
    model = mlp(tmp_path / "mlp.onnx")
    repo = tmp_path / "repo"
    result = mpack("export", "triton", model, "-o", repo, "--name", "mlp", "--version", "3",
                   "--preferred-batch-sizes", "4,8", "--instances", "2", "--json")
    assert result.exit_code == 0, result
    assert json.loads(result.stdout)["files"] == ["mlp/config.pbtxt", "mlp/3/model.onnx"]
    config = _parse_config(repo / "mlp" / "config.pbtxt")
    assert config.name == "mlp" and config.backend == "onnxruntime" and config.max_batch_size == 32
    assert [(i.name, list(i.dims)) for i in config.input] == [("x", [32])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("y", [8])]
    from tritonclient.grpc import model_config_pb2

    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert list(config.version_policy.specific.versions) == [3]
    # The copied model is the same model.
    session = ort.InferenceSession(str(repo / "mlp" / "3" / "model.onnx"))
    assert session.run(None, {"x": np.ones((2, 32), np.float32)})[0].shape == (2, 8)


def test_triton_fixed_batch_model_is_not_batched(tmp_path):
    model = mlp(tmp_path / "fixed.onnx", batch=1)
    result = mpack("export", "triton", model, "-o", tmp_path / "repo")
    assert result.exit_code == 0, result
    config = _parse_config(tmp_path / "repo" / "fixed" / "config.pbtxt")
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 32]
    assert not config.HasField("dynamic_batching")
    assert "max_batch_size 0" in result.stderr


def test_triton_keeps_external_data_and_manifest(tmp_path):
    pytest.importorskip("torch")
    model = tmp_path / "cnn.onnx"
    assert mpack("convert", "examples.tiny_cnn:make_model", "-i", "pixels:batch,3,32,32", "--external-data",
                 "always", "-o", model).exit_code == 0
    repo = tmp_path / "repo"
    assert mpack("export", "triton", model, "-o", repo).exit_code == 0
    version = repo / "cnn" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["cnn.onnx.data", "model.mpack.json", "model.onnx"]
    config = _parse_config(repo / "cnn" / "config.pbtxt")
    assert list(config.input[0].dims) == [3, 32, 32] and list(config.output[0].dims) == [10]
    session = ort.InferenceSession(str(version / "model.onnx"))
    assert session.run(None, {"pixels": np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, 10)
    history = json.loads((tmp_path / "cnn.mpack.json").read_text())["history"]
    assert history[-1]["step"] == "export" and history[-1]["target"] == "triton"


def _need_k8s_models() -> None:
    # find_spec, not importorskip: importing kserve here would clash with tritonclient (see _validate_k8s).
    for name in ("kubernetes", "kserve"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed")


def _validate_k8s(folder) -> dict:
    """Validate in a fresh interpreter: kserve's and tritonclient's generated protobuf modules both register the
    `inference` package in the default descriptor pool and cannot be imported into one process."""
    proc = subprocess.run([sys.executable, "-m", "tests.k8s_validate", str(folder)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_k8s_manifests_validate(tmp_path):
    _need_k8s_models()
    out = tmp_path / "k8s"
    result = mpack("export", "k8s", "--image", "local/cnn:1.0", "--name", "tiny-cnn", "-o", out,
                   "--replicas", "2", "--max-replicas", "5", "--canary-percent", "10", "--namespace", "ml")
    assert result.exit_code == 0, result
    assert sorted(p.name for p in out.iterdir()) == ["deployment.yaml", "hpa.yaml", "inferenceservice.yaml",
                                                      "service.yaml"]
    checked = _validate_k8s(out)
    assert checked["deployment"] == {"replicas": 2, "image": "local/cnn:1.0", "readiness": "/v2/health/ready"}
    assert checked["service_ports"] == ["grpc", "http"]
    assert checked["hpa"] == {"min": 2, "max": 5, "target": "tiny-cnn"}
    assert checked["isvc"] == {"canary": 10, "image": "local/cnn:1.0", "namespace": "ml"}


def test_strict_validation_catches_a_typo(tmp_path):
    _need_k8s_models()
    out = tmp_path / "k8s"
    assert mpack("export", "k8s", "--image", "local/cnn:1.0", "--name", "cnn", "-o", out).exit_code == 0
    text = (out / "deployment.yaml").read_text().replace("replicas:", "replica:")
    (out / "deployment.yaml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "tests.k8s_validate", str(out)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode != 0 and "replica" in proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["--image", "local/cnn", "--name", "cnn"], "pinned image"),
    (["--image", "local/cnn:1\nRUN x", "--name", "cnn"], "pinned image"),
    (["--image", "local/cnn:1", "--name", "Tiny_CNN"], "not a valid Kubernetes name"),
    (["--image", "local/cnn:1", "--name", "cnn", "--canary-percent", "150"], "between 0 and 100"),
])
def test_k8s_bad_input(tmp_path, args, needle):
    assert_clean_error(mpack("export", "k8s", *args, "-o", tmp_path / "k8s"), 2, needle)
    assert not (tmp_path / "k8s").exists()


def test_triton_bad_input(tmp_path):
    model = mlp(tmp_path / "m.onnx")
    assert_clean_error(mpack("export", "triton", tmp_path / "none.onnx", "-o", tmp_path / "r"), 2, "does not exist")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert_clean_error(mpack("export", "triton", model, "-o", tmp_path / "full"), 2, "not an empty directory")
    assert_clean_error(mpack("export", "triton", model, "-o", tmp_path / "no" / "r"), 2, "does not exist")
    assert_clean_error(mpack("export", "triton", model, "-o", tmp_path / "r", "--preferred-batch-sizes", "64"), 2,
                       "between 1")
    assert_clean_error(mpack("export", "triton", model, "-o", tmp_path / "r", "--name", "a b"), 2, "letters")
    assert not (tmp_path / "r").exists()
    assert not [p for p in tmp_path.iterdir() if re.match(r"\..*mpack-", p.name)]


def _deployment(tmp_path, canary: str = "10%") -> object:
    mlp(tmp_path / "v1.onnx")
    mlp(tmp_path / "v2.onnx", hidden=32)
    mlp(tmp_path / "other.onnx", hidden=8)
    path = tmp_path / "mpack.deploy.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"http_port": 9000, "grpc_port": 9001},
        "batching": {"max_batch_size": 16, "max_queue_delay_ms": 2},
        "models": {"mlp": {"versions": {"1": "v1.onnx", "2": "v2.onnx"},
                           "canary": {"version": "2", "weight": canary}},
                   "other": {"versions": {"3": "other.onnx"}, "batching": {"max_batch_size": 4}}}}))
    return path


def test_triton_from_deployment_file(tmp_path):
    deploy = _deployment(tmp_path)
    repo = tmp_path / "repo"
    result = mpack("export", "triton", deploy, "-o", repo, "--json")
    assert result.exit_code == 0, result
    data = json.loads(result.stdout)
    assert sorted(data["files"]) == ["mlp/1/model.onnx", "mlp/2/model.onnx", "mlp/config.pbtxt",
                                     "other/3/model.onnx", "other/config.pbtxt"]
    assert any("canary" in n for n in data["notes"])
    mlp_config = _parse_config(repo / "mlp" / "config.pbtxt")
    assert list(mlp_config.version_policy.specific.versions) == [1, 2]
    assert mlp_config.max_batch_size == 16 and mlp_config.dynamic_batching.max_queue_delay_microseconds == 2000
    other = _parse_config(repo / "other" / "config.pbtxt")
    assert other.max_batch_size == 4 and list(other.version_policy.specific.versions) == [3]


def test_k8s_from_deployment_file(tmp_path):
    deploy = _deployment(tmp_path, canary="25%")
    out = tmp_path / "k8s"
    assert mpack("export", "k8s", deploy, "--image", "local/mlp:2", "--name", "mlp", "-o", out).exit_code == 0
    isvc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 25
    deployment = yaml.safe_load((out / "deployment.yaml").read_text())
    ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"http": 9000, "grpc": 9001}


def test_deployment_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": {"m": {"versions": {"v1": "missing.onnx"}}}}))
    result = mpack("export", "triton", bad, "-o", tmp_path / "repo")
    assert_clean_error(result, 2, "deployment file")
    assert not (tmp_path / "repo").exists()
