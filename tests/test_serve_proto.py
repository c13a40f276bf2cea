"""The committed v2_pb2.py is generated from v2.proto, and v2.proto keeps the published V2 field numbers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SERVING = REPO / "src" / "mpack" / "serving"


def test_generated_module_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    (tmp_path / "mpack" / "serving").mkdir(parents=True)
    shutil.copy(SERVING / "v2.proto", tmp_path / "mpack" / "serving" / "v2.proto")
    proc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(tmp_path), f"--python_out={tmp_path}",
                           "mpack/serving/v2.proto"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    fresh = (tmp_path / "mpack" / "serving" / "v2_pb2.py").read_text()
    assert fresh == (SERVING / "v2_pb2.py").read_text(), (
        "src/mpack/serving/v2_pb2.py is stale: run python -m grpc_tools.protoc -I src --python_out=src "
        "src/mpack/serving/v2.proto")


def test_field_numbers_match_the_published_protocol():
    """Spot checks against KServe's grpc_predict_v2.proto and Triton's model_config.proto (numbers go on the wire)."""
    pytest.importorskip("google.protobuf")
    from mpack.serving import v2_pb2 as pb

    def number(message, field):
        return message.DESCRIPTOR.fields_by_name[field].number

    assert number(pb.ModelInferRequest, "raw_input_contents") == 7
    assert number(pb.ModelInferRequest, "outputs") == 6 and number(pb.ModelInferRequest, "inputs") == 5
    assert number(pb.ModelInferResponse, "raw_output_contents") == 6
    assert number(pb.ModelInferRequest.InferInputTensor, "contents") == 5
    assert number(pb.InferTensorContents, "fp32_contents") == 6
    assert number(pb.InferTensorContents, "bytes_contents") == 8
    assert number(pb.ModelMetadataResponse, "outputs") == 5 and number(pb.ServerMetadataResponse, "extensions") == 3
    assert number(pb.ModelStreamInferResponse, "infer_response") == 2
    assert number(pb.ModelConfig, "max_batch_size") == 4 and number(pb.ModelConfig, "dynamic_batching") == 11
    assert number(pb.ModelConfig, "backend") == 17 and number(pb.ModelInput, "dims") == 4
    assert number(pb.ModelOutput, "dims") == 3 and pb.TYPE_FP32 == 11 and pb.TYPE_INT64 == 9
    assert pb.DESCRIPTOR.package == "mpack.serving.v2"
    assert Path(pb.__file__).parent == SERVING
