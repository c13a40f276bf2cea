"""Rows/s of `mpack batch` end to end against a bare `session.run` loop over the same rows (goal: ratio >= 0.9).

    .venv/bin/python bench/batch_throughput.py [--rows 500000] [--repeats 5] [--no-memory]

The bare loop gets every row already in memory as one array and only calls `session.run` (same batch size, same
session options); `mpack batch` reads the input file, converts, infers, writes part files, commits its record and
assembles the output, all inside the timing. Runs alternate (bare, mpack, bare, ...) so drift hits both alike; the
ratio is the median of the per-pair ratios. Two models: the tiny fixture MLP (hidden 64: inference costs next to
nothing, so this is the worst case, pure I/O) and a wider one (hidden 4096) whose inference cost is closer to a real
model's.

The memory section runs one job in a fresh process on 256 MiB of input (4 KiB per row) with the default automatic
chunk size and reports its peak RSS against the same process on a tiny input.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))


def write_inputs(folder: Path, rows: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.random.default_rng(0).standard_normal((rows, 32)).astype(np.float32)
    parquet = folder / "in.parquet"
    pq.write_table(pa.table({"id": np.arange(rows), "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)),
                                                                                            32)}), parquet)
    npy = folder / "in.npy"
    np.save(npy, x)
    return {"parquet": parquet, "npy": npy, "x": x}


def bare_rows_per_s(session, x: np.ndarray, batch: int) -> float:
    begin = time.perf_counter()
    for i in range(0, len(x), batch):
        session.run(None, {"x": x[i:i + batch]})
    return len(x) / (time.perf_counter() - begin)


def mpack_rows_per_s(model: Path, source: Path, output: Path, batch: int, id_column: str | None) -> float:
    from mpack import batch as batch_mod

    begin = time.perf_counter()
    result = batch_mod.run(batch_mod.BatchConfig(model=model, input=source, output=output, batch_size=batch,
                                                 id_column=id_column))
    elapsed = time.perf_counter() - begin
    output.unlink()
    return result.rows / elapsed


def peak_rss_mb(args: list[str]) -> float:
    # VmHWM of the child's own memory, not ru_maxrss: Linux carries the parent's RSS into a child's ru_maxrss
    # across fork + exec, which would hide the figure under pytest's (or this script's) own size.
    script = ("from mpack.cli import app\n"
              f"try:\n    app({args!r})\nexcept SystemExit as exc:\n    assert not exc.code, exc\n"
              "print(next(int(ln.split()[1]) for ln in open('/proc/self/status')\n"
              "           if ln.startswith('VmHWM')) / 1024)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"})
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.strip().splitlines()[-1])


def memory_section(folder: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    wide = folder / "wide.onnx"
    graph = helper.make_graph([helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)], "wide",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
                              [onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(wide))
    big, small = folder / "big.npy", folder / "small.npy"
    array = np.lib.format.open_memmap(big, mode="w+", dtype=np.float32, shape=(65536, 1024))
    for i in range(0, 65536, 8192):
        array[i:i + 8192] = np.random.default_rng(i).standard_normal((8192, 1024), dtype=np.float32)
    array.flush()
    del array
    np.save(small, np.zeros((16, 1024), np.float32))
    print("\nmemory: 256 MiB of input (65,536 rows x 4 KiB), automatic chunks (8,192 rows = 32 MiB), peak RSS:")
    for kind in ("npy", "parquet"):
        base = peak_rss_mb(["batch", str(wide), str(small), "-o", str(folder / f"small.out.{kind}")])
        peak = peak_rss_mb(["batch", str(wide), str(big), "-o", str(folder / f"big.out.{kind}")])
        print(f"  npy -> {kind:<8} {peak:6.0f} MB, {peak - base:+5.0f} MB over the same command on 16 rows "
              f"({base:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()

    import onnxruntime as ort

    from fixtures.onnx_models import mlp

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"# {cpu}, {os.cpu_count()} cores, onnxruntime {ort.__version__}, {args.rows:,} rows, batch {args.batch}, "
          f"median of {args.repeats}")
    print(f"{'model':<12} {'input -> output':<22} {'bare rows/s':>12} {'mpack rows/s':>13} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = write_inputs(folder, args.rows)
        for hidden in (64, 4096):
            model = mlp(folder / f"mlp{hidden}.onnx", hidden=hidden)
            session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
            for source, target, id_column in (("parquet", "parquet", "id"), ("npy", "npy", None)):
                bare, ours = [], []
                for _ in range(args.repeats):
                    bare.append(bare_rows_per_s(session, data["x"], args.batch))
                    ours.append(mpack_rows_per_s(model, data[source], folder / f"out.{target}", args.batch,
                                                 id_column))
                # The ratio is the median of each (bare, mpack) pair's ratio: a pair runs back to back, so load from
                # other processes on a shared machine hits both of its runs alike.
                ratio = statistics.median(m / b for b, m in zip(bare, ours))
                print(f"{'mlp-' + str(hidden):<12} {source + ' -> ' + target:<22} {statistics.median(bare):>12,.0f} "
                      f"{statistics.median(ours):>13,.0f} {ratio:>6.2f}")
        if not args.no_memory:
            memory_section(folder)


if __name__ == "__main__":
    main()
