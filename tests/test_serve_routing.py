"""Deployment patterns over the wire: canary weights (and their change at run time, and automatic rollback),
shadow (never affecting the primary, even when it raises or is slow), sticky A/B splits."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("grpc")
pytest.importorskip("onnxruntime")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

from mpack.serving import ServerThread  # noqa: E402
from tests.serve_helpers import (  # noqa: E402
    config, factory, get, infer_json, json_infer_body as json_body, make_models, ort_run, post)

RNG = np.random.default_rng(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("routing-models"))


def _versions(address: str, n: int, x: np.ndarray, headers=None) -> Counter:
    counts: Counter = Counter()
    for _ in range(n):
        status, response_headers, body = infer_json(address, "m", x, headers)
        assert status == 200, body
        assert response_headers["x-mpack-version"] == body["model_version"]
        counts[body["model_version"]] += 1
    return counts


def test_canary_weight_and_runtime_change(models):
    cfg = config((f"m:1={models['mlp']}", f"m:2={models['mlp_b']}"), canary=("m:2=30%",))
    with ServerThread(cfg) as running:
        x = RNG.standard_normal((1, 32)).astype(np.float32)
        counts = _versions(running.http_address, 200, x)
        assert 30 <= counts["2"] <= 95, counts  # 60 expected; the bounds are > 4 sigma wide
        # answers are the answering version's own
        status, _, body = infer_json(running.http_address, "m", x)
        own = ort_run(models["mlp" if body["model_version"] == "1" else "mlp_b"], {"x": x})[0]
        np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(1, 8), own, rtol=1e-5, atol=1e-4)

        status, payload = get(running.http_address, "/admin/models/m/routing")
        assert status == 200 and json.loads(payload)["canary"] == {"version": "2", "weight": 0.3,
                                                                    "rolled_back": None}
        status, _, payload = post(running.http_address, "/admin/models/m/routing", b'{"canary_weight": "100%"}')
        assert status == 200 and json.loads(payload)["canary"]["weight"] == 1.0
        assert _versions(running.http_address, 20, x) == Counter({"2": 20})
        post(running.http_address, "/admin/models/m/routing", b'{"canary_weight": 0}')
        assert _versions(running.http_address, 20, x) == Counter({"1": 20})
        # gRPC routes the same way
        client = tritonclient_grpc.InferenceServerClient(running.grpc_address)
        tensor = tritonclient_grpc.InferInput("x", [1, 32], "FP32")
        tensor.set_data_from_numpy(x)
        assert client.infer("m", [tensor]).get_response().model_version == "1"
        # an explicit version bypasses routing
        assert client.infer("m", [tensor], model_version="2").get_response().model_version == "2"
        # bad admin changes are 400s and change nothing
        for bad in (b'{"canary_weight": 250}', b'{"weight": 1}', b'{"ab_split": {"1": 1}}', b"nope",
                    b'{"primary": "9"}'):
            status, _, payload = post(running.http_address, "/admin/models/m/routing", bad)
            assert status == 400 and json.loads(payload)["error"], bad
        assert json.loads(get(running.http_address, "/admin/models/m/routing")[1])["canary"]["weight"] == 0
        metrics = get(running.http_address, "/metrics")[1].decode()
        assert 'mpack_requests_total{model="m",version="2",route="canary"}' in metrics
        assert 'mpack_requests_total{model="m",version="2",route="direct"} 1' in metrics
        assert 'mpack_canary_weight{model="m",version="2"} 0' in metrics


def test_canary_rolls_back_on_error_rate(models, tmp_path):
    deploy = tmp_path / "mpack.deploy.json"
    deploy.write_text(json.dumps({"models": {"m": {
        "versions": {"1": str(models["mlp"]), "2": str(models["raising"])}, "primary": "1",
        "canary": {"version": "2", "weight": "50%",
                   "rollback": {"max_error_rate": "20%", "window_s": 60, "min_requests": 5}}}}}))
    cfg = config(config_file=deploy)
    with ServerThread(cfg) as running:
        x = np.full((1, 32), 50.0, np.float32)  # the raising version fails on it, the primary does not
        statuses = [infer_json(running.http_address, "m", x)[0] for _ in range(60)]
        routing = json.loads(get(running.http_address, "/admin/models/m/routing")[1])
        assert routing["canary"]["weight"] == 0 and "error rate" in routing["canary"]["rolled_back"]
        assert statuses.count(400) >= 5
        assert statuses[-10:] == [200] * 10  # after the rollback, only the primary answers
        metrics = get(running.http_address, "/metrics")[1].decode()
        assert 'mpack_canary_rollbacks_total{model="m",version="2"} 1' in metrics
        # an operator sets the weight again: the rollback is cleared
        post(running.http_address, "/admin/models/m/routing", b'{"canary_weight": 0.1}')
        assert json.loads(get(running.http_address, "/admin/models/m/routing")[1])["canary"]["rolled_back"] is None


def test_canary_rolls_back_on_p99(models):
    build = factory({"mlp_b.onnx": {"sleep_s": 0.03}})
    cfg = config((f"m:1={models['mlp']}", f"m:2={models['mlp_b']}"), canary=("m:2=100%",), warmup=False)
    with ServerThread(cfg, runner_factory=build) as running:
        from mpack.serving.config import RollbackSpec
        from mpack.serving.routing import RollbackGuard

        running.engine.models["m"].router.guard = RollbackGuard(RollbackSpec(max_p99_ms=10, min_requests=3))
        x = np.ones((1, 32), np.float32)
        versions = [infer_json(running.http_address, "m", x)[2]["model_version"] for _ in range(6)]
        assert versions[:3] == ["2", "2", "2"] and versions[-1] == "1"
        assert "p99" in running.engine.routing("m")["canary"]["rolled_back"]


def test_shadow_never_changes_or_delays_the_primary(models, tmp_path):
    """A shadow that raises and one that sleeps: the primary's answers, status and latency are untouched; the
    shadow's outcomes are counted and logged."""
    log_path = tmp_path / "shadow.jsonl"
    build = factory({"mlp_b.onnx": {"sleep_s": 0.25}})
    deploy = tmp_path / "deploy.json"
    deploy.write_text(json.dumps({"models": {
        "slow": {"versions": {"1": str(models["mlp"]), "2": str(models["mlp_b"])},
                 "shadow": {"version": "2", "log": str(log_path)}, "batching": {"max_queue_size": 2}},
        "crash": {"versions": {"1": str(models["mlp"]), "2": str(models["raising"])},
                  "shadow": {"version": "2", "log": str(log_path)}}}}))
    cfg = config(config_file=deploy, warmup=False)
    with ServerThread(cfg, runner_factory=build) as running:
        x = RNG.standard_normal((2, 32)).astype(np.float32) * 10  # out of range for the raising shadow
        expected = ort_run(models["mlp"], {"x": x})[0]
        started = time.perf_counter()
        for model in ("slow", "crash"):
            for _ in range(10):
                status, headers, body = infer_json(running.http_address, model, x)
                assert status == 200 and body["model_version"] == "1" and headers["x-mpack-route"] == "primary"
                np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(2, 8), expected,
                                           rtol=1e-5, atol=1e-4)
        elapsed = time.perf_counter() - started
        assert elapsed < 2.0, elapsed  # 10 sleeping shadow runs alone would take 2.5 s
        m = running.engine.metrics
        deadline = time.monotonic() + 5
        while m.shadow_errors.get(("crash", "2")) < 10 and time.monotonic() < deadline:  # shadows finish later
            time.sleep(0.02)
        assert m.shadow_errors.get(("crash", "2")) == 10
        assert m.shadow_dropped.get(("slow", "2")) >= 5  # its queue of 2 overflowed: dropped, never waited for
        deadline = time.monotonic() + 5
        while m.shadow_requests.get(("slow", "2")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m.shadow_requests.get(("slow", "2")) >= 3
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    crashed = [r for r in records if r["model"] == "crash"]
    assert len(crashed) == 10 and all("out of data bounds" in r["error"] or "failed" in r["error"] for r in crashed)
    compared = [r for r in records if r["model"] == "slow"]
    assert compared and all(r["shadow_version"] == "2" and r["primary_version"] == "1" for r in compared)
    for record in compared:
        assert record["max_abs"] > 0 and -1 <= record["cosine"] <= 1 and 0 <= record["top1_agreement"] <= 1
        assert record["shadow_ms"] >= 250


def test_shadow_of_an_identical_model_agrees(models, tmp_path):
    log_path = tmp_path / "same.jsonl"
    cfg = config((f"m:1={models['mlp']}", f"m:2={models['mlp']}"), shadow=(f"m:2={log_path}",))
    with ServerThread(cfg) as running:
        for _ in range(5):
            assert infer_json(running.http_address, "m", RNG.standard_normal((3, 32)).astype(np.float32))[0] == 200
        deadline = time.monotonic() + 5
        m = running.engine.metrics
        while m.shadow_requests.get(("m", "2")) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert m.shadow_top1_agree.get(("m", "2")) == m.shadow_top1_samples.get(("m", "2")) == 15
        metrics = get(running.http_address, "/metrics")[1].decode()
        assert 'mpack_shadow_max_abs_diff_bucket{model="m",version="2",le="1e-07"} 5' in metrics
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(records) == 5 and all(r["max_abs"] == 0 and r["top1_agreement"] == 1 for r in records)


def test_ab_split_is_sticky_per_key(models):
    cfg = config((f"m:1={models['mlp']}", f"m:2={models['mlp_b']}"), ab=("m:1=50,2=50",))
    with ServerThread(cfg) as running:
        x = np.ones((1, 32), np.float32)
        first = {}
        for user in range(40):
            versions = _versions(running.http_address, 3, x, {"x-user-id": f"user-{user}"})
            assert len(versions) == 1, (user, versions)  # sticky
            first[user] = next(iter(versions))
        split = Counter(first.values())
        assert split["1"] >= 8 and split["2"] >= 8, split  # both variants get users
        # gRPC: the same key in metadata gets the same variant
        client = tritonclient_grpc.InferenceServerClient(running.grpc_address)
        tensor = tritonclient_grpc.InferInput("x", [1, 32], "FP32")
        tensor.set_data_from_numpy(x)
        for user in range(5):
            got = client.infer("m", [tensor], headers={"x-user-id": f"user-{user}"}).get_response().model_version
            assert got == first[user]
        # runtime change of the split: everyone to 2
        post(running.http_address, "/admin/models/m/routing", b'{"ab_split": {"1": 0, "2": 1}}')
        assert _versions(running.http_address, 5, x, {"x-user-id": "user-0"}) == Counter({"2": 5})
        metrics = get(running.http_address, "/metrics")[1].decode()
        assert 'mpack_requests_total{model="m",version="1",route="ab"}' in metrics
        assert 'mpack_requests_total{model="m",version="2",route="ab"}' in metrics


def test_admin_token(models):
    cfg = config((f"m:1={models['mlp']}", f"m:2={models['mlp_b']}"), canary=("m:2=0",), admin_token="s3cret")
    with ServerThread(cfg) as running:
        assert get(running.http_address, "/admin/models/m/routing")[0] == 403
        assert post(running.http_address, "/admin/models/m/routing", b'{"canary_weight": 1}')[0] == 403
        status, _, _ = post(running.http_address, "/admin/models/m/routing", b'{"canary_weight": 1}',
                            {"Authorization": "Bearer s3cret"})
        assert status == 200
        assert get(running.http_address, "/admin/models/m/routing", {"Authorization": "Bearer s3cret"})[0] == 200


def test_concurrent_canary_traffic_keeps_answers_right(models):
    cfg = config((f"m:1={models['mlp']}", f"m:2={models['mlp_b']}"), canary=("m:2=50%",))
    with ServerThread(cfg) as running:
        inputs = [RNG.standard_normal((1, 32)).astype(np.float32) for _ in range(30)]

        def call(x):
            status, _, body = infer_json(running.http_address, "m", x)
            own = ort_run(models["mlp" if body["model_version"] == "1" else "mlp_b"], {"x": x})[0]
            return status == 200 and np.allclose(np.array(body["outputs"][0]["data"]).reshape(1, 8), own,
                                                 rtol=1e-4, atol=1e-4)

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(call, inputs))


