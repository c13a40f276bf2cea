"""`mpack serve` as a real process: start-up log, V2 over both protocols, and a graceful drain on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("grpc")
pytest.importorskip("onnxruntime")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

from tests.conftest import REPO  # noqa: E402
from tests.serve_helpers import get, infer_json, ort_run, slow_model  # noqa: E402


def _start(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, dict, list[str]]:
    """Start `python -m mpack serve ...` and wait for its "ready" log line; returns (process, listening, lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "mpack", "serve", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    lines: list[str] = []
    listening: dict = {}
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("msg") == "listening":
                listening.update(record)
            if record.get("msg") in ("ready", "failed"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(60):
        proc.kill()
        raise AssertionError("".join(lines))
    return proc, listening, lines


def test_sigterm_drains_in_flight_and_queued_requests(tmp_path):
    model = slow_model(tmp_path / "slow.onnx")
    proc, listening, lines = _start([f"slow={model}", "--http-port", "0", "--grpc-port", "0", "--threads", "1",
                                     "--max-batch-size", "1", "--drain-delay", "0.3"],
                                    env={"MPACK_SERVE_ACCESS_LOG": "true"})
    try:
        address = f"127.0.0.1:{listening['http_port']}"
        assert listening["host"] == "127.0.0.1"
        x = np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32)
        expected = ort_run(model, {"x": x})[0]
        # how long one request takes here, to size the backlog
        started = time.perf_counter()
        assert infer_json(address, "slow", x)[0] == 200
        one = time.perf_counter() - started
        count = max(6, min(40, int(0.6 / max(one, 1e-3))))  # at least ~0.6 s of queued work
        results: list = [None] * count

        def call(i):
            results[i] = infer_json(address, "slow", x)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        time.sleep(min(0.1, one * 2))
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        # during the drain delay: live, not ready
        status, body = get(address, "/v2/health/ready")
        assert status == 503 and json.loads(body)["state"] == "DRAINING"
        assert get(address, "/v2/health/live")[0] == 200
        for thread in threads:
            thread.join(60)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, "".join(lines)
    for status, _, body in results:
        assert status == 200, body
        np.testing.assert_allclose(np.array(body["outputs"][0]["data"], np.float32).reshape(1, 512), expected,
                                   rtol=1e-4, atol=1e-4)
    messages = [json.loads(line).get("msg") for line in lines if line.startswith("{")]
    assert messages.index("draining") < messages.index("stopped")
    access = [json.loads(line) for line in lines if '"mpack.serving.access"' in line]
    assert access and {"method", "path", "status", "ms", "model", "version"} <= set(access[0])


def test_cli_process_serves_grpc_and_refuses_a_taken_port(tmp_path):
    from fixtures.onnx_models import mlp

    model = mlp(tmp_path / "mlp.onnx")
    proc, listening, lines = _start([f"mlp={model}", "--http-port", "0", "--grpc-port", "0", "--no-access-log"])
    try:
        client = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{listening['grpc_port']}")
        x = np.ones((2, 32), np.float32)
        tensor = tritonclient_grpc.InferInput("x", [2, 32], "FP32")
        tensor.set_data_from_numpy(x)
        np.testing.assert_allclose(client.infer("mlp", [tensor]).as_numpy("y"), ort_run(model, {"x": x})[0],
                                   rtol=1e-5, atol=1e-4)
        taken = subprocess.run([sys.executable, "-m", "mpack", "serve", f"mlp={model}", "--http-port",
                                str(listening["http_port"]), "--grpc-port", "0"], cwd=REPO, capture_output=True,
                               text=True, timeout=60)
        assert taken.returncode == 2 and "cannot listen" in taken.stderr and "Traceback" not in taken.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 0, "".join(lines)
    assert not any('"mpack.serving.access"' in line for line in lines)
