"""The cost of `mpack bench`'s measuring loop against a bare `session.run` loop on the same model.

    .venv/bin/python bench/harness_overhead.py [--iterations 2000]

Both loops time every call with perf_counter_ns; mpack's also goes through its per-call closures and bookkeeping.
They alternate in blocks (bare, mpack, bare, mpack, ...) so drift hits both alike. A small model makes the overhead
as visible as it can be: on a real model it is a smaller share still.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=5)
    args = parser.parse_args()

    import onnxruntime as ort

    from mpack.bench import BenchConfig, measure
    from fixtures.onnx_models import mlp

    with tempfile.TemporaryDirectory() as tmp:
        path = mlp(Path(tmp) / "mlp.onnx", hidden=64)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"x": np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)}
        cfg = BenchConfig(models=(path,), batch_sizes=(1,), threads=(1,), iterations=args.iterations, warmup=50)

        bare_blocks, mpack_blocks = [], []
        for _ in range(args.blocks):
            for _ in range(50):
                session.run(None, feed)
            times = []
            for _ in range(args.iterations):
                t0 = time.perf_counter_ns()
                session.run(None, feed)
                times.append((time.perf_counter_ns() - t0) / 1e6)
            bare_blocks.append(statistics.median(times))
            rows, _ = measure(cfg)
            mpack_blocks.append(rows[0].stats.p50)
    bare, harness = statistics.median(bare_blocks), statistics.median(mpack_blocks)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"# {cpu}, {os.cpu_count()} cores, {args.blocks} blocks x {args.iterations} calls, 1 thread")
    print(f"bare session.run p50   {bare * 1000:8.2f} us")
    print(f"mpack bench p50        {harness * 1000:8.2f} us")
    print(f"ratio mpack / bare     {harness / bare:8.3f}x  (overhead {harness - bare:+.4f} ms per call)")


if __name__ == "__main__":
    main()
