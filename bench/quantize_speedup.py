"""fp32 vs INT8: size ratio and latency ratio, measured side by side in one run.

    .venv/bin/python bench/quantize_speedup.py [--iterations 200]

Builds two models in code (fixtures.torch_models: a transformer encoder, d_model 256 x 4 layers, and a 3-conv CNN), converts them with
`mpack convert`, quantizes them with `mpack quantize` (encoder: dynamic; CNN: static QDQ per-channel, calibrated on
seeded random images), then times fp32 and INT8 sessions interleaved (round robin, so machine drift hits both
alike) at one thread and at all threads, and prints the median latencies and the ratios.
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


def build(work: Path) -> list[tuple[str, Path, Path, dict]]:
    from mpack import convert, quantize
    from mpack.specs import parse_input_spec

    cases = [("encoder", "fixtures.torch_models:make_bench_encoder", "tokens:batch,seq=128,256",
              {"tokens": (1, 128, 256)}, None),
             ("cnn", "fixtures.torch_models:make_wide_cnn", "pixels:batch,3,64,64", {"pixels": (1, 3, 64, 64)},
              "random")]
    out = []
    for name, source, spec, shapes, calibration in cases:
        fp32, int8 = work / f"{name}.onnx", work / f"{name}.int8.onnx"
        convert.run(convert.ConvertConfig(source, fp32, inputs=(parse_input_spec(spec),)))
        # The bench measures speed: any accuracy is accepted here and reported beside the timings.
        result = quantize.run(quantize.QuantizeConfig(fp32, int8, calibration=calibration,
                                                      budget=quantize.Budget(min_cosine=-1.0), fallback=False))
        rng = np.random.default_rng(0)
        feed = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        out.append((name, fp32, int8, {"feed": feed, "result": result}))
    return out


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved(sessions: dict, feed: dict, iterations: int, warmup: int = 10) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feed)
    for _ in range(iterations):
        for key, s in sessions.items():
            t0 = time.perf_counter_ns()
            s.run(None, feed)
            times[key].append((time.perf_counter_ns() - t0) / 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"# {cpu}, {os.cpu_count()} cores, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        models = build(Path(tmp))
        print(f"{'model':8} {'threads':>7} {'fp32 ms':>9} {'int8 ms':>9} {'speedup':>8} {'size fp32':>10} "
              f"{'size int8':>10} {'size ratio':>10} {'cosine':>8}")
        for name, fp32, int8, extra in models:
            result = extra["result"]
            cosine = min(a.cosine for a in result.accuracy)
            for threads in (1, os.cpu_count() or 1):
                med = interleaved({"fp32": session(fp32, threads), "int8": session(int8, threads)}, extra["feed"],
                                  args.iterations)
                print(f"{name:8} {threads:>7} {med['fp32']:>9.3f} {med['int8']:>9.3f} "
                      f"{med['fp32'] / med['int8']:>7.2f}x {result.size_before / 1e6:>8.2f}MB "
                      f"{result.size_after / 1e6:>8.2f}MB {result.ratio:>9.2f}x {cosine:>8.4f}")


if __name__ == "__main__":
    main()
