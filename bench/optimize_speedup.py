"""What `mpack optimize` buys on a BERT, alone and under INT8: fp32, fused fp32, INT8 and fused INT8, one run.

    .venv/bin/python -m bench.optimize_speedup [--iterations 80] [--warmup 10] [--seq 128] [--batches 1,8]

The model is the fixture BERT at benchmark size (hidden 256, 4 layers, 4 heads, intermediate 1024; random weights,
built in code: fixtures/transformer_models.py), exported by `mpack convert --exporter torchscript` (the graph
ONNX Runtime's fusions match). The four variants:

    fp32        the converted model
    fused fp32  `mpack optimize` (level basic: Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu)
    INT8        onnxruntime.quantization.quantize_dynamic on fp32 (per-channel QInt8 weights)
    fused INT8  the same on the fused graph (extra_options DefaultTensorType=FLOAT: shape inference cannot type
                the contrib ops' outputs)

Every session uses ONNX Runtime's default (ALL) optimization level, as a deployment would. Each size/thread
setting times the four variants interleaved (round robin, the order rotating every round, so drifts in machine
load hit all of them) and reports the median of ``--iterations`` rounds after ``--warmup`` rounds, plus the cosine
similarity of each variant's last_hidden_state to fp32's. Thread settings: 1 and all cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    family = f" (family {fields['cpu family']} model {fields['model']})" if "cpu family" in fields else ""
    return f"{name}{family}, {os.cpu_count()} cores, {'/'.join(simd) or 'no AVX2'}"


def has_vnni() -> bool:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return any(f in info for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def build(work: Path) -> dict[str, Path]:
    """Export, optimize and quantize the benchmark BERT; returns variant name → model path."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from mpack import convert, optimize
    from mpack.specs import parse_input_spec

    fp32 = work / "bert.onnx"
    print("exporting the benchmark BERT (TorchScript-based exporter, eager attention) ...", flush=True)
    convert.run(convert.ConvertConfig(
        source="fixtures.transformer_models:make_bench_bert", output=fp32, exporter="torchscript",
        inputs=tuple(parse_input_spec(s) for s in ("input_ids:batch,seq=16:int64",
                                                   "attention_mask:batch,seq=16:int64"))))
    fused = work / "bert.opt.onnx"
    result = optimize.run(optimize.OptimizeConfig(model=fp32, output=fused))
    print(f"mpack optimize: fused {result.fused_ops}, nodes {result.nodes_before} → {result.nodes_after}, "
          f"heads/hidden {result.num_heads}/{result.hidden_size}, parity "
          f"{'passed' if result.passed else 'FAILED'}", flush=True)
    # N.B. without VNNI, u8·s8 products can saturate the 16-bit intermediate sums of AVX2 kernels: 7-bit weights
    # (reduce_range) avoid it, as mpack quantize does.
    common = dict(per_channel=True, weight_type=QuantType.QInt8, reduce_range=not has_vnni())
    int8, fused_int8 = work / "bert.int8.onnx", work / "bert.opt.int8.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing suggestion on the root logger
    try:
        quantize_dynamic(str(fp32), str(int8), **common)
        quantize_dynamic(str(fused), str(fused_int8), **common,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)
    return {"fp32": fp32, "fused fp32": fused, "INT8": int8, "fused INT8": fused_int8}


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(models: dict[str, Path], batch: int, seq: int, threads: int, warmup: int, iterations: int,
            vocab: int) -> dict[str, tuple[float, float]]:
    """Median latency (ms) and cosine vs fp32 of each variant, timed round robin."""
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64),
             "attention_mask": np.ones((batch, seq), np.int64)}
    sessions = {name: session(path, threads) for name, path in models.items()}
    names = list(sessions)
    outputs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + iterations):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            t0 = time.perf_counter()
            sessions[name].run(None, feeds)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    ref = outputs["fp32"].ravel().astype(np.float64)
    result = {}
    for name in names:
        out = outputs[name].ravel().astype(np.float64)
        cosine = float(ref @ out / (np.linalg.norm(ref) * np.linalg.norm(out)))
        result[name] = (1e3 * statistics.median(times[name]), cosine)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()

    import onnxruntime as ort

    from fixtures.transformer_models import BENCH

    print(f"CPU: {cpu_model()}; onnxruntime {ort.__version__}; Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        models = build(Path(tmp))
        sizes = {name: path.stat().st_size / 1e6 for name, path in models.items()}
        thread_counts = sorted({1, os.cpu_count() or 1})
        settings = [(int(b), t) for b in args.batches.split(",") for t in thread_counts]
        table: dict[tuple[int, int], dict[str, tuple[float, float]]] = {}
        for batch, threads in settings:
            print(f"timing batch {batch} seq {args.seq}, {threads} thread(s) ...", flush=True)
            table[(batch, threads)] = measure(models, batch, args.seq, threads, args.warmup, args.iterations,
                                              BENCH["vocab_size"])

    heads = [f"b{b} s{args.seq} {t}T" for b, t in settings]
    print(f"\nmedian latency (ms) and speed-up vs fp32 (x), {args.iterations} interleaved rounds after "
          f"{args.warmup} warm-up; BERT hidden {BENCH['hidden_size']}, {BENCH['num_hidden_layers']} layers")
    print("| variant | size MB | " + " | ".join(heads) + " | cosine vs fp32 |")
    print("|---|---:|" + "---:|" * len(heads) + "---:|")
    for name in models:
        cells = []
        for key in settings:
            ms, _ = table[key][name]
            ratio = table[key]["fp32"][0] / ms
            cells.append(f"{ms:.2f} ({ratio:.2f}x)")
        cosine = min(table[key][name][1] for key in settings)
        print(f"| {name} | {sizes[name]:.1f} | " + " | ".join(cells) + f" | {cosine:.5f} |")


if __name__ == "__main__":
    main()
