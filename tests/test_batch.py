"""`mpack batch`: real models, real Parquet/npz/npy/JSONL files, real subprocesses killed mid-run, real Ray.

Every result is checked row by row, in order, against a direct ONNX Runtime run of the same model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, assert_clean_error, mpack

ort = pytest.importorskip("onnxruntime")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from fixtures.onnx_models import mlp  # noqa: E402

ROWS = 2500


@pytest.fixture()
def model(tmp_path) -> Path:
    return mlp(tmp_path / "mlp.onnx")


def features(rows: int = ROWS, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 32)).astype(np.float32)


def reference(model: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def tensor_column(x: np.ndarray):
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def write_input(path: Path, x: np.ndarray, ids: np.ndarray | None = None, column: str = "x") -> Path:
    """The same rows in the format the suffix names (ids as strings, to check passthrough of non-numbers)."""
    ids = np.array([f"row-{i}" for i in range(len(x))]) if ids is None else ids
    if path.suffix == ".parquet":
        pq.write_table(pa.table({"id": pa.array(ids), column: tensor_column(x)}), path, row_group_size=900)
    elif path.suffix == ".npz":
        np.savez(path, **{"id": ids, column: x})
    elif path.suffix == ".npy":
        np.save(path, x)
    elif path.suffix == ".jsonl":
        with open(path, "w") as fh:
            for i, row in zip(ids.tolist(), x.tolist()):
                fh.write(json.dumps({"id": i, column: row}) + "\n")
    return path


def read_output(path: Path, kind: str | None = None) -> dict[str, np.ndarray]:
    """An output file or directory of parts as columns."""
    if path.is_dir():
        parts = sorted(p for p in path.iterdir() if p.name.startswith("part-"))
        pieces = [read_output(p) for p in parts]
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        out = {}
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(column.type):
                out[name] = column.flatten().to_numpy().reshape(len(column), column.type.list_size)
            else:
                out[name] = column.to_numpy(zero_copy_only=False)
        return out
    if path.suffix == ".npz":
        with np.load(path) as archive:
            return {k: archive[k] for k in archive.files}
    if path.suffix == ".npy":
        return {"y": np.load(path)}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {k: np.array([r[k] for r in rows], dtype=np.float32 if k == "y" else None) for k in rows[0]}


def run_json(*args) -> dict:
    result = mpack("batch", *args, "--json")
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "mpack-batch" in p.name or p.name.startswith("."))


# --- formats ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source,target", [
    ("in.parquet", "out.parquet"), ("in.npz", "out.npz"), ("in.jsonl", "out.jsonl"), ("in.npy", "out.npy"),
    ("in.parquet", "out.jsonl"), ("in.jsonl", "out.parquet"), ("in.npz", "outdir"),
])
def test_formats_give_the_direct_onnx_runtime_result_row_for_row(tmp_path, model, source, target):
    x = features()
    data = write_input(tmp_path / source, x)
    extra = [] if source.endswith(".npy") or target.endswith(".npy") else ["--id", "id"]
    info = run_json(model, data, "-o", tmp_path / target, "--chunk-rows", "700", *extra)
    assert info["rows"] == ROWS and info["parts"] == 4 and info["chunk_rows"] == 700
    out = read_output(tmp_path / target)
    assert out["y"].shape == (ROWS, 8)
    np.testing.assert_allclose(out["y"], reference(model, x), rtol=1e-6, atol=1e-6)
    if extra:
        assert list(out)[0] == "id" and out["id"].tolist() == [f"row-{i}" for i in range(ROWS)]
    # Nothing of the job's bookkeeping is left beside a finished output.
    assert leftovers(tmp_path) == []


def test_column_mapping_outputs_and_directory_input(tmp_path, model):
    x1, x2 = features(1000, seed=1), features(600, seed=2)
    folder = tmp_path / "shards"
    folder.mkdir()
    write_input(folder / "a.parquet", x1, ids=np.arange(1000), column="pixels")
    write_input(folder / "b.parquet", x2, ids=np.arange(1000, 1600), column="pixels")
    info = run_json(model, folder, "-o", tmp_path / "out.parquet", "--map", "x=pixels", "--id", "id",
                    "--outputs", "y", "--batch-size", "64")
    assert info["inputs"] == {"x": "pixels"} and info["batch_size"] == 64 and info["batch_size_source"] == "given"
    out = read_output(tmp_path / "out.parquet")
    assert out["id"].tolist() == list(range(1600))
    np.testing.assert_allclose(out["y"], reference(model, np.concatenate([x1, x2])), rtol=1e-6, atol=1e-6)


def test_auto_batch_size_is_probed_and_reported(tmp_path, model):
    data = write_input(tmp_path / "in.npz", features())
    info = run_json(model, data, "-o", tmp_path / "out.npz", "--id", "id")
    assert info["batch_size_source"] == "probe"
    sizes = [p["batch_size"] for p in info["probe"]]
    assert sizes[:3] == [1, 2, 4] and info["batch_size"] in sizes
    assert all(p["rows_per_s"] > 0 for p in info["probe"])


def test_fixed_batch_model_pads_its_last_batch(tmp_path):
    model = mlp(tmp_path / "fixed.onnx", batch=4)
    x = features(10)
    info = run_json(model, write_input(tmp_path / "in.npy", x), "-o", tmp_path / "out.npy")
    assert info["batch_size"] == 4 and info["batch_size_source"] == "model"
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    padded = np.concatenate([x, np.repeat(x[-1:], 2, axis=0)])
    expected = np.concatenate([session.run(None, {"x": padded[i:i + 4]})[0] for i in range(0, 12, 4)])[:10]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-6, atol=1e-6)


# --- bad input: one line, exit 2, nothing written -----------------------------------------------------------------

def _bad(tmp_path: Path, model: Path, kind: str) -> tuple[list, str]:
    x = features(50)
    if kind == "missing input":
        return [model, tmp_path / "none.parquet", "-o", tmp_path / "o.parquet"], "does not exist"
    if kind == "unreadable input":
        (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
        return [model, tmp_path / "junk.parquet", "-o", tmp_path / "o.parquet"], "not a readable Parquet"
    if kind == "unknown format":
        (tmp_path / "data.csv").write_text("a,b\n")
        return [model, tmp_path / "data.csv", "-o", tmp_path / "o.parquet"], "unknown format"
    if kind == "missing column":
        data = write_input(tmp_path / "in.parquet", x)
        return [model, data, "-o", tmp_path / "o.parquet", "--map", "x=pixels"], "column 'pixels' is not in"
    if kind == "unknown model input":
        data = write_input(tmp_path / "in.parquet", x)
        return [model, data, "-o", tmp_path / "o.parquet", "--map", "image=x"], "the model has no input 'image'"
    if kind == "unmapped input":
        data = write_input(tmp_path / "in.parquet", x, column="features")
        return [model, data, "-o", tmp_path / "o.parquet"], "--map x=COLUMN"
    if kind == "dtype mismatch":
        path = tmp_path / "in.jsonl"
        path.write_text("".join(json.dumps({"x": ["a"] * 32}) + "\n" for _ in range(5)))
        return [model, path, "-o", tmp_path / "o.parquet"], "cannot feed model input 'x' (float32)"
    if kind == "float into int":
        data = write_input(tmp_path / "in.npz", x.astype(np.float64))
        int_model = tmp_path / "int.onnx"
        _int_model(int_model)
        return [int_model, data, "-o", tmp_path / "o.npz", "--id", "id"], "cannot feed model input 'x' (int64)"
    if kind == "shape mismatch":
        data = write_input(tmp_path / "in.npz", features(50)[:, :16])
        return [model, data, "-o", tmp_path / "o.npz"], "rows must have shape [32]"
    if kind == "ragged rows":
        path = tmp_path / "in.jsonl"
        path.write_text(json.dumps({"x": [0.0] * 32}) + "\n" + json.dumps({"x": [0.0] * 31}) + "\n")
        return [model, path, "-o", tmp_path / "o.parquet"], "different shapes"
    if kind == "output directory missing":
        data = write_input(tmp_path / "in.npz", x)
        return [model, data, "-o", tmp_path / "no" / "such" / "o.parquet"], "does not exist"
    if kind == "missing id column":
        data = write_input(tmp_path / "in.npz", x)
        return [model, data, "-o", tmp_path / "o.npz", "--id", "key"], "column 'key' is not in"
    if kind == "npy with two columns":
        data = write_input(tmp_path / "in.npz", x)
        return [model, data, "-o", tmp_path / "o.npy", "--id", "id"], "holds one array"
    if kind == "bad batch size":
        data = write_input(tmp_path / "in.npz", x)
        return [model, data, "-o", tmp_path / "o.npz", "--batch-size", "0"], "must be >= 1 or auto"
    raise AssertionError(kind)


def _int_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "ints",
                              [helper.make_tensor_value_info("x", TensorProto.INT64, ["n", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, ["n", 32])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(path))


@pytest.mark.parametrize("kind", [
    "missing input", "unreadable input", "unknown format", "missing column", "unknown model input", "unmapped input",
    "dtype mismatch", "float into int", "shape mismatch", "ragged rows", "output directory missing",
    "missing id column", "npy with two columns", "bad batch size",
])
def test_bad_input_is_one_clean_line_and_writes_nothing(tmp_path, model, kind):
    args, needle = _bad(tmp_path, model, kind)
    before = {p.name for p in tmp_path.iterdir()}
    result = mpack("batch", *args)
    assert_clean_error(result, 2, needle)
    assert {p.name for p in tmp_path.iterdir()} == before


# --- resume after SIGKILL / SIGINT --------------------------------------------------------------------------------

RESUME_ROWS = 60_000
RESUME_CHUNK = 1500


def _start(model: Path, data: Path, output: Path, *extra: str) -> subprocess.Popen:
    # --batch-size 1 makes the tiny model slow enough (a few seconds) to be stopped part-way.
    return subprocess.Popen([sys.executable, "-m", "mpack", "batch", str(model), str(data), "-o", str(output),
                             "--chunk-rows", str(RESUME_CHUNK), "--batch-size", "1", "--id", "id", *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_parts(state: Path, proc: subprocess.Popen, parts: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            done = sum(b - a for a, b in json.loads(state.read_text())["done"])
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= parts:
            return
        time.sleep(0.005)
    raise AssertionError("the job made no progress")


@pytest.mark.parametrize("how,target", [(signal.SIGKILL, "out.parquet"), (signal.SIGINT, "out.jsonl")])
def test_interrupted_job_resumes_without_losing_or_repeating_rows(tmp_path, model, how, target):
    x = features(RESUME_ROWS, seed=3)
    data = write_input(tmp_path / "in.parquet", x, ids=np.arange(RESUME_ROWS))
    output = tmp_path / target
    state = tmp_path / f"{target}.mpack-batch.json"

    proc = _start(model, data, output)
    _wait_for_parts(state, proc, 3)
    proc.send_signal(how)
    _, stderr = proc.communicate(timeout=60)
    if how == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, stderr
        assert "interrupted after" in stderr and "run the same command again to resume" in stderr
        assert "Traceback" not in stderr
    assert not output.exists() and state.exists()
    done = json.loads(state.read_text())
    kept = sum(b - a for a, b in done["done"])
    assert 3 <= kept < RESUME_ROWS // RESUME_CHUNK

    # The same command continues; the result has every input row exactly once, in order.
    resumed = _start(model, data, output, "--json")
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    info = json.loads(stdout)
    assert info["rows_resumed"] >= kept * RESUME_CHUNK and info["rows"] == RESUME_ROWS
    out = read_output(output)
    assert out["id"].tolist() == list(range(RESUME_ROWS))
    np.testing.assert_allclose(out["y"], reference(model, x), rtol=1e-6, atol=1e-6)
    assert leftovers(tmp_path) == []


def test_changed_command_refuses_to_resume_unless_restart(tmp_path, model):
    x = features(3000)
    data = write_input(tmp_path / "in.npz", x, ids=np.arange(3000))
    output = tmp_path / "out.npz"
    # An interrupted job, made in-process: the progress callback stands in for Ctrl-C after the first part.
    from mpack import batch
    from mpack.errors import JobInterruptedError

    def interrupt(done, total):
        if done >= 1000:
            raise KeyboardInterrupt

    cfg = batch.BatchConfig(model=model, input=data, output=output, id_column="id", chunk_rows=500, batch_size=500)
    with pytest.raises(JobInterruptedError):
        batch.run(cfg, progress=interrupt)

    changed = mpack("batch", model, data, "-o", output, "--id", "id", "--chunk-rows", "250")
    assert_clean_error(changed, 2, "unfinished job with other chunk_rows", "--restart")
    again = run_json(model, data, "-o", output, "--id", "id", "--chunk-rows", "250", "--restart")
    assert again["rows_resumed"] == 0 and again["notes"][0].startswith("discarded")
    out = read_output(output)
    assert out["id"].tolist() == list(range(3000))
    np.testing.assert_allclose(out["y"], reference(model, x), rtol=1e-6, atol=1e-6)


def test_memory_stays_bounded_on_a_file_larger_than_a_chunk(tmp_path):
    """256 MiB of input through 2048-row chunks: the process's peak RSS grows by far less than the input."""
    import onnx
    from onnx import TensorProto, helper

    wide = tmp_path / "wide.onnx"
    graph = helper.make_graph([helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)], "wide",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
                              [onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(wide))
    rows = 65536  # x 4 KiB = 256 MiB
    data = tmp_path / "big.npy"
    array = np.lib.format.open_memmap(data, mode="w+", dtype=np.float32, shape=(rows, 1024))
    for i in range(0, rows, 8192):
        array[i:i + 8192] = np.random.default_rng(i).standard_normal((8192, 1024), dtype=np.float32)
    array.flush()
    del array

    def peak_rss_mb(*args) -> float:
        # VmHWM of the child's own memory, not ru_maxrss: Linux carries the parent's RSS into a child's ru_maxrss
        # across fork + exec, which would hide the figure under pytest's (or this script's) own size.
        argv = [str(a) for a in args]
        script = ("from mpack.cli import app\n"
                  f"try:\n    app({argv!r})\nexcept SystemExit as exc:\n    assert not exc.code, exc\n"
                  "print(next(int(ln.split()[1]) for ln in open('/proc/self/status')\n"
                  "           if ln.startswith('VmHWM')) / 1024)\n")
        proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return float(proc.stdout.strip().splitlines()[-1])

    small = tmp_path / "small.npy"
    np.save(small, np.zeros((16, 1024), np.float32))
    base = peak_rss_mb("batch", wide, small, "-o", tmp_path / "small.out.npy", "--batch-size", "256")
    peak = peak_rss_mb("batch", wide, data, "-o", tmp_path / "big.out.npy", "--chunk-rows", "2048",
                       "--batch-size", "256")
    assert peak - base < 96, (base, peak)
    out = np.load(tmp_path / "big.out.npy", mmap_mode="r")
    assert out.shape == (rows, 1)
    first = np.load(data, mmap_mode="r")[:4096]
    np.testing.assert_allclose(out[:4096, 0], first.sum(axis=1), rtol=1e-4, atol=1e-3)


