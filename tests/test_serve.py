"""mpack serve over the wire: V2 REST and gRPC through tritonclient, batching, queue limits, bad input, metrics.

One in-process server (ServerThread on free 127.0.0.1 ports) per module fixture; real ONNX models, including the
example CNN converted with `mpack convert`.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("grpc")
pytest.importorskip("onnxruntime")
tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from mpack.serving import ServerThread  # noqa: E402
from tests.conftest import mpack  # noqa: E402
from tests.serve_helpers import (  # noqa: E402
    config, factory, get, infer_json, json_infer_body, make_models, ort_run, post)

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("serve-models"))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """examples/tiny_cnn converted by the CLI (TorchScript-based exporter: a few seconds faster than dynamo)."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("serve-cnn") / "cnn.onnx"
    result = mpack("convert", "examples.tiny_cnn:make_model", "--input", "pixels:batch,3,32,32:float32",
                   "--exporter", "torchscript", "-o", out)
    assert result.exit_code == 0, result
    return out


@pytest.fixture(scope="module")
def server(models, cnn):
    cfg = config((f"mlp={models['mlp']}", f"raising={models['raising']}", f"cnn={cnn}"),
                 max_request_bytes=256 * 1024)
    with ServerThread(cfg) as running:
        yield running


def test_health_and_metadata_over_http(server, cnn):
    client = tritonclient_http.InferenceServerClient(server.http_address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("cnn") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "mpack" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("cnn")
    assert model["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert model["outputs"][0]["shape"] == [-1, 10] and model["versions"] == ["1"]
    assert client.get_model_metadata("cnn", model_version="1")["name"] == "cnn"
    cfg = client.get_model_config("cnn")
    assert cfg["max_batch_size"] == 32 and cfg["input"][0]["dims"] == [3, 32, 32]
    assert cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert get(server.http_address, "/v2/models/cnn/versions/1/ready")[0] == 200


def test_health_and_metadata_over_grpc(server):
    client = tritonclient_grpc.InferenceServerClient(server.grpc_address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("cnn") and client.is_model_ready("cnn", "1")
    assert not client.is_model_ready("cnn", "7")
    assert "model_configuration" in client.get_server_metadata(as_json=True)["extensions"]
    meta = client.get_model_metadata("cnn", as_json=True)
    assert meta["inputs"][0]["shape"] == ["-1", "3", "32", "32"]  # int64 fields print as strings in JSON
    cfg = client.get_model_config("cnn", as_json=True)["config"]
    assert cfg["max_batch_size"] == 32 and cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert cfg["output"][0]["dims"] == ["10"]
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_http_infer_equals_local_onnxruntime(server, cnn, binary):
    x = RNG.standard_normal((3, 3, 32, 32)).astype(np.float32)
    client = tritonclient_http.InferenceServerClient(server.http_address)
    tensor = tritonclient_http.InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = client.infer("cnn", [tensor], request_id="r-1",
                          outputs=[tritonclient_http.InferRequestedOutput("output", binary_data=binary)])
    np.testing.assert_allclose(result.as_numpy("output"), ort_run(cnn, {"pixels": x})[0], rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response["model_version"] == "1" and response["id"] == "r-1"
    assert "parameters" not in response or response["parameters"] is not None


def test_grpc_infer_equals_local_onnxruntime(server, cnn):
    x = RNG.standard_normal((2, 3, 32, 32)).astype(np.float32)
    client = tritonclient_grpc.InferenceServerClient(server.grpc_address)
    tensor = tritonclient_grpc.InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("cnn", [tensor], request_id="g-1")
    np.testing.assert_allclose(result.as_numpy("output"), ort_run(cnn, {"pixels": x})[0], rtol=1e-5, atol=1e-6)
    assert result.get_response().model_version == "1" and result.get_response().id == "g-1"
    # and a versioned call
    result = client.infer("cnn", [tensor], model_version="1")
    assert result.as_numpy("output").shape == (2, 10)


def test_grpc_stream_infer(server, models):
    client = tritonclient_grpc.InferenceServerClient(server.grpc_address)
    results = []
    client.start_stream(callback=lambda result, error: results.append((result, error)))
    x = RNG.standard_normal((1, 32)).astype(np.float32)
    good = tritonclient_grpc.InferInput("x", [1, 32], "FP32")
    good.set_data_from_numpy(x)
    bad = tritonclient_grpc.InferInput("x", [1, 31], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 31), np.float32))
    for tensor in (good, bad, good):
        client.async_stream_infer("mlp", [tensor])
    deadline = time.monotonic() + 10
    while len(results) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    client.stop_stream()
    assert len(results) == 3
    errors = [e for _, e in results if e is not None]
    assert len(errors) == 1 and "shape" in str(errors[0])
    expected = ort_run(models["mlp"], {"x": x})[0]
    for result, error in results:
        if error is None:
            np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-5, atol=1e-5)


def test_concurrent_requests_are_batched_and_split_back(models):
    """Requests arriving while the model is busy run as one batch; each client gets its own rows."""
    build = factory({"mlp.onnx": {"sleep_s": 0.05}})
    cfg = config((f"mlp={models['mlp']}",), max_batch_size=16, warmup=False)
    with ServerThread(cfg, runner_factory=build) as running:
        inputs = [RNG.standard_normal((n, 32)).astype(np.float32) for n in (1, 2, 1, 3, 1, 1, 2, 1)]

        def call(x):
            client = tritonclient_http.InferenceServerClient(running.http_address)
            tensor = tritonclient_http.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=True)
            return client.infer("mlp", [tensor]).as_numpy("y")

        with ThreadPoolExecutor(len(inputs)) as pool:
            outputs = list(pool.map(call, inputs))
        for x, y in zip(inputs, outputs):
            np.testing.assert_allclose(y, ort_run(models["mlp"], {"x": x})[0], rtol=1e-5, atol=1e-5)
        sizes = running.engine.metrics.batch_size.bucket_counts(("mlp", "1"))
        assert sum(count for bound, count in sizes.items() if bound > 1) >= 1, sizes
        assert build.made["mlp.onnx"].calls < len(inputs)  # fewer runs than requests
        metrics = get(running.http_address, "/metrics")[1].decode()
        assert 'mpack_batch_size_bucket{model="mlp",version="1",le="1"}' in metrics