def test_admin_endpoints_off_loopback_need_a_token(models):
    cfg = config((f"m:1={models['mlp']}", f"m:2={models['mlp_b']}"), canary=("m:2=0",), host="0.0.0.0",
                 grpc_port="off")
    with ServerThread(cfg) as running:
        address = f"127.0.0.1:{running.info.http_port}"
        status, raw = get(address, "/admin/models/m/routing")
        assert status == 403 and "--admin-token (MPACK_SERVE_ADMIN_TOKEN)" in json.loads(raw)["error"]
        status, _, raw = post(address, "/admin/models/m/routing", b'{"canary_weight": 1}')
        assert status == 403 and "--admin-token" in json.loads(raw)["error"]
        assert running.engine.routing("m")["canary"]["weight"] == 0
        assert infer_json(address, "m", np.ones((1, 32), np.float32))[0] == 200  # inference is not affected
    # on loopback, without a token, the admin endpoints answer as before
    loopback = config((f"m:1={models['mlp']}", f"m:2={models['mlp_b']}"), canary=("m:2=0",), grpc_port="off")
    with ServerThread(loopback) as running:
        assert get(running.http_address, "/admin/models/m/routing")[0] == 200
        assert post(running.http_address, "/admin/models/m/routing", b'{"canary_weight": 1}')[0] == 200


