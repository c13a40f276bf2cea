"""Queue-based inference: a real redis-server (started here, on 127.0.0.1), real workers, real kills.

Skipped when redis-server is not installed, except under CI=true, where it must be (CI installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, assert_clean_error, mpack

ort = pytest.importorskip("onnxruntime")
redis = pytest.importorskip("redis")

from fixtures.onnx_models import mlp  # noqa: E402
from mpack import queue  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed, and CI must run the queue tests (apt-get install "
                        "redis-server; .ci/run does it)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            queue.connect(url)
            break
        except queue.QueueUnavailableError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def stream() -> str:
    return f"test:{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return mlp(tmp_path_factory.mktemp("models") / "mlp.onnx")


def direct(model: Path, feeds: dict) -> dict:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)


def slow_model(path: Path) -> Path:
    """x (n, 16), steps (n,) → y: ``max(steps)`` iterations of y = tanh(y @ W) in an ONNX Loop (about 3.5 µs each
    here), so a job's run time is set by its data: the kill test's job holds a worker for seconds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array((np.random.default_rng(0).standard_normal((16, 16)) * 0.5).astype(np.float32), "w")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("MatMul", ["v_in", "w"], ["mm"]),
         helper.make_node("Tanh", ["mm"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["n", 16])])
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["steps"], ["m"], keepdims=0),
         helper.make_node("Loop", ["m", "", "x"], ["y"], body=body)], "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16]),
         helper.make_tensor_value_info("steps", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])], [w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(path))
    return path


def in_thread(cfg: queue.WorkerConfig):
    """A worker in a thread: returns (thread, stop event, holder of its result)."""
    stop, holder = threading.Event(), {}
    worker = queue.Worker(cfg)
    worker.start()
    thread = threading.Thread(target=lambda: holder.setdefault("result", worker.run(stop)), daemon=True)
    thread.start()
    return thread, stop, holder


# --- library: submit → worker → result ----------------------------------------------------------------------------

def test_jobs_are_micro_batched_and_answered_with_the_direct_result(redis_url, stream, model):
    jobs = {}
    for i in range(12):
        x = rows(1 + i % 3, seed=i)
        jobs[queue.submit({"x": x}, url=redis_url, stream=stream)] = x
    assert all(queue.status(j, url=redis_url, stream=stream) == "queued" for j in jobs)
    assert queue.result(next(iter(jobs)), 0, url=redis_url, stream=stream) is None  # a poll: not done yet

    thread, stop, holder = in_thread(queue.WorkerConfig(model=model, url=redis_url, stream=stream, max_batch=64,
                                                        consumer="w1"))
    try:
        for job_id, x in jobs.items():
            res = queue.result(job_id, timeout=10, url=redis_url, stream=stream)
            assert res is not None and res.ok and res.worker == "w1" and res.attempts == 1
            np.testing.assert_allclose(res.outputs["y"], direct(model, {"x": x})["y"], rtol=1e-5, atol=1e-6)
    finally:
        stop.set()
        thread.join(timeout=10)
    result = holder["result"]
    assert result.jobs == 12 and result.failed == 0
    assert result.batches < result.jobs  # all 12 (24 rows) were waiting: they share calls
    client = queue.connect(redis_url)
    assert client.xlen(stream) == 0  # acknowledged entries are deleted: XLEN counts waiting jobs only
    assert client.xpending(stream, queue.DEFAULT_GROUP)["pending"] == 0


def test_bad_jobs_fail_alone_and_the_worker_goes_on(redis_url, stream, model):
    good = rows(2, seed=1)
    ids = {
        "good": queue.submit({"x": good}, url=redis_url, stream=stream),
        "shape": queue.submit({"x": np.zeros((2, 5), np.float32)}, url=redis_url, stream=stream),
        "dtype": queue.submit({"x": np.zeros((2, 32), np.int64)}, url=redis_url, stream=stream),
        "name": queue.submit({"pixels": good}, url=redis_url, stream=stream),
    }
    worker = queue.Worker(queue.WorkerConfig(model=model, url=redis_url, stream=stream, max_jobs=4))
    result = worker.run()
    assert result.jobs == 4 and result.failed == 3
    got = {k: queue.result(v, 5, url=redis_url, stream=stream) for k, v in ids.items()}
    assert got["good"].ok
    np.testing.assert_allclose(got["good"].outputs["y"], direct(model, {"x": good})["y"], rtol=1e-5, atol=1e-6)
    assert got["shape"].state == "failed" and "shape [2, 5]" in got["shape"].error
    assert "dtype int64" in got["dtype"].error and "float32" in got["dtype"].error
    assert "do not match the model" in got["name"].error


def test_queue_is_bounded_with_a_clear_rejection(redis_url, stream, model):
    # The bound a worker stores for its stream is what submitters get by default.
    queue.Worker(queue.WorkerConfig(model=model, url=redis_url, stream=stream, max_queue=3)).start()
    for i in range(3):
        queue.submit({"x": rows(1, i)}, url=redis_url, stream=stream)
    with pytest.raises(queue.QueueFullError) as info:
        queue.submit({"x": rows(1, 9)}, url=redis_url, stream=stream)
    assert "is full (3 jobs waiting, limit 3)" in info.value.message and info.value.http_status == 503
    assert queue.connect(redis_url).xlen(stream) == 3
    # Once a worker takes jobs off, there is room again.
    queue.Worker(queue.WorkerConfig(model=model, url=redis_url, stream=stream, max_jobs=3)).run()
    queue.submit({"x": rows(1, 9)}, url=redis_url, stream=stream)