def test_batching_off_runs_every_request_alone(models):
    build = factory({"mlp.onnx": {"sleep_s": 0.02}})
    cfg = config((f"mlp={models['mlp']}",), max_batch_size=1, warmup=False)
    with ServerThread(cfg, runner_factory=build) as running:
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda _: infer_json(running.http_address, "mlp",
                                                           np.ones((1, 32), np.float32))[0], range(6)))
        assert statuses == [200] * 6
        sizes = running.engine.metrics.batch_size.bucket_counts(("mlp", "1"))
        assert sizes[1] == 6 and sum(sizes.values()) == 6
        status, _, body = infer_json(running.http_address, "mlp", np.ones((2, 32), np.float32))
        assert status == 400 and "max_batch_size 1" in body["error"]
        assert get(running.http_address, "/v2/models/mlp/config")[1].count(b'"max_batch_size": 1') == 1


def test_full_queue_answers_503_and_unavailable(models):
    build = factory({"mlp.onnx": {"sleep_s": 0.3}})
    cfg = config((f"mlp={models['mlp']}",), max_batch_size=1, max_queue_size=1, warmup=False)
    with ServerThread(cfg, runner_factory=build) as running:
        x = np.ones((1, 32), np.float32)
        with ThreadPoolExecutor(5) as pool:
            http_results = list(pool.map(lambda _: infer_json(running.http_address, "mlp", x), range(5)))
        statuses = sorted(status for status, _, _ in http_results)
        assert 503 in statuses and 200 in statuses, statuses
        assert any("queue full" in body.get("error", "") for _, _, body in http_results)

        client = tritonclient_grpc.InferenceServerClient(running.grpc_address)
        tensor = tritonclient_grpc.InferInput("x", [1, 32], "FP32")
        tensor.set_data_from_numpy(x)

        def grpc_call(_):
            try:
                client.infer("mlp", [tensor])
                return "OK"
            except InferenceServerException as exc:
                return exc.status()

        with ThreadPoolExecutor(5) as pool:
            codes = list(pool.map(grpc_call, range(5)))
        assert "StatusCode.UNAVAILABLE" in codes and "OK" in codes, codes
        assert running.engine.metrics.rejected.get(("mlp", "1")) >= 2
        # and it recovers
        assert infer_json(running.http_address, "mlp", x)[0] == 200


def test_readiness_is_false_until_models_are_loaded(models):
    cfg = config((f"mlp={models['mlp']}",))
    running = ServerThread(cfg, runner_factory=factory(load_delay_s=0.6)).start(wait_ready=False)
    try:
        status, body = get(running.http_address, "/v2/health/ready")
        assert status == 503 and json.loads(body)["state"] == "STARTING"
        assert get(running.http_address, "/v2/health/live")[0] == 200
        client = tritonclient_grpc.InferenceServerClient(running.grpc_address)
        assert client.is_server_live() and not client.is_server_ready()
        assert infer_json(running.http_address, "mlp", np.ones((1, 32), np.float32))[0] == 503
        running.wait_ready(30)
        assert get(running.http_address, "/v2/health/ready")[0] == 200 and client.is_server_ready()
    finally:
        running.stop()