def test_bad_requests_routed_to_the_canary_do_not_roll_it_back(models, tmp_path):
    deploy = tmp_path / "mpack.deploy.json"
    deploy.write_text(json.dumps({"models": {"m": {
        "versions": {"1": str(models["mlp"]), "2": str(models["mlp_b"])}, "primary": "1",
        "canary": {"version": "2", "weight": "100%",
                   "rollback": {"max_error_rate": "20%", "window_s": 60, "min_requests": 5}}}}}))
    with ServerThread(config(config_file=deploy, grpc_port="off")) as running:
        for _ in range(20):  # wrong shape: the client's fault, not the canary's
            status, _, body = infer_json(running.http_address, "m", np.ones((1, 5), np.float32))
            assert status == 400 and "shape" in body["error"], body
        routing = running.engine.routing("m")["canary"]
        assert routing["weight"] == 1.0 and routing["rolled_back"] is None
        assert infer_json(running.http_address, "m", np.ones((1, 32), np.float32))[2]["model_version"] == "2"


def test_shadow_traffic_has_its_own_queue(models, tmp_path):
    """Mirrored requests overflowing the shadow's queue do not take the places of requests addressed to the
    shadow version directly (/versions/2): those keep being answered."""
    build = factory({"mlp_b.onnx": {"sleep_s": 0.2}})
    deploy = tmp_path / "deploy.json"
    deploy.write_text(json.dumps({"models": {"m": {
        "versions": {"1": str(models["mlp"]), "2": str(models["mlp_b"])}, "shadow": {"version": "2"},
        "batching": {"max_queue_size": 2, "max_batch_size": 1}}}}))
    with ServerThread(config(config_file=deploy, grpc_port="off", warmup=False), runner_factory=build) as running:
        x = np.ones((1, 32), np.float32)
        for _ in range(8):  # 8 quick primary answers → 8 mirrored requests to a slow shadow, most of them dropped
            assert infer_json(running.http_address, "m", x)[0] == 200
        m = running.engine.metrics
        assert m.shadow_dropped.get(("m", "2")) >= 1  # the shadow queue is full now
        status, _, raw = post(running.http_address, "/v2/models/m/versions/2/infer", json_body(x))
        assert status == 200, raw
