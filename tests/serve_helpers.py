"""Shared pieces of the tests/test_serve*.py files: small ONNX models, runner wrappers, raw HTTP, server start-up."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fixtures.onnx_models import IR_VERSION, mlp


def raising_model(path: Path) -> Path:
    """x (n, 32) float → Gather from a 4-row table at int(x) → sum → y (n, 8). Zeros (the warm-up) run; any value
    outside [-4, 4) makes ONNX Runtime raise "indices element out of data bounds" at run time."""
    table = numpy_helper.from_array(np.arange(32, dtype=np.float32).reshape(4, 8), "table")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "xi"], ["g"], axis=0),
             helper.make_node("ReduceSum", ["g", "axes"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "raising", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [table, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))
    return path


def slow_model(path: Path, size: int = 512, layers: int = 60) -> Path:
    """x (n, size) → `layers` × (MatMul with one shared weight, Tanh) → y: a real model that takes milliseconds per
    sample (for drain tests in a subprocess, where no runner can be wrapped), with one weight on disk."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32), "w")
    nodes, current = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [current, "w"], [f"m{i}"]))
        current = f"t{i}" if i < layers - 1 else "y"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [current]))
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", size])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))
    return path


def make_models(directory: Path) -> dict[str, Path]:
    """mlp (v1), mlp_b (other weights: a distinguishable v2), raising."""
    directory.mkdir(parents=True, exist_ok=True)
    return {"mlp": mlp(directory / "mlp.onnx"), "mlp_b": mlp(directory / "mlp_b.onnx", hidden=16),
            "raising": raising_model(directory / "raising.onnx")}


class WrappedRunner:
    """Wraps a real runner: sleeps before each run, or raises."""

    def __init__(self, inner, sleep_s: float = 0.0, fail: bool = False) -> None:
        self.inner, self.sleep_s, self.fail = inner, sleep_s, fail
        self.inputs, self.outputs, self.providers = inner.inputs, inner.outputs, inner.providers
        self.calls = 0

    def run(self, feeds):
        self.calls += 1
        if self.fail:
            raise RuntimeError("shadow model crashed on purpose")
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return self.inner.run(feeds)


def factory(wrap: dict[str, dict] | None = None, load_delay_s: float = 0.0):
    """A runner factory building ONNX Runtime runners, wrapped for the paths named in ``wrap`` (by file name)."""
    from mpack.serving.model import OrtRunner

    made: dict[str, WrappedRunner] = {}

    def build(path, providers, threads):
        if load_delay_s:
            time.sleep(load_delay_s)
        runner = OrtRunner(path, providers, threads)
        options = (wrap or {}).get(Path(path).name)
        if options is None:
            return runner
        made[Path(path).name] = wrapped = WrappedRunner(runner, **options)
        return wrapped

    build.made = made  # type: ignore[attr-defined]
    return build


def ort_run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def config(models: tuple[str, ...] = (), **overrides):
    from mpack.serving import load_config

    settings = {"http_port": 0, "grpc_port": 0, "threads": 1, "access_log": False}
    settings.update(overrides)
    canary = settings.pop("canary", ())
    shadow = settings.pop("shadow", ())
    ab = settings.pop("ab", ())
    config_file = settings.pop("config_file", None)
    return load_config(models, overrides=settings, canary=canary, shadow=shadow, ab=ab, config_file=config_file,
                       env={})


def post(address: str, path: str, body: bytes, headers: dict | None = None, timeout: float = 30) \
        -> tuple[int, dict, bytes]:
    """POST raw bytes; returns (status, lower-cased headers, body)."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("POST", path, body=body, headers=headers or {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def get(address: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def json_infer_body(x: np.ndarray, name: str = "x", request_id: str | None = None) -> bytes:
    body = {"inputs": [{"name": name, "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    if request_id:
        body["id"] = request_id
    return json.dumps(body).encode()


def infer_json(address: str, model: str, x: np.ndarray, headers: dict | None = None) -> tuple[int, dict, dict]:
    """A JSON infer over raw HTTP: (status, headers, parsed body)."""
    status, response_headers, body = post(address, f"/v2/models/{model}/infer", json_infer_body(x),
                                          {"Content-Type": "application/json", **(headers or {})})
    return status, response_headers, json.loads(body)
