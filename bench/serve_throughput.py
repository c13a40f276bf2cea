"""mpack serve against raw ONNX Runtime: what the server costs, and what dynamic batching buys, in one run.

    .venv/bin/python bench/serve_throughput.py [--interval-ms 3000] [--concurrency 1,8,32]

Builds examples/tiny_cnn with `mpack convert`, then measures, on this machine:
1. raw in-process `session.run` throughput (1 intra-op thread, pinned to core 0) at batch 1 and at the best of
   batch 1/8/32 (images per second);
2. `mpack serve` (pinned to core 0: event loop, gRPC threads and the one ONNX Runtime thread share it) over REST
   (binary tensors) and gRPC, at each concurrency, with batching on (max batch 32) and off (max batch 1). The load
   generator is Triton's perf_analyzer (pinned to core 1) when it is installed
   (`shared/tools/get-perf-analyzer.sh .device/pa`, or --perf-analyzer PATH), else a built-in asyncio client.

Prints throughput, p50/p99 latency, server/raw ratios and batching on/off ratios. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SERVER_CORE, CLIENT_CORE = 0, 1


def convert(work: Path) -> Path:
    out = work / "cnn.onnx"
    proc = subprocess.run([sys.executable, "-m", "mpack", "convert", "examples.tiny_cnn:make_model", "--input",
                           "pixels:batch,3,32,32:float32", "-o", str(out)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    return out


def raw_throughput(model: Path, seconds: float) -> dict[int, dict]:
    import onnxruntime as ort

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {SERVER_CORE})
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    rows = {}
    for batch in (1, 8, 32):
        x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        for _ in range(20):
            session.run(None, {"pixels": x})
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            started = time.perf_counter()
            session.run(None, {"pixels": x})
            times.append(time.perf_counter() - started)
        rows[batch] = {"images_per_s": batch * len(times) / sum(times),
                       "p50_ms": statistics.median(times) * 1e3,
                       "p99_ms": float(np.percentile(times, 99)) * 1e3}
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, max_batch_size: int) -> tuple[subprocess.Popen, int, int]:
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "mpack", "serve", f"cnn={model}", "--http-port", str(http_port), "--grpc-port",
               str(grpc_port), "--threads", "1", "--no-access-log", "--max-batch-size", str(max_batch_size),
               "--max-queue-size", "1024"]
    if shutil.which("taskset"):
        command = ["taskset", "-c", str(SERVER_CORE), *command]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if '"msg": "ready"' in line:
            break
        if '"msg": "failed"' in line or proc.poll() is not None:
            sys.exit(f"server failed: {line}")
    return proc, http_port, grpc_port


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def perf_analyzer(binary: str, protocol: str, port: int, concurrency: int, interval_ms: int) -> dict | None:
    command = [binary, "-m", "cnn", "-u", f"127.0.0.1:{port}", "-i", protocol, "--concurrency-range",
               f"{concurrency}:{concurrency}", "-s", "50", "--measurement-interval", str(interval_ms)]
    if shutil.which("taskset"):
        command = ["taskset", "-c", str(CLIENT_CORE), *command]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    # Read the summary, not the exit code: an unsettled measurement exits 0 and prints no summary.
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", text)
    p50 = re.search(r"p50 latency: (\d+) usec", text)
    p99 = re.search(r"p99 latency: (\d+) usec", text)
    if not (throughput and p50 and p99):
        print(f"  perf_analyzer gave no summary ({protocol}, c={concurrency}): {text.strip()[-300:]}")
        return None
    return {"infer_per_s": float(throughput.group(1)), "p50_ms": int(p50.group(1)) / 1e3,
            "p99_ms": int(p99.group(1)) / 1e3}


async def _async_client(protocol: str, port: int, concurrency: int, seconds: float) -> dict:
    """Fallback load generator: `concurrency` closed-loop workers, binary tensors, one connection each."""
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    latencies: list[float] = []
    deadline = 0.0

    if protocol == "http":
        header = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
        body = header + x.tobytes()
        request = (f"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
                   f"Inference-Header-Content-Length: {len(header)}\r\n\r\n").encode() + body

        async def worker():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
            writer.close()
    else:
        import grpc

        from mpack.serving import v2_pb2 as pb

        message = pb.ModelInferRequest(model_name="cnn")
        message.inputs.add(name="pixels", datatype="FP32", shape=[1, 3, 32, 32])
        message.raw_input_contents.append(x.tobytes())

        async def worker():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                           request_serializer=pb.ModelInferRequest.SerializeToString,
                                           response_deserializer=pb.ModelInferResponse.FromString)
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    await call(message)
                    latencies.append(time.perf_counter() - started)

    deadline = time.perf_counter() + 1.0  # warm-up
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.clear()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"infer_per_s": len(latencies) / elapsed, "p50_ms": statistics.median(latencies) * 1e3,
            "p99_ms": float(np.percentile(latencies, 99)) * 1e3}


def async_client(protocol: str, port: int, concurrency: int, seconds: float) -> dict:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {CLIENT_CORE})
    try:
        return asyncio.run(_async_client(protocol, port, concurrency, seconds))
    finally:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval-ms", type=int, default=3000, help="perf_analyzer measurement window")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--perf-analyzer", default=str(REPO / ".device" / "pa" / "bin" / "perf_analyzer"))
    parser.add_argument("--client", choices=("auto", "perf_analyzer", "async"), default="auto")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    use_pa = args.client != "async" and Path(args.perf_analyzer).is_file() and \
        subprocess.run([args.perf_analyzer, "--version"], capture_output=True).returncode == 0
    if args.client == "perf_analyzer" and not use_pa:
        sys.exit(f"perf_analyzer not usable at {args.perf_analyzer}")
    cores = os.cpu_count()
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores; python {platform.python_version()}")
    print(f"placement: server and raw runs on core {SERVER_CORE} (1 ONNX Runtime thread); load generator "
          f"({'perf_analyzer' if use_pa else 'asyncio client'}) on core {CLIENT_CORE}")

    with tempfile.TemporaryDirectory() as tmp:
        model = convert(Path(tmp))
        raw = raw_throughput(model, seconds=max(2.0, args.interval_ms / 1000))
        best_batch = max(raw, key=lambda b: raw[b]["images_per_s"])
        print("\nraw session.run (images/s, per-call p50/p99 ms):")
        for batch, row in raw.items():
            print(f"  batch {batch:>2}: {row['images_per_s']:8.0f}   p50 {row['p50_ms']:.3f}  p99 {row['p99_ms']:.3f}")
        raw1, raw_best = raw[1]["images_per_s"], raw[best_batch]["images_per_s"]

        results: dict[tuple, dict] = {}
        for batching, max_batch in (("on", 32), ("off", 1)):
            proc, http_port, grpc_port = start_server(model, max_batch)
            try:
                for protocol, port in (("http", http_port), ("grpc", grpc_port)):
                    for concurrency in concurrencies:
                        if use_pa:
                            row = perf_analyzer(args.perf_analyzer, protocol, port, concurrency, args.interval_ms)
                        else:
                            row = async_client(protocol, port, concurrency, args.interval_ms / 1000)
                        if row:
                            results[(protocol, batching, concurrency)] = row
                            print(f"  {protocol:4} batching {batching:3} c={concurrency:<3} "
                                  f"{row['infer_per_s']:8.0f}/s  p50 {row['p50_ms']:7.2f} ms  p99 "
                                  f"{row['p99_ms']:7.2f} ms", flush=True)
            finally:
                stop_server(proc)

    print(f"\n| protocol | concurrency | batching | infer/s | p50 ms | p99 ms | ÷ raw b1 ({raw1:.0f}/s) | "
          f"÷ raw b{best_batch} ({raw_best:.0f}/s) | on ÷ off |")
    print("|---|---|---|---|---|---|---|---|---|")
    for protocol in ("http", "grpc"):
        for concurrency in concurrencies:
            for batching in ("on", "off"):
                row = results.get((protocol, batching, concurrency))
                if row is None:
                    continue
                off = results.get((protocol, "off", concurrency))
                ratio = f"{row['infer_per_s'] / off['infer_per_s']:.2f}" if batching == "on" and off else ""
                print(f"| {'REST' if protocol == 'http' else 'gRPC'} | {concurrency} | {batching} | "
                      f"{row['infer_per_s']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                      f"{row['infer_per_s'] / raw1:.2f} | {row['infer_per_s'] / raw_best:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