# --- Ray ----------------------------------------------------------------------------------------------------------

def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _listening_addresses(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every TCP socket in LISTEN state that one of ``pids`` holds, read from /proc."""
    listening: dict[str, str] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                listening[fields[9]] = fields[1][:width]
    found = []
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in listening:
                    found.append((pid, listening[target[8:-1]]))
        except OSError:
            continue
    return found


def _is_loopback(hex_address: str) -> bool:
    if len(hex_address) == 8:  # IPv4, little-endian: 127.x.x.x ends in 7F
        return hex_address.endswith("7F")
    words = [hex_address[i:i + 8] for i in range(0, 32, 8)]
    mapped_v4 = words[:2] == ["00000000"] * 2 and words[2] == "FFFF0000" and words[3].endswith("7F")
    return mapped_v4 or hex_address == "00000000000000000000000001000000"  # ::ffff:127.x.x.x or ::1


@pytest.fixture(scope="module")
def local_ray():
    pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from mpack.batch.ray_engine import start_local

    ray = start_local(num_cpus=2)
    yield ray
    ray.shutdown()


def test_ray_engine_resumes_a_local_job_and_listens_on_loopback_only(tmp_path, model, local_ray):
    """A job interrupted on the local engine is finished on Ray: same parts, same record, same rows."""
    x = features(4000, seed=5)
    data = write_input(tmp_path / "in.parquet", x, ids=np.arange(4000))
    output = tmp_path / "out.parquet"
    from mpack import batch
    from mpack.errors import JobInterruptedError

    def interrupt(done, total):
        if done >= 1000:
            raise KeyboardInterrupt

    with pytest.raises(JobInterruptedError):
        batch.run(batch.BatchConfig(model=model, input=data, output=output, id_column="id", chunk_rows=500,
                                    batch_size=100), progress=interrupt)
    info = run_json(model, data, "-o", output, "--id", "id", "--chunk-rows", "500", "--batch-size", "100",
                    "--engine", "ray", "--ray-actors", "2")
    assert info["engine"] == "ray" and info["rows_resumed"] >= 500 and info["parts"] == 8
    out = read_output(output)
    assert out["id"].tolist() == list(range(4000))
    np.testing.assert_allclose(out["y"], reference(model, x), rtol=1e-6, atol=1e-6)
    assert leftovers(tmp_path) == []

    sockets = _listening_addresses(_descendants(os.getpid()) | {os.getpid()})
    assert sockets, "found no Ray listening sockets to check"
    exposed = [(pid, address) for pid, address in sockets if not _is_loopback(address)]
    assert not exposed, exposed


def test_ray_engine_reports_bad_data_in_a_chunk_as_one_clean_line(tmp_path, model, local_ray):
    rows = [json.dumps({"x": [0.5] * (31 if i == 1500 else 32)}) for i in range(2000)]
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(rows) + "\n")
    result = mpack("batch", model, data, "-o", tmp_path / "out.parquet", "--chunk-rows", "1000", "--engine", "ray")
    assert_clean_error(result, 2, "has rows of different shapes")
    assert not (tmp_path / "out.parquet").exists()


def test_a_second_run_on_the_same_output_is_refused_while_one_runs(tmp_path, model):
    data = write_input(tmp_path / "in.parquet", features(RESUME_ROWS, seed=4), ids=np.arange(RESUME_ROWS))
    output = tmp_path / "out.parquet"
    proc = _start(model, data, output)
    try:
        _wait_for_parts(tmp_path / "out.parquet.mpack-batch.json", proc, 1)
        second = mpack("batch", model, data, "-o", output, "--chunk-rows", str(RESUME_CHUNK), "--id", "id")
        assert_clean_error(second, 2, "another mpack batch is writing")
    finally:
        proc.kill()
        proc.wait()


def test_corrupt_job_record_is_cleared_by_restart(tmp_path, model):
    x = features(40)
    data = write_input(tmp_path / "in.npz", x, ids=np.arange(40))
    output = tmp_path / "out.npz"
    (tmp_path / "out.npz.mpack-batch.json").write_text("{ truncated")
    assert_clean_error(mpack("batch", model, data, "-o", output, "--id", "id"), 2, "unreadable", "--restart")
    again = run_json(model, data, "-o", output, "--id", "id", "--restart")
    assert again["rows"] == 40
    np.testing.assert_allclose(read_output(output)["y"], reference(model, x), rtol=1e-6, atol=1e-6)
