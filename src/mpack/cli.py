"""The ``mpack`` command line: thin commands over the library.

Each command parses options, builds a ``*Config``, calls one library function and renders its result. Heavy
imports (onnx, onnxruntime, torch, tensorflow) happen inside the commands, never at module import, so
``mpack --help`` stays fast and works without the framework extras.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from mpack import __version__, console
from mpack.errors import MpackError, ParityError

app = typer.Typer(
    name="mpack",
    help="From a trained PyTorch or TensorFlow model to a checked ONNX package.\n\n"
         "Exit codes: 0 ok, 1 internal error, 2 bad input, 3 parity failure, 4 missing extra, 5 export failure.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        console.out.print(f"mpack {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    _state["debug"] = debug


def handled(json_flag: str | None = "json_out"):
    """Map MpackError to one red line (plus hint) and its exit code; with --debug, re-raise for the traceback."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except MpackError as exc:
                if _state["debug"]:
                    raise
                if isinstance(exc, ParityError) and exc.report is not None:
                    if json_flag and kwargs.get(json_flag):
                        console.print_json({"passed": False, "error": exc.message, "parity": exc.report.to_dict()})
                    else:
                        console.render_parity(exc.report)
                console.error(exc.message, exc.hint)
                raise typer.Exit(exc.exit_code) from None

        return inner

    return wrap