def test_client_errors(redis_url, stream):
    with pytest.raises(queue.UnknownJobError):
        queue.result("0" * 32, 0, url=redis_url, stream=stream)
    with pytest.raises(queue.InvalidJobError, match="same number of rows"):
        queue.submit({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, url=redis_url, stream=stream)
    with pytest.raises(queue.InvalidJobError, match="does not carry"):
        queue.submit({"a": np.array(["text"])}, url=redis_url, stream=stream)
    closed = f"redis://127.0.0.1:{_free_port()}/0"
    with pytest.raises(queue.QueueUnavailableError) as info:
        queue.submit({"x": rows(1, 0)}, url=closed, stream=stream)
    assert "cannot reach Redis" in info.value.message and "redis-server" in info.value.hint


def test_wire_format_round_trips_every_dtype():
    tensors = {d: np.arange(6).reshape(2, 3).astype(d) for d in queue.DTYPES}
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode()
              for k, v in queue.encode_tensors(tensors, "inputs").items()}
    back = queue.decode_tensors(fields, "inputs")
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and np.array_equal(back[name], array)


# --- workers as processes: kill -9 mid-job, another worker finishes it --------------------------------------------

def _worker(model: Path, url: str, stream: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mpack", "worker", str(model), "--redis", url, "--stream", stream,
                             *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_job_held_by_a_killed_worker_is_finished_by_another(redis_url, stream, tmp_path):
    model = slow_model(tmp_path / "slow.onnx")
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32),
             "steps": np.array([500_000, 1], dtype=np.int64)}  # ~2 s of Loop on this machine
    client = queue.connect(redis_url)
    first = _worker(model, redis_url, stream, "--name", "worker-a", "--claim-idle", "0.5")
    try:
        job = queue.submit(feeds, url=redis_url, stream=stream)
        deadline = time.monotonic() + 30
        while True:  # wait until worker-a has the job delivered and unacknowledged
            assert first.poll() is None, first.communicate()
            try:
                pending = client.xpending_range(stream, queue.DEFAULT_GROUP, min="-", max="+", count=10)
            except redis.exceptions.ResponseError:  # NOGROUP: worker-a has not created the group yet
                pending = []
            if pending and pending[0]["consumer"] == b"worker-a":
                break
            assert time.monotonic() < deadline, "worker-a never took the job"
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    # worker-a died holding it: still pending, unanswered.
    assert queue.status(job, url=redis_url, stream=stream) == "queued"
    assert client.xpending(stream, queue.DEFAULT_GROUP)["pending"] == 1

    second = _worker(model, redis_url, stream, "--name", "worker-b", "--claim-idle", "0.5", "--max-jobs", "1",
                     "--json")
    stdout, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr
    counts = json.loads(stdout)
    assert counts["jobs"] == 1 and counts["reclaimed"] == 1 and counts["failed"] == 0
    res = queue.result(job, 5, url=redis_url, stream=stream)
    assert res.ok and res.worker == "worker-b" and res.attempts == 2
    np.testing.assert_allclose(res.outputs["y"], direct(model, feeds)["y"], rtol=1e-5, atol=1e-6)
    assert client.xpending(stream, queue.DEFAULT_GROUP)["pending"] == 0 and client.xlen(stream) == 0


def test_worker_stops_cleanly_on_sigterm(redis_url, stream, model):
    proc = _worker(model, redis_url, stream, "--json")
    try:
        deadline = time.monotonic() + 30
        while not queue.connect(redis_url).exists(stream):  # the group (and stream) exist once it is consuming
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        job = queue.submit({"x": rows(3, 1)}, url=redis_url, stream=stream)
        assert queue.result(job, 10, url=redis_url, stream=stream).ok
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["jobs"] == 1


# --- CLI errors ---------------------------------------------------------------------------------------------------

def test_worker_without_redis_says_how_to_start_one(model):
    result = mpack("worker", model, "--redis", f"redis://127.0.0.1:{_free_port()}/0")
    assert_clean_error(result, 9, "cannot reach Redis", "redis-server --port")


def test_worker_with_a_missing_model_is_a_bad_input(tmp_path, redis_url):
    result = mpack("worker", tmp_path / "none.onnx", "--redis", redis_url)
    assert_clean_error(result, 2, "does not exist")


def test_worker_rejects_bad_options(model):
    assert_clean_error(mpack("worker", model, "--max-batch", "0"), 2, "--max-batch")


def test_the_queue_module_stands_alone():
    """mpack.queue re-exports mpack.serving.jobs (the server's job endpoints share it): it must pull in no other part
    of mpack than mpack.serving's pure modules, and none of the CLI's packages (only numpy and redis)."""
    script = ("import sys, mpack.queue\nprint(sorted(m for m in sys.modules if m.startswith('mpack')))\n"
              "print([m for m in ('typer', 'rich', 'onnx', 'onnxruntime') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "['mpack', 'mpack.queue', 'mpack.serving', 'mpack.serving.config', 'mpack.serving.errors', "
        "'mpack.serving.jobs']", "[]"]


def test_worker_refuses_max_queue_zero(tmp_path):
    from tests.conftest import assert_clean_error, mpack

    model = tmp_path / "m.onnx"
    from fixtures.onnx_models import mlp

    mlp(model)
    assert_clean_error(mpack("worker", model, "--redis", "redis://127.0.0.1:1/0", "--max-queue", "0"), 2,
                       "--max-queue")