def _binary_body(x: np.ndarray, claimed: int | None = None) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes if claimed is None else claimed}}]})
    return header.encode() + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                           "Content-Type": "application/octet-stream"}


BAD_REQUESTS = {
    "unknown model": ("/v2/models/nope/infer", json_infer_body(np.ones((1, 32), np.float32)), None, 404),
    "unknown version": ("/v2/models/mlp/versions/9/infer", json_infer_body(np.ones((1, 32), np.float32)), None, 404),
    "missing input": ("/v2/models/mlp/infer", json_infer_body(np.ones((1, 32), np.float32), name="z"), None, 400),
    "extra input": ("/v2/models/mlp/infer", json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 32], "data": [0.0] * 32},
        {"name": "extra", "datatype": "FP32", "shape": [1], "data": [0.0]}]}).encode(), None, 400),
    "wrong dtype": ("/v2/models/mlp/infer", json.dumps({"inputs": [
        {"name": "x", "datatype": "INT64", "shape": [1, 32], "data": [0] * 32}]}).encode(), None, 400),
    "unknown dtype": ("/v2/models/mlp/infer", json.dumps({"inputs": [
        {"name": "x", "datatype": "FP8", "shape": [1, 32], "data": [0] * 32}]}).encode(), None, 400),
    "wrong shape": ("/v2/models/mlp/infer", json_infer_body(np.ones((1, 31), np.float32)), None, 400),
    "data length": ("/v2/models/mlp/infer", json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 32], "data": [0.0] * 32}]}).encode(), None, 400),
    "ragged data": ("/v2/models/mlp/infer", json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 32], "data": [[0.0] * 31, [1.0]]}]}).encode(), None, 400),
    "text data": ("/v2/models/mlp/infer", json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": ["a", "b"]}]}).encode(), None, 400),
    "malformed json": ("/v2/models/mlp/infer", b'{"inputs": [', None, 400),
    "not an object": ("/v2/models/mlp/infer", b"[1, 2]", None, 400),
    "no inputs": ("/v2/models/mlp/infer", b'{"inputs": []}', None, 400),
    "negative shape": ("/v2/models/mlp/infer", json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [-1, 32], "data": [0.0] * 32}]}).encode(), None, 400),
    "unknown output": ("/v2/models/mlp/infer", json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 32], "data": [0.0] * 32}],
        "outputs": [{"name": "nope"}]}).encode(), None, 400),
    "binary size lies": ("/v2/models/mlp/infer", *_binary_body(np.ones((1, 32), np.float32), claimed=64), 400),
    "binary size past end": ("/v2/models/mlp/infer", *_binary_body(np.ones((1, 32), np.float32), claimed=4096), 400),
    "header length lies": ("/v2/models/mlp/infer", _binary_body(np.ones((1, 32), np.float32))[0],
                           {"Inference-Header-Content-Length": "99999"}, 400),
    "header length short": ("/v2/models/mlp/infer", _binary_body(np.ones((1, 32), np.float32))[0],
                            {"Inference-Header-Content-Length": "10"}, 400),
    "header length text": ("/v2/models/mlp/infer", _binary_body(np.ones((1, 32), np.float32))[0],
                           {"Inference-Header-Content-Length": "ten"}, 400),
    "oversize body": ("/v2/models/mlp/infer", b"x" * (300 * 1024), None, 413),
    "model raises": ("/v2/models/raising/infer", json_infer_body(np.full((1, 32), 50.0, np.float32)), None, 400),
    "batch over max": ("/v2/models/mlp/infer", json_infer_body(np.ones((33, 32), np.float32)), None, 400),
    "unknown path": ("/v3/things", b"{}", None, 404),
    "wrong method": ("/v2/models/mlp", b"{}", None, 405),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_v2_error_and_the_server_stays_up(server, models, case):
    path, body, headers, expected = BAD_REQUESTS[case]
    status, response_headers, payload = post(server.http_address, path, body, headers)
    assert status == expected, (status, payload)
    error = json.loads(payload)["error"]
    assert isinstance(error, str) and error and "Traceback" not in error
    # the next valid request is unaffected
    x = RNG.standard_normal((2, 32)).astype(np.float32)
    status, _, body = infer_json(server.http_address, "mlp", x)
    assert status == 200
    np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(2, 8),
                               ort_run(models["mlp"], {"x": x})[0], rtol=1e-5, atol=1e-4)


