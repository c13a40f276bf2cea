"""mpack serve's asynchronous job endpoints over the wire: a real redis-server (started here, on 127.0.0.1), real
servers (ServerThread) and a real worker (mpack.queue's, in a thread) on a small ONNX model.

Skipped when redis-server is not installed, except under CI=true, where it must be (the fixture is test_queue.py's).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("onnxruntime")
redis = pytest.importorskip("redis")

from mpack import queue  # noqa: E402
from mpack.serving import ServerThread  # noqa: E402
from tests.conftest import assert_clean_error, mpack  # noqa: E402
from tests.serve_helpers import config, get, make_models, ort_run, post  # noqa: E402
from tests.test_queue import _free_port, redis_url  # noqa: E402,F401 - the redis-server fixture, CI rule included

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("jobs-models"))


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"test-jobs-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def client(redis_url):  # noqa: F811
    return queue.connect(redis_url)


@pytest.fixture(scope="module")
def server(models, redis_url, prefix):  # noqa: F811
    """The server, with a worker consuming the stream of mlp's unversioned jobs (versioned ones wait: no worker)."""
    cfg = config((f"mlp={models['mlp']}",), grpc_port="off", queue=redis_url, queue_stream=prefix + ":{model}",
                 callback_hosts="127.0.0.1")
    worker = queue.Worker(queue.WorkerConfig(model=models["mlp"], url=redis_url, stream=f"{prefix}:mlp",
                                             block_ms=100, max_wait_ms=1, consumer="w1"))
    worker.start()
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    with ServerThread(cfg) as running:
        yield running
    stop.set()
    thread.join(timeout=10)


def job_body(x: np.ndarray, **parameters) -> bytes:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    if parameters:
        body["parameters"] = parameters
    return json.dumps(body).encode()


def submit(address: str, body: bytes, path: str = "/v2/models/mlp/jobs", headers: dict | None = None) -> tuple:
    status, response_headers, raw = post(address, path, body, headers)
    return status, response_headers, json.loads(raw)


def wait_finished(address: str, job_id: str, timeout: float = 15) -> tuple[dict, set]:
    """Poll GET /v2/jobs/{id} until done or failed: (the answer, every status seen)."""
    seen, deadline = set(), time.monotonic() + timeout
    while True:
        status, raw = get(address, f"/v2/jobs/{job_id}")
        assert status == 200, raw
        answer = json.loads(raw)
        seen.add(answer["status"])
        if answer["status"] in ("done", "failed"):
            return answer, seen
        assert time.monotonic() < deadline, answer
        time.sleep(0.02)


def metric(address: str, line_start: str) -> float:
    _, text = get(address, "/metrics")
    values = [float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines() if line.startswith(line_start)]
    return values[0] if values else 0.0


