"""mpack serve's parts without sockets: configuration (file < env < flags), the batcher's policy, routing math,
shadow comparison, metrics text, and the CLI's one-line errors. Quick: no server is started here."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from mpack.serving.config import BatchingSpec, RollbackSpec, ServeConfig, load_config
from mpack.serving.errors import ServeConfigError
from tests.conftest import assert_clean_error, mpack


@pytest.fixture
def onnx_files(tmp_path):
    for name in ("a.onnx", "b.onnx", "c.onnx"):
        (tmp_path / name).write_bytes(b"not parsed by the config layer")
    return tmp_path


# ---- configuration ------------------------------------------------------------------------------------------------

def test_flags_env_and_file_precedence(onnx_files):
    deploy = onnx_files / "mpack.deploy.yaml"
    deploy.write_text(
        "server: {http_port: 9000, grpc_port: 9001, threads: 2}\n"
        "batching: {max_batch_size: 8, max_queue_delay_ms: 2}\n"
        "models:\n"
        "  cnn:\n"
        "    versions: {'1': a.onnx, '2': b.onnx, '3': c.onnx}\n"
        "    primary: '1'\n"
        "    canary: {version: '2', weight: 10%, rollback: {max_error_rate: 5%, max_p99_ms: 50, min_requests: 3}}\n"
        "    shadow: {version: '3', log: shadow.jsonl}\n"
        "    batching: {max_queue_size: 7}\n")
    cfg = load_config(config_file=deploy, env={"MPACK_SERVE_HTTP_PORT": "9100", "MPACK_SERVE_THREADS": "3"},
                      overrides={"threads": 4, "grpc_port": None})
    assert (cfg.http_port, cfg.grpc_port, cfg.threads) == (9100, 9001, 4)  # env beats file, flags beat env
    model = cfg.model("cnn")
    assert model.batching == BatchingSpec(max_batch_size=8, max_queue_delay_ms=2.0, max_queue_size=7)
    assert model.canary.weight == pytest.approx(0.1) and model.canary.rollback == RollbackSpec(0.05, 50.0, 60.0, 3)
    assert model.shadow.log == onnx_files / "shadow.jsonl" and model.path("2") == onnx_files / "b.onnx"
    assert cfg.host == "127.0.0.1"  # loopback by default


def test_model_flags_and_defaults(onnx_files):
    cfg = load_config((str(onnx_files / "a.onnx"), f"m:1={onnx_files / 'b.onnx'}", f"m:2={onnx_files / 'c.onnx'}"),
                      ab=("m:1=30,2=70",), env={})
    assert [m.name for m in cfg.models] == ["a", "m"]
    assert cfg.model("m").primary == "1" and cfg.model("m").ab.split == (("1", 30.0), ("2", 70.0))
    assert (cfg.http_port, cfg.grpc_port, cfg.model("a").batching.max_queue_delay_ms) == (8000, 8001, 5.0)
    env_cfg = load_config(env={"MPACK_SERVE_MODELS": f"x={onnx_files / 'a.onnx'}", "MPACK_SERVE_GRPC_PORT": "off",
                               "MPACK_SERVE_ACCESS_LOG": "false", "MPACK_SERVE_PREFERRED_BATCH_SIZES": "4,8"})
    assert env_cfg.grpc_port is None and env_cfg.access_log is False
    assert env_cfg.model("x").batching.preferred_batch_sizes == (4, 8)
    assert json.loads(json.dumps(cfg.to_dict()))["models"][1]["versions"]["2"].endswith("c.onnx")


@pytest.mark.parametrize("kwargs,needle", [
    ({"models": ("nothere.onnx",)}, "no such file"),
    ({}, "no model to serve"),
    ({"models": ("A={a}",), "overrides": {"max_batch_size": 0}}, "must be >= 1"),
    ({"models": ("A={a}",), "overrides": {"http_port": 70000}}, "not a TCP port"),
    ({"models": ("A={a}",), "env": {"MPACK_SERVE_THREADS": "many"}}, "MPACK_SERVE_THREADS"),
    ({"models": ("A={a}",), "overrides": {"providers": "tpu"}}, "unknown provider"),
    ({"models": ("A={a}",), "canary": ("B:2=10%",)}, "not served"),
    ({"models": ("A={a}",), "canary": ("A:2=10%",)}, "not one of its versions"),
    ({"models": ("A={a}", "A:2={b}"), "canary": ("A:2=300",)}, "between 0 and 100%"),
    ({"models": ("A={a}", "A:2={b}"), "canary": ("A:1=10%",)}, "primary version itself"),
    ({"models": ("A={a}", "A:2={b}"), "canary": ("A:2=10%",), "ab": ("A:1=1,2=1",)}, "not both"),
    ({"models": ("A={a}", "A:2={b}"), "ab": ("A:1=1",)}, "two or more"),
    ({"models": ("bad name={a}",)}, "may only use"),
    ({"models": ("A={a}",), "overrides": {"preferred_batch_sizes": "64", "max_batch_size": 8}}, "exceed"),
    ({"models": ("A={a}", "A:2={b}"), "canary": ("A:2=10%",), "shadow": ("A:2",)}, "also takes live traffic"),
    ({"models": ("A={a}", "A:2={b}"), "ab": ("A:1=1,2=1",), "shadow": ("A:2",)}, "also takes live traffic"),
    ({"models": ("A={a}",), "overrides": {"callback_hosts": "http://x/"}}, "not a host name"),
])
def test_config_errors_name_the_field(onnx_files, kwargs, needle):
    kwargs = dict(kwargs)
    kwargs["models"] = tuple(m.format(a=onnx_files / "a.onnx", b=onnx_files / "b.onnx")
                             for m in kwargs.get("models", ()))
    kwargs.setdefault("env", {})
    with pytest.raises(ServeConfigError, match=needle):
        load_config(cwd=onnx_files, **kwargs)


@pytest.mark.parametrize("text,needle", [
    ("models: [1, 2", "is not valid"),
    ("extra: 1\nmodels: {}", "unknown section"),
    ("models: {m: {versions: {}}}", "needs versions"),
    ("models: {m: {versions: {'1': a.onnx}, colour: red}}", "unknown key"),
    ("server: {port: 1}\nmodels: {m: a.onnx}", "not a known setting"),
    ("models: {m: {versions: {'1': a.onnx}, canary: {weight: 1}}}", "needs version"),
])
def test_deploy_file_errors(onnx_files, text, needle):
    deploy = onnx_files / "bad.yaml"
    deploy.write_text(text)
    with pytest.raises(ServeConfigError, match=needle):
        load_config(config_file=deploy, env={})


def test_cli_print_config_and_one_line_errors(onnx_files, monkeypatch):
    monkeypatch.chdir(onnx_files)
    result = mpack("serve", "cnn=a.onnx", "--http-port", "0", "--max-batch-size", "4", "--grpc-port", "off",
                   "--print-config")
    assert result.exit_code == 0, result
    printed = json.loads(result.stdout)
    assert printed["http_port"] == 0 and printed["grpc_port"] is None
    assert printed["models"][0]["batching"]["max_batch_size"] == 4
    assert_clean_error(mpack("serve", "cnn=missing.onnx"), 2, "no such file")
    assert_clean_error(mpack("serve", "cnn=a.onnx", "--canary", "cnn"), 2, "NAME:VERSION=WEIGHT")
    assert_clean_error(mpack("serve", "cnn=a.onnx", "--max-queue-size", "0", "--print-config"), 2, ">= 1")
    monkeypatch.delenv("MPACK_SERVE_CONFIG", raising=False)
    assert_clean_error(mpack("serve"), 2, "no model to serve")


def test_cli_reports_an_unloadable_model(onnx_files, monkeypatch):
    pytest.importorskip("uvicorn")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(onnx_files)
    result = mpack("serve", "cnn=a.onnx", "--http-port", "0", "--grpc-port", "0")
    assert_clean_error(result, 2, "ONNX Runtime cannot load it")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        result = mpack("serve", "cnn=a.onnx", "--http-port", "0", "--grpc-port", "0", "--providers", "cuda")
        assert_clean_error(result, 2, "cuda is not available", "available: cpu")


def test_deploy_file_is_found_in_the_current_directory_or_through_the_environment(onnx_files):
    (onnx_files / "mpack.deploy.yaml").write_text("models: {here: a.onnx}\n")
    (onnx_files / "other.json").write_text(json.dumps({"models": {"there": {"versions": {"1": "b.onnx"}}}}))
    assert [m.name for m in load_config(env={}, cwd=onnx_files).models] == ["here"]
    cfg = load_config(env={"MPACK_SERVE_CONFIG": str(onnx_files / "other.json")}, cwd=onnx_files)
    assert [m.name for m in cfg.models] == ["there"] and cfg.model("there").path("1") == onnx_files / "b.onnx"


# ---- batcher --------------------------------------------------------------------------------------------------------

def _batcher(run_log: list, sleep_s: float = 0.0, **knobs):
    from mpack.serving.batcher import Batcher

    def run(feeds):
        run_log.append(feeds["x"].shape[0])
        if sleep_s:
            time.sleep(sleep_s)
        if (feeds["x"] < 0).any():
            raise RuntimeError("negative")
        return {"y": feeds["x"] * 2}

    defaults = dict(max_batch_size=8, max_queue_delay_ms=5, max_queue_size=16)
    defaults.update(knobs)
    return Batcher(run, **defaults)


def _submit(batcher, rows: int, value: float = 1.0, width: int = 2):
    x = np.full((rows, width), value, np.float32)
    return batcher.submit({"x": x}, rows, ((width,),))


def test_batcher_runs_at_once_when_idle():
    async def main():
        log = []
        batcher = _batcher(log, max_queue_delay_ms=1000)
        started = time.perf_counter()
        out = await _submit(batcher, 1)
        assert time.perf_counter() - started < 0.2  # no wait window, despite a 1 s delay knob
        assert log == [1] and out["y"].tolist() == [[2.0, 2.0]]
        await batcher.drain()

    asyncio.run(main())


def test_batcher_merges_requests_that_arrive_while_busy_and_splits_results():
    async def main():
        log = []
        batcher = _batcher(log, sleep_s=0.05)
        tasks = [asyncio.ensure_future(_submit(batcher, rows, value=i)) for i, rows in enumerate([1, 2, 3, 1, 4])]
        results = await asyncio.gather(*tasks)
        # first alone (model idle), then 2+3+1 = 6 together; 4 more would exceed 8: next batch
        assert log == [1, 6, 4]
        for i, (rows, result) in enumerate(zip([1, 2, 3, 1, 4], results)):
            assert result["y"].shape == (rows, 2) and (result["y"] == 2 * i).all()
        await batcher.drain()

    asyncio.run(main())


def test_batcher_groups_by_shape_and_isolates_failures():
    async def main():
        log = []
        batcher = _batcher(log, sleep_s=0.03)
        first = asyncio.ensure_future(_submit(batcher, 1))
        await asyncio.sleep(0.005)
        wide = asyncio.ensure_future(_submit(batcher, 1, width=3))
        bad = asyncio.ensure_future(_submit(batcher, 1, value=-1))
        good = asyncio.ensure_future(_submit(batcher, 2, value=5))
        await first
        assert (await good)["y"].tolist() == [[10, 10], [10, 10]]  # its batch-mate raised; it did not
        with pytest.raises(RuntimeError, match="negative"):
            await bad
        assert (await wide)["y"].shape == (1, 3)
        assert log[0] == 1 and 3 in log  # bad + good merged (3 rows), failed, re-run alone
        await batcher.drain()

    asyncio.run(main())


def test_batcher_queue_limit_and_batching_off():
    from mpack.serving.batcher import QueueFullError

    async def main():
        log = []
        batcher = _batcher(log, sleep_s=0.05, max_batch_size=1, max_queue_size=2)
        tasks = [asyncio.ensure_future(_submit(batcher, 1)) for _ in range(4)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(isinstance(r, QueueFullError) for r in results) == 1  # one running, two queued, one refused
        assert log == [1, 1, 1]
        await batcher.drain()

    asyncio.run(main())


def test_batcher_waits_for_a_preferred_size_at_most_the_delay():
    async def main():
        log = []
        batcher = _batcher(log, sleep_s=0.02, preferred_batch_sizes=(4,), max_queue_delay_ms=30)
        started = time.perf_counter()
        await _submit(batcher, 1)  # alone and below the preferred size: waits the delay, then runs anyway
        waited = time.perf_counter() - started
        assert log == [1] and 0.025 <= waited < 0.2
        # six at once: the preferred size goes first, the rest after (within the delay)
        await asyncio.gather(*[_submit(batcher, 1) for _ in range(6)])
        assert log[1:] == [4, 2]
        await batcher.drain()

    asyncio.run(main())


# ---- routing, comparison, metrics ----------------------------------------------------------------------------------

def test_sticky_bucket_is_stable_and_uniform():
    from mpack.serving.routing import sticky_bucket

    assert sticky_bucket("user-1") == sticky_bucket("user-1")
    buckets = [sticky_bucket(f"user-{i}") for i in range(2000)]
    assert 0.45 < sum(b < 0.5 for b in buckets) / 2000 < 0.55


def test_router_weights():
    import random

    from mpack.serving.config import ABSpec, CanarySpec, ModelSpec
    from mpack.serving.routing import Router

    spec = ModelSpec("m", (("1", None), ("2", None)), "1", canary=CanarySpec("2", 0.1))
    router = Router(spec, rng=random.Random(0))
    picks = [router.choose(None) for _ in range(5000)]
    share = sum(v == "2" for v, _ in picks) / len(picks)
    assert 0.08 < share < 0.12 and {r for _, r in picks} == {"primary", "canary"}
    ab = Router(ModelSpec("m", (("1", None), ("2", None)), "1", ab=ABSpec((("1", 1.0), ("2", 3.0)))),
                rng=random.Random(0))
    shares = [ab.choose(f"k{i}")[0] for i in range(4000)]
    assert 0.7 < shares.count("2") / 4000 < 0.8
    assert ab.choose("same") == ab.choose("same")


def test_rollback_guard_window():
    from mpack.serving.routing import RollbackGuard

    guard = RollbackGuard(RollbackSpec(max_error_rate=0.5, window_s=10, min_requests=4))
    assert guard.record(False, 0.01, now=0) is None  # too few requests yet
    assert guard.record(False, 0.01, now=1) is None
    assert guard.record(True, 0.01, now=2) is None
    assert guard.record(True, 0.01, now=30) is None  # the old errors left the window
    assert "error rate" in (guard.record(False, 0.01, now=31) or "") or guard.errors == 1
    slow = RollbackGuard(RollbackSpec(max_p99_ms=5, min_requests=2))
    assert slow.record(True, 0.001, now=0) is None
    assert "p99" in slow.record(True, 0.5, now=1)


def test_callback_hosts_and_concurrency_settings(onnx_files):
    a = str(onnx_files / "a.onnx")
    cfg = load_config((f"A={a}",), env={"MPACK_SERVE_CALLBACK_HOSTS": "Results.internal, 10.0.0.5"})
    assert cfg.callback_hosts == ("results.internal", "10.0.0.5")
    assert load_config((f"A={a}",), env={}).callback_hosts == ()  # none: every callback URL is refused
    assert load_config((f"A={a}",), env={}, overrides={"callback_hosts": ("h1", "h2")}).callback_hosts == ("h1", "h2")
    assert load_config((f"A={a}",), env={}, overrides={"max_queue_size": 100}).concurrency_limit == 400
    assert load_config((f"A={a}",), env={}, overrides={"max_queue_size": 2}).concurrency_limit == 64  # the floor
    assert load_config((f"A={a}",), env={"MPACK_SERVE_MAX_CONCURRENCY": "7"}).concurrency_limit == 7


def test_rollback_guard_p99_is_not_recomputed_on_every_request(monkeypatch):
    from mpack.serving.routing import RollbackGuard

    guard = RollbackGuard(RollbackSpec(max_p99_ms=50, min_requests=5))
    calls = []
    real = guard._p99_ms
    monkeypatch.setattr(guard, "_p99_ms", lambda: calls.append(1) or real())
    for i in range(1000):  # 1000 fast canary requests within half a second
        assert guard.record(True, 0.001, now=i / 2000) is None
    assert 1 <= len(calls) <= 1000 // RollbackGuard.P99_EVERY + 1
    # it still trips: once the slow outcomes are evaluated (a second later at the latest)
    reasons = [guard.record(True, 0.5, now=1.0 + i / 10) for i in range(20)]
    assert any(r and "p99" in r for r in reasons)


def test_compare_outputs():
    from mpack.serving.routing import compare_outputs

    a = {"y": np.array([[1.0, 2.0, 0.5], [0.0, 1.0, 3.0]], np.float32)}
    same = compare_outputs(a, {"y": a["y"].copy()})
    assert same["max_abs"] == 0 and same["cosine"] == pytest.approx(1) and same["top1_agree"] == 2
    other = compare_outputs(a, {"y": np.array([[3.0, 2.0, 0.5], [0.0, 1.0, 3.0]], np.float32)})
    assert other["max_abs"] == 2 and other["top1_agree"] == 1 and other["top1_samples"] == 2
    assert compare_outputs(a, {"y": np.zeros((1, 3))})["outputs"]["y"]["error"].startswith("shape")


def test_metrics_text_format():
    from mpack.serving.metrics import Counter, Histogram, Registry

    registry = Registry()
    counter = registry.add(Counter("c_total", "A counter.", ("model",)))
    hist = registry.add(Histogram("h", "A histogram.", ("model",), buckets=(1, 2)))
    counter.inc(('we"ird\n',))
    for value in (0.5, 1.5, 3):
        hist.observe(("m",), value)
    text = registry.render()
    assert 'c_total{model="we\\"ird\\n"} 1' in text
    assert 'h_bucket{model="m",le="1"} 1' in text and 'h_bucket{model="m",le="+Inf"} 3' in text
    assert 'h_count{model="m"} 3' in text and 'h_sum{model="m"} 5' in text


def test_serving_imports_nothing_of_the_rest_of_mpack():
    """serving/ is the image's runtime: only numpy, onnxruntime and the server stack (STYLE.md point 12)."""
    import ast
    from pathlib import Path

    import mpack.serving

    for path in Path(mpack.serving.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name == "mpack" or (name.startswith("mpack.") and not name.startswith("mpack.serving")):
                    pytest.fail(f"{path.name} imports {name}")
                assert name.split(".")[0] not in ("typer", "rich", "onnx", "torch", "tensorflow"), (path.name, name)


def test_python_m_mpack_serving_needs_no_cli_dependencies():
    """The image entry point: `python -m mpack.serving` parses its arguments without typer, rich or onnx."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = ("import sys\n"
              "from mpack.serving.__main__ import main\n"
              "code = main(['no-such.onnx'])\n"
              "print([m for m in ('typer', 'rich', 'onnx', 'torch') if m in sys.modules], code)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.stdout.strip() == "[] 2", proc.stdout + proc.stderr
    assert "error: model no-such version 1" in proc.stderr


def test_serve_config_is_frozen():
    cfg = ServeConfig(models=())
    with pytest.raises(AttributeError):
        cfg.http_port = 1  # type: ignore[misc]