@app.command()
@handled()
def convert(
    source: Annotated[str, typer.Argument(help="Model file (.pt/.pth TorchScript or torch.save, .pt2, .keras, .h5, "
                                               ".tflite), SavedModel directory, or package.module:factory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .onnx file to write.")],
    input_: Annotated[Optional[list[str]], typer.Option(
        "--input", "-i", help="Input as NAME:SHAPE[:DTYPE], e.g. pixels:batch,3,32,32:float32 or "
                              "tokens:batch,seq=16:int64. Repeat per input, in forward() order. "
                              "Default: the model's own signature.")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (13-18).")] = 18,
    exporter: Annotated[str, typer.Option(help="PyTorch exporter: auto (dynamo, TorchScript-based as fallback), "
                                               "dynamo or torchscript.")] = "auto",
    weights: Annotated[Optional[Path], typer.Option(help="state_dict to load into an entry point's module.")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch/--static-batch",
                                                help="Make axis 0 of every input symbolic.")] = True,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check parity against the source.")] = True,
    atol: Annotated[Optional[list[str]], typer.Option(
        help="Absolute tolerance, global (1e-4) or per output (NAME=1e-3). Default 1e-4.")] = None,
    rtol: Annotated[Optional[list[str]], typer.Option(
        help="Relative tolerance, global or NAME=VALUE. Default 1e-3.")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes the parity check runs at.")] = "1,4",
    seed: Annotated[int, typer.Option(help="Seed of the parity inputs.")] = 0,
    external_data: Annotated[str, typer.Option(
        help="Store weights in a separate .onnx.data file: auto (above 1.8 GiB), always, never.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Convert a PyTorch or TensorFlow model to ONNX, check it and verify parity.

    Example: mpack convert model.pt2 -o model.onnx
    """
    from mpack import convert as convert_mod
    from mpack.parity import parse_tolerances
    from mpack.specs import parse_input_spec

    cfg = convert_mod.ConvertConfig(
        source=source, output=output,
        inputs=tuple(parse_input_spec(text) for text in input_) if input_ else None,
        opset=opset, exporter=exporter, weights=weights, dynamic_batch=dynamic_batch, verify=verify,
        tolerances=parse_tolerances(atol, rtol), batch_sizes=_int_list("--batch-sizes", batch_sizes), seed=seed,
        external_data=external_data)
    with console.err.status("converting", spinner="dots") as status:
        result = convert_mod.run(cfg, progress=lambda message: status.update(message))
    if json_out:
        console.print_json(result.to_dict())
    else:
        console.render_convert(result)


@app.command()
@handled()
def inspect(
    model: Annotated[Path, typer.Argument(help="The .onnx file.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Show an ONNX model's inputs, outputs, opsets, size, parameters, operators and manifest."""
    from mpack import inspection

    result = inspection.run(model)
    if json_out:
        console.print_json(result.to_dict())
    else:
        console.render_inspect(result)


@app.command()
@handled()
def optimize(
    model: Annotated[Path, typer.Argument(help="The float .onnx model (e.g. from mpack convert).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The optimized .onnx file to write.")],
    level: Annotated[str, typer.Option(
        help="ONNX Runtime graph optimization: basic (runs on any provider), extended or all (bound to "
             "--provider; all also to this CPU).")] = "basic",
    provider: Annotated[str, typer.Option(help="Execution provider the graph is optimized for: cpu or cuda.")] = "cpu",
    model_type: Annotated[str, typer.Option(
        help="Transformer fusions: auto (detected from the graph), none, or an ONNX Runtime model type "
             "(bert, bart, gpt2, vit, ...).")] = "auto",
    fuser: Annotated[str, typer.Option(
        help="Who fuses: ort (ONNX Runtime's transformer optimizer, matches TorchScript-based exports), onnxscript "
             "(onnxscript's ORT fusions, match dynamo exports) or auto (ort, then onnxscript if no attention "
             "fused).")] = "auto",
    num_heads: Annotated[Optional[int], typer.Option(help="Attention heads. Default: read from the graph.")] = None,
    hidden_size: Annotated[Optional[int], typer.Option(help="Hidden size. Default: read from the graph.")] = None,
    float16: Annotated[bool, typer.Option("--float16", help="Convert to float16 (for GPUs); inputs/outputs and "
                                                            "numerically sensitive ops stay float32.")] = False,
    float16_io: Annotated[bool, typer.Option("--float16-io", help="With --float16, make inputs/outputs "
                                                                  "float16 too.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify",
                                         help="Check parity of the optimized model against the input.")] = True,
    atol: Annotated[Optional[list[str]], typer.Option(
        help="Absolute tolerance, global or NAME=VALUE. Default 1e-4 (1e-2 with --float16).")] = None,
    rtol: Annotated[Optional[list[str]], typer.Option(
        help="Relative tolerance, global or NAME=VALUE. Default 1e-3 (1e-2 with --float16).")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes the parity check runs at.")] = "1,4",
    seed: Annotated[int, typer.Option(help="Seed of the parity inputs.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Optimize an ONNX model with ONNX Runtime (graph levels, transformer fusions, float16) and verify parity.

    Example: mpack optimize model.onnx -o model.opt.onnx --level extended
    """
    from mpack import optimize as optimize_mod
    from mpack.parity import parse_tolerances

    cfg = optimize_mod.OptimizeConfig(
        model=model, output=output, level=level, provider=provider, model_type=model_type, fuser=fuser,
        num_heads=num_heads,
        hidden_size=hidden_size, float16=float16, float16_io=float16_io, verify=verify,
        tolerances=parse_tolerances(atol, rtol) if atol or rtol else None,
        batch_sizes=_int_list("--batch-sizes", batch_sizes), seed=seed)
    with console.err.status("optimizing", spinner="dots") as status:
        result = optimize_mod.run(cfg, progress=lambda message: status.update(message))
    if json_out:
        console.print_json(result.to_dict())
    else:
        console.render_optimize(result)


@app.command()
@handled()
def quantize(
    model: Annotated[Path, typer.Argument(help="The float .onnx model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The INT8 .onnx file to write.")],
    mode: Annotated[str, typer.Option(help="auto (dynamic for MatMul-heavy graphs, static QDQ per-channel for "
                                           "conv nets), dynamic or static.")] = "auto",
    calibration: Annotated[Optional[str], typer.Option(
        help="Calibration samples for static mode: a .npz keyed by input name, a directory of .npz/.npy, or "
             "'random' (smoke tests only).")] = None,
    method: Annotated[str, typer.Option(help="Calibration method: minmax, entropy or percentile.")] = "minmax",
    quant_format: Annotated[str, typer.Option("--format", help="Static format: qdq or qoperator.")] = "qdq",
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="Weight scales.")] = True,
    activation_type: Annotated[str, typer.Option(help="Static activations: quint8 or qint8.")] = "quint8",
    weight_type: Annotated[str, typer.Option(help="Weights: qint8 or quint8.")] = "qint8",
    preprocess: Annotated[bool, typer.Option("--preprocess/--no-preprocess",
                                             help="Run ONNX Runtime's shape inference + optimisation first.")] = True,
    reduce_range: Annotated[Optional[bool], typer.Option(
        "--reduce-range/--full-range", help="7-bit weights. Default: on when the CPU lacks VNNI (INT8 sums "
                                            "saturate there otherwise).")] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="Validation samples for the accuracy figures. Default: the calibration set, else seeded random.")] = None,
    max_drop: Annotated[Optional[list[str]], typer.Option(
        help="Accuracy budget: cosine=DROP (default 0.01, i.e. cosine ≥ 0.99) and/or top1=DROP (e.g. 1%).")] = None,
    fallback: Annotated[bool, typer.Option("--fallback/--no-fallback",
                                           help="Keep the most sensitive nodes in float32 when over budget.")] = True,
    max_excluded: Annotated[int, typer.Option(help="Most nodes the fallback may keep in float32.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of random samples.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Quantize an ONNX model to INT8 within an accuracy budget (exit 3 and nothing written when it cannot).

    Example: mpack quantize model.onnx -o model.int8.onnx --calibration samples.npz
    """
    from mpack import quantize as quantize_mod

    cfg = quantize_mod.QuantizeConfig(
        model=model, output=output, mode=mode, calibration=calibration, method=method, quant_format=quant_format,
        per_channel=per_channel, activation_type=activation_type, weight_type=weight_type, preprocess=preprocess,
        reduce_range=reduce_range, data=data, budget=quantize_mod.parse_budget(max_drop), fallback=fallback,
        max_excluded=max_excluded, seed=seed)
    with console.err.status("quantizing", spinner="dots") as status:
        result = quantize_mod.run(cfg, progress=lambda message: status.update(message))
    if json_out:
        console.print_json(result.to_dict())
    else:
        console.render_quantize(result)


@app.command()
@handled()
def validate(
    models: Annotated[list[Path], typer.Argument(
        help="ONNX models (e.g. fp32 then INT8). The first is the reference unless --source; each other model, "
             "on each provider, is compared with the reference on CPU.")],
    source: Annotated[bool, typer.Option(
        "--source/--no-source", help="Also run the PyTorch/TensorFlow source named in the first model's manifest "
                                     "(model.mpack.json) and make it the reference. Needs its framework extra.")
    ] = False,
    providers: Annotated[str, typer.Option(
        help="ONNX Runtime providers to compare: cpu, cuda, tensorrt (comma-separated). One missing here (no GPU) "
             "is skipped with a note, not failed.")] = "cpu",
    data: Annotated[Optional[Path], typer.Option(
        help="An .npz of inputs keyed by input name, instead of seeded random inputs.")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes of the random inputs.")] = "1,4",
    seed: Annotated[int, typer.Option(help="Seed of the random inputs.")] = 0,
    atol: Annotated[Optional[list[str]], typer.Option(
        help="Absolute tolerance, global (1e-4) or per output (NAME=1e-3). Default 1e-4.")] = None,
    rtol: Annotated[Optional[list[str]], typer.Option(
        help="Relative tolerance, global or NAME=VALUE. Default 1e-3.")] = None,
    locate: Annotated[bool, typer.Option(
        "--locate/--no-locate", help="On a failure, find the first diverging node of the ONNX graph.")] = True,
    chunk_size: Annotated[int, typer.Option(
        help="Intermediate tensors exposed per ONNX Runtime session while locating (lower uses less memory).")
    ] = 64,
    junit: Annotated[Optional[Path], typer.Option(help="Write a JUnit XML report to this file.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Check numerical parity between a source model, its ONNX and INT8 versions, and ORT providers (CI gate).

    Exit 0 when every comparison passes (skipped ones do not fail), 3 when one differs beyond tolerance.

    Example: mpack validate model.onnx model.int8.onnx --source --providers cpu,cuda --atol 1e-2 --junit report.xml
    """
    from mpack import validate as validate_mod
    from mpack.parity import parse_tolerances

    cfg = validate_mod.ValidateConfig(
        models=tuple(models), source=source, providers=tuple(providers.split(",")), data=data,
        batch_sizes=_int_list("--batch-sizes", batch_sizes), seed=seed, tolerances=parse_tolerances(atol, rtol),
        locate=locate, chunk_size=chunk_size, junit=junit)
    with console.err.status("validating", spinner="dots") as status:
        result = validate_mod.run(cfg, progress=lambda message: status.update(message))
    if json_out:
        console.print_json(result.to_dict())
    else:
        console.render_validate(result)
    if not result.passed:
        raise ParityError(f"validation failed: {len(result.failed)} of {len(result.comparisons)} comparisons differ "
                          "beyond tolerance", hint="loosen --atol/--rtol if the differences are acceptable")


@app.command()
@handled(json_flag=None)
def bench(
    models: Annotated[list[Path], typer.Argument(help="ONNX models; the first is the reference for ratios.")],
    source: Annotated[bool, typer.Option("--source/--no-source",
                                         help="Also time the first model's source framework model (from its "
                                              "manifest).")] = False,
    providers: Annotated[str, typer.Option(help="Providers, comma-separated (cpu, cuda, tensorrt); ones this "
                                                "ONNX Runtime lacks are skipped with a note.")] = "cpu",
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,8,32",
    threads: Annotated[str, typer.Option(help="intra-op thread counts, comma-separated; 0 = all cores.")] = "0",
    iterations: Annotated[int, typer.Option(help="Timed calls per row.")] = 100,
    duration: Annotated[Optional[float], typer.Option(help="Seconds per row (stops at whichever of iterations and "
                                                           "duration comes first).")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed calls per row first.")] = 10,
    concurrency: Annotated[int, typer.Option(help="Threads sharing one session (server-like load).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the inputs.")] = 0,
    baseline: Annotated[Optional[Path], typer.Option(help="A previous --json result to gate against.")] = None,
    max_regression: Annotated[str, typer.Option(help="Allowed slowdown of p50 and p90 vs the baseline.")] = "10%",
    retries: Annotated[int, typer.Option(help="Re-measurements of a suspect row before it counts as "
                                              "regressed.")] = 2,
    json_path: Annotated[Optional[str], typer.Option("--json", help="Write the full result (environment "
                                                                    "included) as JSON to this file; - for "
                                                                    "stdout.")] = None,
) -> None:
    """Measure latency percentiles and throughput, models side by side; gate against a baseline (exit 6).

    Example: mpack bench model.onnx model.int8.onnx --batch-sizes 1,8 --json bench.json
    """
    from mpack import bench as bench_mod
    from mpack.errors import RegressionError

    cfg = bench_mod.BenchConfig(
        models=tuple(models), source=source, providers=tuple(p.strip() for p in providers.split(",") if p.strip()),
        batch_sizes=_int_list("--batch-sizes", batch_sizes), threads=_int_list("--threads", threads, minimum=0),
        iterations=iterations, duration=duration, warmup=warmup, concurrency=concurrency, seed=seed,
        baseline=baseline, max_regression=_fraction("--max-regression", max_regression), retries=retries)
    try:
        with console.progress() as bar:
            result = bench_mod.run(cfg, progress=lambda total: bar.task("measuring", total))
    except RegressionError as exc:
        _emit_bench(exc.result, json_path)
        raise
    _emit_bench(result, json_path)


def _emit_bench(result, json_path: str | None) -> None:
    if json_path == "-":
        console.print_json(result.to_dict())
        return
    console.render_bench(result)
    if json_path:
        from mpack import manifest

        manifest.write_atomic(Path(json_path), result.to_dict())
        console.note(f"wrote {json_path}")


export_app = typer.Typer(help="Export to the engines users scale out on: Triton, Kubernetes / KServe.",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("triton")
@handled()
def export_triton(
    model: Annotated[Path, typer.Argument(help="The .onnx model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The model repository directory to create.")],
    name: Annotated[Optional[str], typer.Option(help="Model name. Default: the file's stem.")] = None,
    version: Annotated[int, typer.Option(help="Version directory.")] = 1,
    max_batch_size: Annotated[int, typer.Option(help="Triton max_batch_size (0: no batching).")] = 32,
    max_queue_delay_us: Annotated[int, typer.Option(help="dynamic_batching max queue delay, µs.")] = 5000,
    preferred_batch_sizes: Annotated[str, typer.Option(help="dynamic_batching preferred sizes, e.g. 8,16.")] = "",
    instances: Annotated[int, typer.Option(help="Instances per device.")] = 1,
    kind: Annotated[str, typer.Option(help="Instance kind: cpu or gpu.")] = "cpu",
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Write a Triton model repository: NAME/VERSION/model.onnx and config.pbtxt.

    Example: mpack export triton model.onnx -o repo/
    """
    from mpack import export as export_mod

    cfg = export_mod.TritonExportConfig(
        model=model, output=output, name=name, version=version, max_batch_size=max_batch_size,
        queue_delay_us=max_queue_delay_us,
        preferred_batch_sizes=_int_list("--preferred-batch-sizes", preferred_batch_sizes) if preferred_batch_sizes
        else (), instances=instances, kind=kind)
    _emit_export(export_mod.export_triton(cfg), json_out)


@export_app.command("k8s")
@handled()
def export_k8s(
    image: Annotated[str, typer.Option(help="The serving image, NAME:TAG or NAME@sha256:... (mpack build-image).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the manifests.")],
    name: Annotated[str, typer.Option(help="Name of the Kubernetes objects.")],
    replicas: Annotated[int, typer.Option(help="Replicas (and the autoscaler's minimum).")] = 1,
    max_replicas: Annotated[int, typer.Option(help="The autoscaler's maximum.")] = 4,
    target_cpu: Annotated[int, typer.Option(help="Autoscaling target CPU utilisation, %.")] = 70,
    cpu: Annotated[str, typer.Option(help="CPU request and limit.")] = "1",
    memory: Annotated[str, typer.Option(help="Memory request and limit.")] = "1Gi",
    http_port: Annotated[int, typer.Option(help="The server's REST port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="The server's gRPC port.")] = 8001,
    canary_percent: Annotated[Optional[int], typer.Option(help="KServe canaryTrafficPercent.")] = None,
    namespace: Annotated[Optional[str], typer.Option(help="Namespace of the objects.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Write Kubernetes Deployment, Service and HorizontalPodAutoscaler, and a KServe InferenceService (V2).

    Example: mpack export k8s --image registry/cnn:1.0 --name cnn -o k8s/
    """
    from mpack import export as export_mod

    cfg = export_mod.K8sExportConfig(
        image=image, output=output, name=name, replicas=replicas, max_replicas=max_replicas, target_cpu=target_cpu,
        cpu=cpu, memory=memory, http_port=http_port, grpc_port=grpc_port, canary_percent=canary_percent,
        namespace=namespace)
    _emit_export(export_mod.export_k8s(cfg), json_out)


def _emit_export(result, json_out: bool) -> None:
    if json_out:
        console.print_json(result.to_dict())
        return
    for text in result.notes:
        console.note(text)
    for file in result.files:
        console.out.print(f"[green]✓[/] {result.output / file}")


def _fraction(field: str, text: str) -> float:
    from mpack.errors import ConfigError

    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise ConfigError(field, text, "is not a number or percentage", hint="e.g. 10%") from None
    if value < 0:
        raise ConfigError(field, text, "must be >= 0")
    return value


def _int_list(field: str, text: str, minimum: int = 1) -> tuple[int, ...]:
    from mpack.errors import ConfigError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(field, text, "is not a comma-separated list of integers", hint="e.g. 1,4") from None
    if not values or min(values) < minimum:
        raise ConfigError(field, text, f"must list integers >= {minimum}", hint="e.g. 1,4")
    return values


def main() -> None:
    app()