def test_submit_poll_until_done_equals_onnxruntime(server, models):
    x = RNG.standard_normal((3, 32)).astype(np.float32)
    status, headers, accepted = submit(server.http_address, job_body(x))
    assert status == 202, accepted
    assert accepted["status"] == "queued" and len(accepted["id"]) == 32
    assert accepted["location"] == headers["location"] == f"/v2/jobs/{accepted['id']}"
    answer, seen = wait_finished(server.http_address, accepted["id"])
    assert seen <= {"queued", "running", "done"}
    assert answer["status"] == "done" and answer["model_name"] == "mlp" and answer["model_version"] == "1"
    assert answer["worker"] == "w1" and answer["attempts"] == 1 and answer["finished"] >= answer["submitted"]
    (output,) = answer["outputs"]
    assert output["name"] == "y" and output["datatype"] == "FP32" and output["shape"] == [3, 8]
    np.testing.assert_allclose(np.array(output["data"], np.float32).reshape(3, 8), ort_run(models["mlp"], {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
    # The answer's outputs read like /infer's JSON response.
    _, _, raw = post(server.http_address, "/v2/models/mlp/infer", job_body(x))
    assert [{k: v for k, v in o.items() if k != "data"} for o in json.loads(raw)["outputs"]] == \
        [{k: v for k, v in output.items() if k != "data"}]


def test_binary_tensor_request_is_accepted(server, models):
    x = RNG.standard_normal((2, 32)).astype(np.float32)
    header = json.dumps({"id": "req-7", "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 32],
                                                    "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "y"}]}).encode()
    status, _, accepted = submit(server.http_address, header + x.tobytes(),
                                 headers={"Inference-Header-Content-Length": str(len(header))})
    assert status == 202, accepted
    answer, _ = wait_finished(server.http_address, accepted["id"])
    assert answer["request_id"] == "req-7"
    np.testing.assert_allclose(np.array(answer["outputs"][0]["data"], np.float32).reshape(2, 8),
                               ort_run(models["mlp"], {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_versioned_jobs_wait_on_their_own_stream_and_report_running(server, client, prefix):
    stream = f"{prefix}:mlp:1"  # no worker reads it
    status, _, accepted = submit(server.http_address, job_body(np.zeros((1, 32), np.float32)),
                                 "/v2/models/mlp/versions/1/jobs")
    assert status == 202, accepted
    assert client.xlen(stream) == 1
    status, raw = get(server.http_address, accepted["location"])
    assert status == 200 and json.loads(raw)["status"] == "queued"
    # A worker takes it (delivered, no result yet): running.
    client.xgroup_create(stream, "g", id="0")
    assert client.xreadgroup("g", "c", {stream: ">"}, count=1)
    assert json.loads(get(server.http_address, accepted["location"])[1])["status"] == "running"


def test_callback_url_receives_the_result_with_a_retry(server, models):
    received, calls = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            calls.append(self.headers.get("X-Mpack-Job"))
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if len(calls) == 1:  # the first attempt fails: the server retries
                self.send_response(503)
            else:
                received.append(json.loads(body))
                self.send_response(204)
            self.end_headers()

        do_GET = do_POST  # urllib turns a followed 302 into a GET

        def log_message(self, *args):
            pass

    sink = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        x = RNG.standard_normal((4, 32)).astype(np.float32)
        url = f"http://127.0.0.1:{sink.server_address[1]}/results"
        status, _, accepted = submit(server.http_address, job_body(x, callback_url=url))
        assert status == 202, accepted
        deadline = time.monotonic() + 15
        while not received:
            assert time.monotonic() < deadline, calls
            time.sleep(0.02)
    finally:
        sink.shutdown()
        sink.server_close()
    (body,) = received
    assert calls == [accepted["id"]] * 2
    assert body["id"] == accepted["id"] and body["status"] == "done"
    np.testing.assert_allclose(np.array(body["outputs"][0]["data"], np.float32).reshape(4, 8),
                               ort_run(models["mlp"], {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert metric(server.http_address, 'mpack_job_callbacks_total{outcome="delivered"}') >= 1


@pytest.mark.parametrize("body, message", [
    (job_body(np.zeros((2, 5), np.float32)), "input x has shape [2, 5]"),
    (job_body(np.zeros((2, 32), np.float64)).replace(b'"FP32"', b'"FP64"'), "input x has datatype FP64"),
    (b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [1]}]}', "missing input(s) x"),
    (b'{"inputs": [', "malformed JSON"),
    (job_body(np.zeros((40, 32), np.float32)), "exceeds max_batch_size 32"),
])
def test_bad_input_is_the_same_400_as_infer_and_nothing_is_queued(server, client, prefix, body, message):
    stream = f"{prefix}:mlp:1"
    before = client.xlen(stream), metric(server.http_address, "mpack_jobs_submitted_total")
    status, _, answer = submit(server.http_address, body, "/v2/models/mlp/versions/1/jobs")
    assert status == 400 and message in answer["error"], answer
    infer_status, _, infer_answer = submit(server.http_address, body, "/v2/models/mlp/versions/1/infer")
    assert (infer_status, infer_answer) == (status, answer)
    assert (client.xlen(stream), metric(server.http_address, "mpack_jobs_submitted_total")) == before
    assert metric(server.http_address, 'mpack_jobs_rejected_total{model="mlp",reason="invalid"}') >= 1


def _sink(status: int, headers: dict | None = None):
    """A callback receiver on 127.0.0.1 answering ``status``: (server, URL, the X-Mpack-Job header of each call)."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            calls.append(self.headers.get("X-Mpack-Job"))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST  # urllib turns a followed 302 into a GET

        def log_message(self, *args):
            pass

    sink = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    return sink, f"http://127.0.0.1:{sink.server_address[1]}/results", calls


def test_callback_hosts_outside_the_allowlist_are_refused(server, models, redis_url, prefix):  # noqa: F811
    x = np.zeros((1, 32), np.float32)
    for url in ("http://localhost:9/results", "http://169.254.169.254/latest/meta-data/", "https://10.0.0.1/"):
        status, _, answer = submit(server.http_address, job_body(x, callback_url=url))
        assert status == 400 and "not an allowed callback host" in answer["error"], answer
    # a server with no callback_hosts refuses every callback URL, naming the setting
    cfg = config((f"mlp={models['mlp']}",), grpc_port="off", queue=redis_url, queue_stream=prefix + "-nocb:{model}",
                 warmup=False)
    with ServerThread(cfg) as plain:
        status, _, answer = submit(plain.http_address, job_body(x, callback_url="http://127.0.0.1:9/results"))
        assert status == 400 and "--callback-host" in answer["error"] and "callback_hosts" in answer["error"]
        assert submit(plain.http_address, job_body(x))[0] == 202  # jobs without a callback are fine


def test_callback_redirects_are_not_followed(server):
    target, target_url, target_calls = _sink(204)
    redirect, url, calls = _sink(302, {"Location": target_url})
    try:
        status, _, accepted = submit(server.http_address, job_body(np.ones((1, 32), np.float32), callback_url=url))
        assert status == 202, accepted
        deadline = time.monotonic() + 15
        while len(calls) < 3:  # every attempt answered 302: retried, never followed
            assert time.monotonic() < deadline, calls
            time.sleep(0.02)
        time.sleep(0.3)
        assert calls == [accepted["id"]] * 3 and target_calls == []
    finally:
        for sink in (target, redirect):
            sink.shutdown()
            sink.server_close()


def test_bad_callback_url_unknown_model_and_unknown_job(server):
    status, _, answer = submit(server.http_address, job_body(np.zeros((1, 32), np.float32), callback_url="ftp://x/"))
    assert status == 400 and "callback_url" in answer["error"]
    status, _, answer = submit(server.http_address, job_body(np.zeros((1, 32), np.float32)), "/v2/models/nope/jobs")
    assert status == 404 and "unknown model 'nope'" in answer["error"]
    for job_id in (uuid.uuid4().hex, "not-a-job-id"):
        status, raw = get(server.http_address, f"/v2/jobs/{job_id}")
        assert status == 404 and "unknown job" in json.loads(raw)["error"]
    assert post(server.http_address, f"/v2/jobs/{uuid.uuid4().hex}", b"")[0] == 405


def test_full_queue_is_a_503_and_a_failed_job_reports_its_error(models, redis_url, prefix):  # noqa: F811
    cfg = config((f"mlp={models['mlp']}",), grpc_port="off", queue=redis_url, queue_stream=prefix + "-small:{model}",
                 queue_max_jobs=1, warmup=False)
    with ServerThread(cfg) as small:
        bad = np.full((1, 32), 100.0, np.float32)  # valid for mlp; the "raising" worker model fails on it
        status, _, accepted = submit(small.http_address, job_body(bad))
        assert status == 202, accepted
        status, _, answer = submit(small.http_address, job_body(bad))
        assert status == 503, answer
        assert f"queue {prefix}-small:mlp is full (1 jobs waiting, limit 1)" in answer["error"]
        assert metric(small.http_address, 'mpack_jobs_rejected_total{model="mlp",reason="full"}') == 1
        # A worker with a model that raises on this input takes the job off: it fails, and there is room again.
        queue.Worker(queue.WorkerConfig(model=models["raising"], url=redis_url, stream=f"{prefix}-small:mlp",
                                        max_jobs=1)).run()
        answer, _ = wait_finished(small.http_address, accepted["id"])
        assert answer["status"] == "failed" and "the model failed on this job" in answer["error"]
        assert "outputs" not in answer
        assert submit(small.http_address, job_body(bad))[0] == 202
        deadline = time.monotonic() + 5
        while metric(small.http_address, 'mpack_jobs_completed_total{model="mlp",version="1",status="failed"}') < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert metric(small.http_address, 'mpack_jobs_submitted_total{model="mlp",version="1"}') == 2
        assert metric(small.http_address, "mpack_jobs_pending") == 1


def test_without_a_queue_the_job_endpoints_say_which_flag_to_set(models):
    with ServerThread(config((f"mlp={models['mlp']}",), grpc_port="off", warmup=False)) as plain:
        status, _, answer = submit(plain.http_address, job_body(np.zeros((1, 32), np.float32)))
        assert status == 501 and "--queue" in answer["error"] and "MPACK_SERVE_QUEUE" in answer["error"]
        status, raw = get(plain.http_address, f"/v2/jobs/{uuid.uuid4().hex}")
        assert status == 501 and "--queue" in json.loads(raw)["error"]


def test_unreachable_redis_is_a_503_and_the_server_stays_up(models):
    closed = f"redis://127.0.0.1:{_free_port()}/0"
    with ServerThread(config((f"mlp={models['mlp']}",), grpc_port="off", queue=closed, warmup=False)) as down:
        status, _, answer = submit(down.http_address, job_body(np.zeros((1, 32), np.float32)))
        assert status == 503 and "cannot reach" in answer["error"], answer
        status, raw = get(down.http_address, f"/v2/jobs/{uuid.uuid4().hex}")
        assert status == 503
        assert get(down.http_address, "/v2/health/ready")[0] == 200
        assert metric(down.http_address, 'mpack_jobs_rejected_total{model="mlp",reason="unavailable"}') == 1


def test_queue_settings_from_flags_env_and_deployment_file(models, tmp_path):
    from mpack.serving import ServeConfigError, load_config

    deploy = tmp_path / "deploy.json"
    deploy.write_text(json.dumps({"server": {"queue": "redis://file:6379/0", "queue_max_jobs": 5},
                                  "models": {"mlp": str(models["mlp"])}}))
    cfg = load_config(config_file=deploy, env={"MPACK_SERVE_QUEUE_STREAM": "jobs:{model}"})
    assert (cfg.queue, cfg.queue_stream, cfg.queue_max_jobs) == ("redis://file:6379/0", "jobs:{model}", 5)
    cfg = load_config(config_file=deploy, env={"MPACK_SERVE_QUEUE": "redis://env:6379/1"})
    assert cfg.queue == "redis://env:6379/1"
    with pytest.raises(ServeConfigError, match="not a Redis URL"):
        load_config((f"mlp={models['mlp']}",), env={}, overrides={"queue": "http://x"})
    with pytest.raises(ServeConfigError, match="jobs of 2 models in one stream"):
        load_config((f"a={models['mlp']}", f"b={models['mlp']}"), env={},
                    overrides={"queue": "redis://x:6379/0", "queue_stream": "jobs"})
    result = mpack("serve", f"mlp={models['mlp']}", "--queue", "redis://127.0.0.1:6379/0", "--queue-max-jobs", "7",
                   "--print-config")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["queue"] == "redis://127.0.0.1:6379/0" and printed["queue_max_jobs"] == 7
    assert_clean_error(mpack("serve", f"mlp={models['mlp']}", "--queue", "localhost:6379"), 2, "not a Redis URL")
