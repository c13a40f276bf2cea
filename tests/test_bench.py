"""`mpack bench`: real short benchmarks on small models; structure, sanity, JSON and the regression gate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import assert_clean_error, mpack

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from fixtures.onnx_models import mlp  # noqa: E402


@pytest.fixture()
def models(tmp_path):
    return mlp(tmp_path / "small.onnx", hidden=16), mlp(tmp_path / "large.onnx", hidden=512)


def _bench(*args) -> dict:
    result = mpack("bench", *args, "--json", "-")
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


def test_rows_are_sane(models):
    data = _bench(*models, "--batch-sizes", "1,4", "--threads", "1,0", "--iterations", "30", "--warmup", "3")
    rows = data["rows"]
    assert len(rows) == 2 * 2 * 2
    assert {(r["model"], r["batch"], r["threads"]) for r in rows} == {
        (m, b, t) for m in ("small.onnx", "large.onnx") for b in (1, 4) for t in (1, 0)}
    for r in rows:
        s = r["stats"]
        assert s["calls"] == 30
        assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
        assert s["min"] <= s["mean"] <= s["max"] and s["std"] >= 0
        assert s["throughput"] == pytest.approx(r["batch"] * 1000 / s["mean"], rel=1e-6)
        assert s["p50_ci"][0] <= s["p50"] <= s["p50_ci"][1]
        assert r["peak_rss_mb"] > 10
    # Ratios are against the first model of each group; the first is exactly 1.
    assert all(r["ratio_p50"] == 1.0 for r in rows if r["model"] == "small.onnx")
    env = data["environment"]
    assert env["cores"] >= 1 and env["versions"]["onnxruntime"] and env["providers"] == ["cpu"]
    assert "cpu" in env and isinstance(env["env"], dict)


def test_json_round_trips(models, tmp_path):
    from mpack.bench import BenchResult

    out = tmp_path / "bench.json"
    assert mpack("bench", models[0], "--batch-sizes", "2", "--iterations", "10", "--json", out).exit_code == 0
    loaded = BenchResult.load(out)
    again = json.loads(json.dumps(loaded.to_dict()))
    original = json.loads(out.read_text())
    assert again["rows"] == original["rows"] and again["environment"] == original["environment"]


def _scaled_baseline(path, tmp_path, factor):
    data = json.loads(path.read_text())
    for row in data["rows"]:
        for key in ("mean", "p50", "p90", "p99", "min", "max"):
            row["stats"][key] *= factor
        row["stats"]["p50_ci"] = [v * factor for v in row["stats"]["p50_ci"]]
    scaled = tmp_path / f"baseline_{factor}.json"
    scaled.write_text(json.dumps(data))
    return scaled


def test_regression_gate(models, tmp_path):
    measured = tmp_path / "now.json"
    args = (models[1], "--batch-sizes", "4", "--iterations", "40", "--threads", "1")
    assert mpack("bench", *args, "--json", measured).exit_code == 0
    # A baseline 10x slower than today: no regression.
    slower = _scaled_baseline(measured, tmp_path, 10.0)
    data = _bench(*args, "--baseline", slower)
    assert data["gate"]["passed"] is True and all(not g["regressed"] for g in data["gate"]["rows"])
    # A baseline 10x faster: a regression, exit 6, and the JSON still written with the gate's figures.
    faster = _scaled_baseline(measured, tmp_path, 0.1)
    report = tmp_path / "gate.json"
    result = mpack("bench", *args, "--baseline", faster, "--retries", "1", "--json", report)
    assert_clean_error(result, 6, "slower than the baseline")
    gate = json.loads(report.read_text())["gate"]
    assert gate["passed"] is False and gate["rows"][0]["regressed"] and gate["rows"][0]["note"] == "re-measured 1x"
    assert gate["rows"][0]["slowdown"] > 5


def test_noise_guard_ignores_a_few_slow_calls():
    from mpack.bench import Row, Stats, gate

    base = Row("m", "cpu", 1, 1, 1, Stats.of([1.0] * 100, 1), 0)
    noisy = Row("m", "cpu", 1, 1, 1, Stats.of([1.0] * 90 + [50.0] * 10, 1), 0)  # a few outliers: p50 unchanged
    assert not gate([noisy], [base], 0.1)[0].regressed
    slow = Row("m", "cpu", 1, 1, 1, Stats.of([1.5] * 100, 1), 0)
    assert gate([slow], [base], 0.1)[0].regressed


def test_concurrency_mode(models):
    data = _bench(models[0], "--batch-sizes", "1", "--iterations", "20", "--concurrency", "3")
    [row] = data["rows"]
    assert row["concurrency"] == 3 and row["stats"]["calls"] == 60
    # Throughput comes from wall time, since calls overlap.
    assert row["stats"]["throughput"] > 0


def test_duration_mode(models):
    data = _bench(models[0], "--batch-sizes", "1", "--iterations", "0", "--duration", "0.3")
    assert data["rows"][0]["stats"]["calls"] > 10


def test_cuda_is_skipped_without_a_gpu(models):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA")
    data = _bench(models[0], "--providers", "cpu,cuda", "--batch-sizes", "1", "--iterations", "5")
    assert any("cuda" in s for s in data["skipped"]) and {r["provider"] for r in data["rows"]} == {"cpu"}


def test_source_model_and_manifest_record(tmp_path):
    pytest.importorskip("torch")
    model = tmp_path / "cnn.onnx"
    assert mpack("convert", "examples.tiny_cnn:make_model", "-i", "pixels:batch,3,32,32", "-o", model).exit_code == 0
    data = _bench(model, "--source", "--batch-sizes", "2", "--iterations", "10")
    labels = [r["model"] for r in data["rows"]]
    assert labels[0].startswith("pytorch") and labels[1] == "cnn.onnx"
    manifest = json.loads((tmp_path / "cnn.mpack.json").read_text())
    step = manifest["history"][-1]
    assert step["step"] == "bench" and step["rows"][0]["batch"] == 2 and step["rows"][0]["p50_ms"] > 0


# --- bad input ---------------------------------------------------------------------------------------------------

def test_fixed_batch_dim(tmp_path):
    fixed = mlp(tmp_path / "fixed.onnx", batch=1)
    assert_clean_error(mpack("bench", fixed, "--batch-sizes", "1,8", "--iterations", "2"), 2, "fixed batch")


@pytest.mark.parametrize("args,needle", [
    (["--providers", "warp"], "not a provider"),
    (["--iterations", "-1"], "must be positive"),
    (["--iterations", "0"], "must be positive"),
    (["--batch-sizes", "0"], ">= 1"),
    (["--max-regression", "lots"], "not a number"),
])
def test_bad_options(models, args, needle):
    assert_clean_error(mpack("bench", models[0], *args), 2, needle)


def test_model_that_cannot_load(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 not a graph")
    assert_clean_error(mpack("bench", bad, "--iterations", "2"), 2, "bad.onnx")
    assert_clean_error(mpack("bench", tmp_path / "missing.onnx"), 2, "does not exist")


def test_bad_baseline(models, tmp_path):
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    assert_clean_error(mpack("bench", models[0], "--iterations", "2", "--baseline", junk), 2, "not an mpack bench")


@pytest.mark.gpu
def test_cuda_rows_beside_cpu(models):
    data = _bench(models[0], "--providers", "cpu,cuda", "--batch-sizes", "1,8", "--iterations", "20")
    assert {r["provider"] for r in data["rows"]} == {"cpu", "cuda"} and not data["skipped"]


def test_json_in_a_missing_directory_fails_before_measuring(models, tmp_path):
    assert_clean_error(mpack("bench", models[0], "--json", tmp_path / "no" / "b.json"), 2, "does not exist")


def test_model_failing_at_a_batch_size(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # Reshape to a fixed batch of 2 while the input's batch axis is symbolic: runs at 2, fails at 8.
    shape = onnx.numpy_helper.from_array(np.array([2, 32], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "r.onnx"))
    assert_clean_error(mpack("bench", tmp_path / "r.onnx", "--batch-sizes", "8", "--iterations", "2"), 2,
                       "fails to run at batch 8")