def test_bad_input_over_grpc(server, models):
    client = tritonclient_grpc.InferenceServerClient(server.grpc_address)

    def infer(model, name, shape, datatype, data=None):
        tensor = tritonclient_grpc.InferInput(name, shape, datatype)
        tensor.set_data_from_numpy(data if data is not None else np.zeros(shape, np.float32))
        return client.infer(model, [tensor])

    cases = [(("nope", "x", [1, 32], "FP32"), "StatusCode.NOT_FOUND"),
             (("mlp", "z", [1, 32], "FP32"), "StatusCode.INVALID_ARGUMENT"),
             (("mlp", "x", [1, 31], "FP32"), "StatusCode.INVALID_ARGUMENT"),
             (("mlp", "x", [1, 32], "INT64", np.zeros((1, 32), np.int64)), "StatusCode.INVALID_ARGUMENT"),
             (("raising", "x", [1, 32], "FP32", np.full((1, 32), 50.0, np.float32)), "StatusCode.INVALID_ARGUMENT")]
    for args, code in cases:
        with pytest.raises(InferenceServerException) as info:
            infer(*args)
        assert info.value.status() == code, (args, info.value)
    # raw bytes that do not match the shape: tritonclient checks this itself, so write the message by hand
    from mpack.serving import v2_pb2 as pb
    import grpc

    channel = grpc.insecure_channel(server.grpc_address)
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 32])
    request.raw_input_contents.append(b"\0" * 100)
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes of raw data" in info.value.details()
    # typed contents instead of raw bytes work too
    request = pb.ModelInferRequest(model_name="mlp")
    x = RNG.standard_normal((1, 32)).astype(np.float32)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 32]).contents.fp32_contents.extend(x.ravel().tolist())
    reply = call(request)
    y = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(1, 8)
    np.testing.assert_allclose(y, ort_run(models["mlp"], {"x": x})[0], rtol=1e-5, atol=1e-4)
    channel.close()
    assert infer("mlp", "x", [1, 32], "FP32").as_numpy("y").shape == (1, 8)


def test_a_failing_request_does_not_fail_its_batch_mates(models):
    """A batch that raises is re-run request by request, so only the offending request fails."""
    build = factory({"raising.onnx": {"sleep_s": 0.05}})
    cfg = config((f"raising={models['raising']}",), warmup=False)
    with ServerThread(cfg, runner_factory=build) as running:
        good = np.zeros((1, 32), np.float32)
        bad = np.full((1, 32), 50.0, np.float32)
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda x: infer_json(running.http_address, "raising", x)[0],
                                    [good, good, bad, good, good, good]))
        assert results == [200, 200, 400, 200, 200, 200]


def test_json_accepts_nan_and_inf_as_perf_analyzer_sends_them(server):
    body = ('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 32], "data": [NaN, Infinity, -Infinity'
            + ", 0.0" * 29 + "]}]}").encode()
    status, _, payload = post(server.http_address, "/v2/models/mlp/infer", body)
    assert status == 200, payload


def test_binary_output_with_json_input_and_unaligned_binary_input(server, models):
    x = RNG.standard_normal((1, 32)).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 32],
                                     "parameters": {"binary_data_size": 128}}],
                         "parameters": {"binary_data_output": True}, "id": "odd"})
    header += " " * (3 - len(header) % 4 + 1)  # make the binary part start at an odd offset
    status, headers, payload = post(server.http_address, "/v2/models/mlp/infer", header.encode() + x.tobytes(),
                                    {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200
    length = int(headers["inference-header-content-length"])
    meta = json.loads(payload[:length])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 32 and meta["id"] == "odd"
    y = np.frombuffer(payload[length:], np.float32).reshape(1, 8)
    np.testing.assert_allclose(y, ort_run(models["mlp"], {"x": x})[0], rtol=1e-5, atol=1e-4)
    assert struct.calcsize("f") == 4


def test_metrics_content(server):
    infer_json(server.http_address, "mlp", np.ones((1, 32), np.float32))
    infer_json(server.http_address, "mlp", np.ones((1, 31), np.float32))
    status, body = get(server.http_address, "/metrics")
    text = body.decode()
    assert status == 200
    for needle in ('mpack_requests_total{model="mlp",version="1",route="primary"}',
                   'mpack_request_errors_total{model="mlp",version="1",route="primary",code="400"}',
                   'mpack_request_duration_seconds_bucket{model="mlp",version="1",route="primary",le="+Inf"}',
                   "# TYPE mpack_batch_size histogram", 'mpack_queue_depth{model="mlp",version="1"} 0',
                   'mpack_health{state="READY"} 1', 'mpack_http_responses_total{code="200"}'):
        assert needle in text, needle
    # Every sample line parses as NAME{LABELS} VALUE
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value.replace("+Inf", "inf"))


def test_many_small_requests_from_threads_stay_correct(server, models):
    """Mixed shapes and sizes under concurrency: batching groups by shape and never mixes up rows."""
    inputs = [RNG.standard_normal((1 + i % 3, 32)).astype(np.float32) for i in range(24)]
    expected = [ort_run(models["mlp"], {"x": x})[0] for x in inputs]
    lock = threading.Lock()
    errors = []

    def call(index):
        status, _, body = infer_json(server.http_address, "mlp", inputs[index])
        got = np.array(body["outputs"][0]["data"], np.float32).reshape(expected[index].shape)
        if status != 200 or not np.allclose(got, expected[index], rtol=1e-4, atol=1e-4):
            with lock:
                errors.append(index)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(len(inputs))))
    assert not errors


def test_large_json_is_decoded_and_encoded_off_the_event_loop(models, monkeypatch):
    """A large body is decoded in a thread (here: held there until /v2/health/live has answered, which a blocked
    event loop could not do); small ones stay on the loop; large outputs and shadow comparisons run in threads."""
    from mpack.serving import engine as engine_module
    from mpack.serving import http_api

    seen: dict[str, list[str]] = {"decode": [], "encode": [], "compare": []}
    release = threading.Event()
    real_decode, real_encode, real_compare = http_api.decode_rest, http_api.encode_rest, engine_module.compare_outputs

    def decode(body, *args):
        seen["decode"].append(threading.current_thread().name)
        if len(body) > 1 << 20:
            release.wait(10)  # a decode that takes a while
        return real_decode(body, *args)

    def encode(*args):
        seen["encode"].append(threading.current_thread().name)
        return real_encode(*args)

    def compare(*args):
        seen["compare"].append(threading.current_thread().name)
        return real_compare(*args)

    monkeypatch.setattr(http_api, "decode_rest", decode)
    monkeypatch.setattr(http_api, "encode_rest", encode)
    monkeypatch.setattr(engine_module, "compare_outputs", compare)
    cfg = config((f"m:1={models['mlp']}", f"m:2={models['mlp_b']}"), shadow=("m:2",), grpc_port="off")
    with ServerThread(cfg) as running:
        address = running.http_address
        x = RNG.standard_normal((2, 32)).astype(np.float32)
        body = json.loads(json_infer_body(x))
        body["parameters"] = {"padding": "x" * (2 << 20)}  # a 2 MiB body
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(post, address, "/v2/models/m/infer", json.dumps(body).encode())
            deadline = time.monotonic() + 10
            while not seen["decode"]:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            started = time.perf_counter()
            status, _ = get(address, "/v2/health/live")
            elapsed = time.perf_counter() - started
            release.set()
            assert status == 200 and elapsed < 5, elapsed
            assert pending.result()[0] == 200
        assert seen["decode"][0] != "mpack-serve"
        assert infer_json(address, "m", x)[0] == 200  # small: decoded and encoded on the loop
        assert seen["decode"][-1] == "mpack-serve" and seen["encode"][-1] == "mpack-serve"
        monkeypatch.setattr(http_api, "OFFLOAD_BYTES", 16)  # now every output counts as large
        assert infer_json(address, "m", x)[0] == 200
        assert seen["encode"][-1] != "mpack-serve"
        deadline = time.monotonic() + 10
        while len(seen["compare"]) < 3:
            assert time.monotonic() < deadline, seen
            time.sleep(0.01)
        assert "mpack-serve" not in seen["compare"]


def test_max_concurrency_turns_excess_connections_away(models):
    import socket

    cfg = config((f"mlp={models['mlp']}",), grpc_port="off", max_concurrency=2)
    assert config((f"mlp={models['mlp']}",), max_queue_size=50).concurrency_limit == 200  # default: 4 x the queue
    with ServerThread(cfg) as running:
        assert get(running.http_address, "/v2/health/live")[0] == 200
        held = [socket.create_connection(("127.0.0.1", running.info.http_port)) for _ in range(2)]
        try:
            deadline = time.monotonic() + 10
            while get(running.http_address, "/v2/health/live")[0] != 503:  # the two idle connections fill it
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10
        while get(running.http_address, "/v2/health/live")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
